"""Serving formats: a merged transformers folder and GGUF files (merged weights, control vectors)."""
