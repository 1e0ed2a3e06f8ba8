"""The network nnU-Net's rules plan (``model=auto``) against the hand-chosen U-Net, federated on
MSD Hippocampus split into 3 virtual sites (FedBN), with the same rounds, local epochs, batch size
and learning-rate schedule: mean validation Dice per label and wall seconds of each run.

Usage: python -m benchmarks.planned_network [--models auto,unet --rounds 8 --local-epochs 2
       --batch-size 2 --lr 0.05 --lr-schedule cosine --channels 16,32,64 --patch-size 32]
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
from fedseg.simulations.simulate import simulate


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="auto,unet")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-schedule", default="cosine", choices=("constant", "cosine"))
    parser.add_argument("--channels", default="16,32,64", help="model=unet: channels per level")
    parser.add_argument("--patch-size", type=int, default=32, help="model=unet: patch edge")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-planned-"))
    rows = []
    for model in args.models.split(","):
        cfg = RunConfig(study_dir=str(SHARED_DATA / "hippocampus"), output_dir=str(work), run_name=model,
                        model=model, num_server_rounds=args.rounds, local_epochs=args.local_epochs,
                        batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, seed=0,
                        channels=tuple(int(c) for c in args.channels.split(",")), patch_size=args.patch_size)
        started = time.monotonic()
        run = simulate(cfg, num_cpus=2, split_site=3)
        seconds = time.monotonic() - started
        info = json.loads((run / "run.json").read_text())
        final = json.loads((run / "summary.json").read_text())
        last = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()][-1]["eval"]
        labels = sorted({k for scores in last.values() for k in scores if k.startswith("dice-")})
        rows.append({"model": model, "network": f"{info['model']['model']} {info['model']['channels']}",
                     "patch": "x".join(map(str, info["patch_size"])),
                     "mean Dice": final["in_federation"]["mean"],
                     **{f"{label}": sum(s[label] for s in last.values()) / len(last) for label in labels},
                     "wall s": round(seconds)})
    report("planned_network", rows, vars(args) | {"runs": str(work)})


if __name__ == "__main__":
    main()
