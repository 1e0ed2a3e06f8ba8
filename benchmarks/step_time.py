"""A fedseg site's training step against a plain MONAI loop's step, same network, batch, crop
size, threads and precision, measured in one process in alternating passes.

Usage: python -m benchmarks.step_time [--passes 3] [--steps 30] [--threads 2] [--amp off,bf16] [--compile]
       [--step-memory-mb MB]
MoNuSeg site 1 (6 training tiles of 1000x1000): fedseg's ``train_local`` (its cached cases,
foreground-balanced crops, prefetching, step and optimizer) against the side-by-side's plain
loop (random NumPy crops of the decoded tiles, the same U-Net 16..128, DiceCE and SGD). Seconds
per step exclude the first pass's decoding; the ratio is taken within each pass. With
``--compile``, each precision is also timed with both sides' forward through ``torch.compile``
(fedseg's ``compile`` run-config), from an empty compile cache: the first compile's seconds are
reported, and the compiled steps are also set against fedseg's eager steps. fedseg's step runs
with the run-config's ``step-memory-mb`` (by default the run's default: its batch in parts where
their activations exceed it); the plain loop always takes the whole batch at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import SETTINGS, report
from benchmarks.side_by_side import VAL_FRACTION, decoded_cases, plain_steps, plain_unet
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.common.models import ModelSpec, build_model
from fedseg.common.precision import Precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="off,bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--step-memory-mb", type=int, default=RunConfig().step_memory_mb)
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="step_time-inductor-")  # a cold first compile
    torch.set_num_threads(args.threads)
    setting = SETTINGS["monuseg"]
    site = read_site(next(r for r in study_sites(setting.study) if r.name.startswith("site1")))
    train, _ = split_training(site, VAL_FRACTION, 0)  # fewer tiles than the batch: one step per epoch
    tiles = decoded_cases(site, train)
    spec = ModelSpec(2, 3, 2, setting.channels, "instance")
    task, rng = task_for(spec), np.random.default_rng(0)
    train_local(build_model(spec), task, site, train, epochs=1, batch_size=setting.batch, lr=setting.lr,
                patch_size=setting.patch, seed=0, cache_mb=1024)  # decodes and caches the tiles once

    def fedseg_step(precision: Precision | None, seed: int, compiled: bool = False) -> float:
        result = train_local(build_model(spec), task, site, train, epochs=args.steps, batch_size=setting.batch,
                             lr=setting.lr, patch_size=setting.patch, seed=seed, cache_mb=1024, precision=precision,
                             compile_step=compiled, step_memory_mb=args.step_memory_mb)
        return result.seconds / result.steps

    def plain_step(precision: Precision | None, seed: int, compiled: bool = False) -> float:
        model = plain_unet(setting, 2, 3, 2)
        model = torch.compile(model) if compiled else model
        started = time.perf_counter()
        steps = plain_steps(model, tiles, rng, args.steps, setting, precision)
        return (time.perf_counter() - started) / steps

    def first_compile(side: Callable[..., float], precision: Precision | None) -> float:
        started = time.perf_counter()
        side(precision, 0, True)
        return time.perf_counter() - started  # the compile and one pass of steps

    rows, extra = [], {}
    modes = [(amp, False) for amp in args.amp.split(",")] + [(amp, True) for amp in args.amp.split(",") if args.compile]
    for amp, compiled in modes:
        precision = Precision("cpu", torch.bfloat16) if amp == "bf16" else None
        mode = amp + (" compiled" if compiled else "")
        if compiled:
            extra[f"{mode}: first compile and pass, s"] = {"plain": first_compile(plain_step, precision),
                                                           "fedseg": first_compile(fedseg_step, precision)}
        for n in range(args.passes):
            plain, ours = plain_step(precision, n, compiled), fedseg_step(precision, n, compiled)
            row = {"mode": mode, "pass": n + 1, "plain s/step": plain, "fedseg s/step": ours, "ratio": ours / plain}
            if compiled:
                row["fedseg / fedseg eager"] = ours / fedseg_step(precision, n)
            rows.append(row)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for column in ("ratio", "fedseg / fedseg eager"):
            values = [r[column] for r in rows if r["mode"] == mode and column in r]
            if values:
                extra[f"{mode}: {column}"] = {"median": statistics.median(values), "min": min(values),
                                              "max": max(values)}
    report("step_time", rows, {**extra, "settings": vars(args), "batch": min(setting.batch, len(train))})


if __name__ == "__main__":
    main()
