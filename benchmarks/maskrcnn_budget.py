"""How far a training budget takes Mask R-CNN on MoNuSeg: one pooled model (the four client
sites' training tiles) scored on the held-out site after growing numbers of steps.

Usage: python -m benchmarks.maskrcnn_budget [--device cuda --epochs 25,100,300 --backbone slim]
       [--data ../shared/data/monuseg]
It uses fedseg's own loop (``train_local``) and scoring (``InstanceTask.evaluate``, 256 px tiles),
the same split and learning rate as ``monuseg_maskrcnn``; ``--epochs`` are cumulative passes over
the pooled tiles (one random 256 px crop per tile per pass).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import SHARED_DATA, report
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.common.models import ModelSpec, build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="slim")
    parser.add_argument("--epochs", default="25,100,300", help="cumulative passes at which to score")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--data", default=str(SHARED_DATA / "monuseg"))
    args = parser.parse_args()
    specs = {r.name: read_site(r) for r in study_sites(args.data)}
    heldout = specs.pop("heldout")
    cases = [c for s in specs.values() for c in split_training(s, 0.25, 0)[0]]
    first = next(iter(specs.values()))
    torch.manual_seed(0)
    spec = ModelSpec(2, 3, 2, (8, 16), "group", "maskrcnn", args.backbone, 256)
    model, task = build_model(spec), task_for(spec)
    rows, done, steps, train_seconds = [], 0, 0, 0.0
    for target in (int(e) for e in args.epochs.split(",")):
        start = time.perf_counter()
        result = train_local(model, task, first, cases, epochs=target - done, batch_size=4, lr=args.lr,
                             patch_size=256, seed=target, device=args.device)
        train_seconds += time.perf_counter() - start
        done, steps = target, steps + result.steps
        scores = task.evaluate(model, heldout, list(heldout.test), patch_size=256, device=args.device)
        rows.append({"epochs": done, "steps": steps, "train s": train_seconds, "loss": result.loss,
                     "held-out PQ": scores["pq"], "held-out AJI": scores["aji"],
                     "held-out AP50": scores["ap50"], "held-out Dice": scores["dice"]})
        print(rows[-1], flush=True)
    report(f"maskrcnn_budget_{args.backbone}_{args.device}", rows,
           {"pooled_tiles": len(cases), "heldout_tiles": len(heldout.test), "lr": args.lr,
            "batch_size": 4, "crop": 256})


if __name__ == "__main__":
    main()
