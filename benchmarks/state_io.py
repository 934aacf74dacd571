"""4. Steering states: size on disk, save time, and load-and-apply time for k = 1, 100, 1000.

States are real (top-k of the momentum ranking fitted on 200 default-task pairs, attention+ffn).
``load+apply`` is ``SteeringState.from_pretrained(folder).apply(model)`` (the checksum is verified
on load); the hooks are removed after each timed call (not timed).

    python benchmarks/state_io.py [--quick] [--device cuda] [--ks 1,100,1000]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from austeer_pl import SteeringState

import _common as C


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,100,1000")
    p.add_argument("--fit_pairs", type=int, default=200)
    args = p.parse_args()
    device = C.setup(args)
    rounds = 5 if args.quick else 30
    model, tok = C.load(args)
    info = C.machine(device)
    selection, layout = C.fitted_ranking(model, tok, n_pairs=args.fit_pairs)
    tmp = Path(tempfile.mkdtemp(prefix="austeer-bench-"))
    rows, results = [], {"rounds": rounds, "states": {}}
    try:
        for k in [int(x) for x in args.ks.split(",")]:
            state = C.state_from(selection, layout, k)
            folder = tmp / f"k{k}"
            handles = []

            def save(state=state, folder=folder):
                state.save_pretrained(folder)

            def load(folder=folder):
                SteeringState.from_pretrained(folder)

            def load_apply(folder=folder):
                handles.append(SteeringState.from_pretrained(folder).apply(model, layout=layout))

            def apply(state=state):
                handles.append(state.apply(model, layout=layout))

            def remove_all():
                while handles:
                    handles.pop().remove()

            save()
            times = C.interleave(
                {
                    "save": save,
                    "load": load,
                    "apply": (None, apply, remove_all),
                    "load+apply": (None, load_apply, remove_all),
                },
                rounds,
                device,
            )
            files = {f.name: f.stat().st_size for f in folder.iterdir()}
            hooked = sum(len(v) for v in state.layers_by_site().values())
            results["states"][str(k)] = {
                "bytes_on_disk": sum(files.values()),
                "files": files,
                "hooked_modules": hooked,
                **{name: C.summary(ts) for name, ts in times.items()},
            }
            rows.append(
                [k, sum(files.values()), files.get("steering_state.safetensors", 0), hooked]
                + [1000 * C.median(times[n]) for n in ("save", "load", "apply", "load+apply")]
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        C.table(
            [
                "k",
                "bytes on disk",
                "of which tensors",
                "hooked modules",
                "save ms",
                "load ms",
                "apply ms",
                "load+apply ms",
            ],
            rows,
        )
    )
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("state_io", args, info, results)


if __name__ == "__main__":
    main()
