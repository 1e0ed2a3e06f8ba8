"""Seconds per training step with the next batch prepared in a background thread vs in the loop.

Usage: python -m benchmarks.prefetch [--repeats 3] [--threads 1,2]
One site's local training (fedseg's ``train_local``) on real data: MSD Hippocampus 3D (U-Net
16/32/64, patch 32, batch 8, augmentation on) and MoNuSeg 2D (U-Net 16/32/64, patch 128, batch 4,
augmentation on) and the tiny synthetic site of ``benchmarks.scale`` (4 cases of 16 px, U-Net
4/8, batch 2), each timed with the background thread and without it, alternately, at each
torch thread count; the models must come out identical (same random patches either way). fedseg
prepares ahead only where a core is free for it (``client/prefetch.py``, ``ahead_depth``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fedseg.client.trainer as trainer
from fedseg.client.prefetch import ahead_depth
from benchmarks.common import SHARED_DATA, report
from fedseg.client.tasks import task_for
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.data import read_site, split_training
from fedseg.common.logs import setup_logging
from fedseg.common.models import build_model
from fedseg.simulations.synth import write_study

TINY = Path(tempfile.mkdtemp(prefix="fedseg-prefetch-")) / "tiny"
WORKLOADS = {  # name: (site folder, spatial dims, in channels, patch, batch, epochs)
    "hippocampus 3D": (SHARED_DATA / "hippocampus/site-msd", 3, 1, 32, 8, 1),
    "monuseg 2D": (SHARED_DATA / "monuseg/site1-breast-bladder", 2, 3, 128, 4, 10),
    "tiny synthetic 2D (scale's site)": (TINY / "site-a", 2, 1, 16, 2, 1),
}


def timed_training(site_dir: Path, dims: int, channels: int, patch: int, batch: int, epochs: int,
                   depth: int) -> tuple[float, int, torch.Tensor]:
    """(seconds, steps, the trained weights flattened) of one seeded ``train_local``."""
    trainer.ahead_depth = lambda device, voxels=None: depth  # forced, whatever fedseg would choose
    site = read_site(site_dir, seed=0)
    cases, _ = split_training(site, 0.2, 0)
    spec = ModelSpec(dims, channels, site.num_classes, (4, 8) if patch < 32 else (16, 32, 64))
    torch.manual_seed(0)
    model, task = build_model(spec), task_for(spec)
    # decode the cases before timing (fedseg keeps them across rounds, --site-cache-mb)
    task.training_data(site, cases, patch, 0, True, 1024)
    start = time.perf_counter()
    result = trainer.train_local(model, task, site, cases, epochs=epochs, batch_size=batch, lr=0.05,
                                 patch_size=patch, seed=0, augment=True, cache_mb=1024)
    seconds = time.perf_counter() - start
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return seconds, result.steps, weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch intra-op threads, one row per value")
    args = parser.parse_args()
    setup_logging()
    write_study(TINY, sites=1, dims=2, cases=4, size=16, seed=0)
    rows = []
    for name, workload in WORKLOADS.items():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times: dict[int, list[float]] = {0: [], 1: []}
            weights: dict[int, torch.Tensor] = {}
            for _ in range(args.repeats):
                for depth in (0, 1):
                    seconds, steps, weights[depth] = timed_training(*workload, depth=depth)
                    times[depth].append(seconds / steps)
            assert torch.equal(weights[0], weights[1]), "the background thread changed the model"
            loop, ahead = statistics.median(times[0]), statistics.median(times[1])
            rows.append({"workload": name, "torch threads": threads, "steps": steps,
                         "fedseg prepares ahead": bool(ahead_depth("cpu", workload[3] ** workload[1] * workload[4])),
                         "s/step in the loop": loop, "s/step prefetched": ahead, "speed-up": loop / ahead})
            print(rows[-1], flush=True)
    report("prefetch", rows, {"repeats": args.repeats})


if __name__ == "__main__":
    main()
