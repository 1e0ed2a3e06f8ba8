"""Federated Mask R-CNN on the four MoNuSeg client sites, scored on the held-out MoNuSeg site.

Usage: python -m benchmarks.monuseg_maskrcnn [--rounds 4 --local-epochs 10 --backbone slim]
Local-only (each site alone; the held-out score is the mean over the four local models), pooled
(all training tiles in one place) and FedAvg get the same step budget (`fedseg study`). PQ, AJI,
AP@0.5 and foreground Dice of whole 1000x1000 tiles by overlapping 256 px tiles.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, report
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.simulations.study import run_study


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--backbone", default="slim")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--baselines", default="local,pooled,fedavg")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-maskrcnn-"))
    cfg = RunConfig(study_dir=str(SHARED_DATA / "monuseg"), heldout_sites=("heldout",), model="maskrcnn",
                    backbone=args.backbone, norm="group", local_layers="none", patch_size=256, batch_size=4,
                    lr=args.lr, num_server_rounds=args.rounds, local_epochs=args.local_epochs, seed=0,
                    output_dir=str(work), run_name="monuseg-maskrcnn")
    started = time.monotonic()
    out = run_study(cfg, args.baselines.split(","))
    comparison = json.loads((out / "comparison.json").read_text())["baselines"]
    rows = [{"baseline": r["baseline"], "held-out PQ": r["heldout_pq"], "held-out AJI": r["heldout_aji"],
             "held-out AP50": r["heldout_ap50"], "held-out Dice": r["heldout_mean_dice"],
             "in-fed PQ": r["mean_pq"], "in-fed AJI": r["mean_aji"], "in-fed Dice": r["mean_dice"]}
            for r in comparison]
    report(f"monuseg_maskrcnn_{args.backbone}_r{args.rounds}_e{args.local_epochs}", rows, {
        "rounds": args.rounds, "local_epochs": args.local_epochs, "lr": args.lr, "backbone": args.backbone,
        "patch_size": 256, "batch_size": 4, "seconds": round(time.monotonic() - started),
        "study_dir": str(out)})


if __name__ == "__main__":
    main()
