"""Fit the README's default and check the exported state is the one recorded before the redesign.

    .venv/bin/python scripts/default_state_identity.py            # fit into a temporary folder and compare
    .venv/bin/python scripts/default_state_identity.py --state DIR  # compare an already exported state

The weights file (``steering_state.safetensors``: units, momenta, edits) must match the recorded
sha256 bit for bit; the config's choice (site, k, alpha, sign, the validation grid's values) is
compared with timings, versions and input pins left out, and any difference is listed. Exit status
1 on a mismatch
(a change an issue named on purpose is applied to the record first: :func:`_intended`). The recorded values are ``scripts/default_state.json`` (main at 375e91e).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "scripts" / "default_state.json"
VOLATILE = ("seconds", "package_version", "inputs")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items()) if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def fingerprint(state: Path) -> dict:
    config = json.loads((state / "steering_config.json").read_text())
    stable = _stable(config)
    return {
        "weights_sha256": _sha256(state / "steering_state.safetensors"),
        "config_stable_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
        "config_stable": stable,
    }


def _intended(value):
    """The recorded config as it reads after the changes issue 22 named: the grid's ``val_loss`` values
    held the negated loss; they hold the loss now."""
    if isinstance(value, dict):
        return {
            k: (-v if k.startswith("val_loss") and isinstance(v, float) else _intended(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_intended(v) for v in value]
    return value


def _diff(a, b, where=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _diff(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # name the entry that differs
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{where}[{i}]")
    elif a != b:
        yield f"{where}: {json.dumps(a)[:80]} -> {json.dumps(b)[:80]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", help="an exported state to compare (default: fit the README default now)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the fingerprint as the new reference (only when the change is intended)",
    )
    parser.add_argument(
        "--keep", default=None, help="keep the fitted state in this folder (default: a temporary folder, removed)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(args.state) if args.state else Path(args.keep or tmp) / "state"
        if not args.state:
            cmd = [
                sys.executable,
                "train.py",
                "--export_dir",
                str(state),
                "--run_dir",
                str(Path(args.keep or tmp) / "run"),
                "--wandb_mode",
                "disabled",
            ]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        now = fingerprint(state)
    if args.record:
        RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {now['weights_sha256']} in {RECORD}")
        return 0
    before = json.loads(RECORD.read_text())
    same = now["weights_sha256"] == before["weights_sha256"]
    print(
        f"steering_state.safetensors sha256: {now['weights_sha256']} ({'same as' if same else 'DIFFERS from'} {before['weights_sha256']})"
    )
    changes = list(_diff(_intended(before["config_stable"]), now["config_stable"]))
    print(
        "config (timings, versions and input pins aside): "
        + ("same" if not changes else f"{len(changes)} difference(s)")
    )
    for line in changes:
        print(f"  {line}")
    return 0 if same and not changes else 1


if __name__ == "__main__":
    sys.exit(main())
