"""A fedseg site's training step against a plain MONAI loop's step, same network, batch, crop
size, threads and precision, measured in one process in alternating passes.

Usage: python -m benchmarks.step_time [--passes 3] [--steps 30] [--threads 2] [--amp off,bf16]
MoNuSeg site 1 (6 training tiles of 1000x1000): fedseg's ``train_local`` (its cached cases,
foreground-balanced crops, prefetching, step and optimizer) against the side-by-side's plain
loop (random NumPy crops of the decoded tiles, the same U-Net 16..128, DiceCE and SGD). Seconds
per step exclude the first pass's decoding; the ratio is taken within each pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.common import report
from benchmarks.side_by_side import BATCH, CHANNELS, LR, PATCH, STUDY, decoded_tiles, plain_steps, plain_unet
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.common.models import ModelSpec, build_model
from fedseg.common.precision import Precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="off,bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    site = read_site(next(r for r in study_sites(STUDY) if r.name.startswith("site1")))
    train, _ = split_training(site, 0.2, 0)
    tiles = decoded_tiles(site, train)
    spec = ModelSpec(2, 3, 2, CHANNELS, "instance")
    task, rng = task_for(spec), np.random.default_rng(0)
    train_local(build_model(spec), task, site, train, epochs=1, batch_size=BATCH, lr=LR, patch_size=PATCH,
                seed=0, cache_mb=1024)  # decodes and caches the tiles once

    def fedseg_step(precision: Precision | None, seed: int) -> float:
        result = train_local(build_model(spec), task, site, train, epochs=args.steps, batch_size=BATCH, lr=LR,
                             patch_size=PATCH, seed=seed, cache_mb=1024, precision=precision)
        return result.seconds / result.steps

    def plain_step(precision: Precision | None, seed: int) -> float:
        model = plain_unet()
        started = time.perf_counter()
        plain_steps(model, tiles, rng, args.steps, precision)
        return (time.perf_counter() - started) / args.steps

    rows = []
    for amp in args.amp.split(","):
        precision = Precision("cpu", torch.bfloat16) if amp == "bf16" else None
        for n in range(args.passes):
            plain, ours = plain_step(precision, n), fedseg_step(precision, n)
            rows.append({"amp": amp, "pass": n + 1, "plain s/step": plain, "fedseg s/step": ours, "ratio": ours / plain})
    extra = {}
    for amp in args.amp.split(","):
        ratios = [r["ratio"] for r in rows if r["amp"] == amp]
        extra[f"{amp}: fedseg / plain step"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                "max": max(ratios)}
    report("step_time", rows, {**extra, "settings": vars(args), "batch": min(BATCH, len(train))})


if __name__ == "__main__":
    main()
