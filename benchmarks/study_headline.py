"""Headline table: every baseline on real data, in-federation vs held-out Dice and the worst site.

Usage: python -m benchmarks.study_headline [--dataset monuseg|hippocampus|synthetic --rounds 5
       --local-epochs 4 --baselines local,pooled,fedavg,fedprox,fedbn --norm instance|batch|group --augment
       --channels 16,32,64 --patch-size N --lr-schedule constant|cosine]
monuseg: the four client sites + the official-test `heldout` site (hospitals and organs no client
has). hippocampus: MSD Hippocampus split into 4 virtual sites, the last one held out. synthetic:
`fedseg synth` with strong shift (5 sites of 24 64-px 2D cases, shift 1.0), the last site held
out. Held-out sites are scored plain, after norm adaptation at the site, and by the ensemble of
the last 3 rounds' models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, report
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.simulations.study import run_study
from fedseg.simulations.synth import write_study


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=("monuseg", "hippocampus", "synthetic"), default="monuseg")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--baselines", default="local,pooled,fedavg,fedprox,fedbn")
    parser.add_argument("--norm", default="instance", choices=("instance", "batch", "group"))
    parser.add_argument("--augment", action="store_true", help="run-config augment=true for every baseline")
    parser.add_argument("--channels", default="16,32,64", help="U-Net channels per level")
    parser.add_argument("--patch-size", type=int, default=None, help="default: the dataset's (128/64/32)")
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-headline-"))
    if args.dataset == "monuseg":
        shape = dict(study_dir=str(SHARED_DATA / "monuseg"), heldout_sites=("heldout",), batch_size=4,
                     patch_size=128)
    elif args.dataset == "synthetic":
        write_study(work / "synthetic", sites=5, dims=2, cases=24, size=64, shift=1.0, seed=11)
        shape = dict(study_dir=str(work / "synthetic"), heldout_sites=("site-e",), batch_size=4,
                     patch_size=64)
    else:
        shape = dict(study_dir=str(SHARED_DATA / "hippocampus"), heldout_sites=("site-msd#3",),
                     batch_size=8, patch_size=32)
    if args.patch_size:
        shape["patch_size"] = args.patch_size
    channels = tuple(int(c) for c in args.channels.split(","))
    cfg = RunConfig(output_dir=str(work), run_name=args.dataset, num_server_rounds=args.rounds,
                    local_epochs=args.local_epochs, lr=0.05, channels=channels, seed=0, norm=args.norm,
                    augment=args.augment, lr_schedule=args.lr_schedule, **shape)
    out = run_study(cfg, args.baselines.split(","), split_site=4 if args.dataset == "hippocampus" else 0)
    comparison = json.loads((out / "comparison.json").read_text())["baselines"]
    rows = [{"baseline": r["baseline"], "in-federation mean Dice": r["mean_dice"],
             "worst site": r["worst_site"], "worst Dice": r["worst_dice"],
             "held-out Dice": r["heldout_mean_dice"], "held-out adapted": r["heldout_adapted_dice"],
             "held-out ensemble (last 3 rounds)": r["heldout_ensemble_dice"],
             "held-out - in-fed": (r["heldout_mean_dice"] - r["mean_dice"])
             if r["heldout_mean_dice"] is not None else None} for r in comparison]
    dice = {r["baseline"]: r["in-federation mean Dice"] for r in rows}
    ratio = dice["fedbn"] / dice["pooled"] if {"fedbn", "pooled"} <= set(dice) else None
    name = (f"study_headline_{args.dataset}" + ("" if args.norm == "instance" else f"_{args.norm}")
            + ("_augment" if args.augment else "")
            + ("" if channels == (16, 32, 64) else f"_{channels[-1]}ch")
            + (f"_p{args.patch_size}" if args.patch_size else "")
            + ("" if args.lr_schedule == "constant" else f"_{args.lr_schedule}"))
    report(name, rows, {"rounds": args.rounds, "local_epochs": args.local_epochs, "norm": args.norm,
                        "augment": args.augment, "channels": channels, "patch_size": cfg.patch_size,
                        "lr_schedule": args.lr_schedule,
                        "fedbn_vs_pooled": ratio, "study_dir": str(out)})


if __name__ == "__main__":
    main()
