"""The package version, one place (read by pyproject.toml and recorded in every output)."""

__version__ = "0.1.0"
