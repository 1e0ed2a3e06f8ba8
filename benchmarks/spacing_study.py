"""What training on one physical grid gains over each image's own grid: a synthetic 3D study
whose sites scan the same anatomy (objects of one physical size, the same field of view) at
different voxel sizes, one site held out. Each seed writes its own study and trains it twice with
the same settings, ``spacing=auto`` (every site resampled to the plan's spacing, scored in its
own geometry) and ``spacing=native``; the table gives the held-out site's Dice, the training
sites' mean Dice and wall seconds, and the held-out gain as median [min-max] over the seeds.

Usage: python -m benchmarks.spacing_study [--seeds 0,1,2 --spacings 0.6,0.9,1.2,1.5 --rounds 10
       --local-epochs 10 --lr 0.05 --lr-schedule cosine --cases 12 --size 40 --labels 2 --channels 16,32,64
       --patch-size 32 --batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--spacings", default="0.6,0.9,1.2,1.5", help="each site's voxel size (mm); the last is held out")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine"))
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--size", type=int, default=40, help="field of view per axis, mm")
    parser.add_argument("--labels", type=int, default=2, help="foreground classes")
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    spacings = tuple(float(s) for s in args.spacings.split(","))
    work = Path(tempfile.mkdtemp(prefix="fedseg-spacing-"))
    rows, gains = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        study = work / f"study-{seed}"
        sites = write_study(study, sites=len(spacings), dims=3, cases=args.cases, size=args.size, num_labels=args.labels,
                            shift=0.5, seed=seed, spacings=spacings)
        heldout = sites[-1].name
        heldout_dice = {}
        for grid in ("auto", "native"):
            cfg = RunConfig(study_dir=str(study), output_dir=str(work), run_name=f"{grid}-{seed}", spacing=grid,
                            num_server_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                            lr=args.lr, lr_schedule=args.lr_schedule,
                            channels=tuple(int(c) for c in args.channels.split(",")), patch_size=args.patch_size,
                            heldout_sites=(heldout,), seed=seed)
            started = time.monotonic()
            run = simulate(cfg, num_cpus=2)
            seconds = time.monotonic() - started
            summary = json.loads((run / "summary.json").read_text())
            grid_mm = json.loads((run / "run.json").read_text())["spacing"]
            heldout_dice[grid] = summary["heldout"][heldout]["dice"]
            rows.append({"seed": seed, "spacing": grid, "grid mm": "x".join(f"{s:g}" for s in grid_mm) or "own",
                         "held-out Dice": heldout_dice[grid], "training sites' mean Dice": summary["in_federation"]["mean"],
                         "wall s": round(seconds)})
        gains.append(heldout_dice["auto"] - heldout_dice["native"])
    report("spacing_study", rows, vars(args) | {
        "held-out site": f"{heldout} at {spacings[-1]:g} mm",
        "held-out gain (auto - native)": {"median": statistics.median(gains), "min": min(gains), "max": max(gains),
                                          "runs": gains},
        "runs": str(work)})


if __name__ == "__main__":
    main()
