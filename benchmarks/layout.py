"""Seconds per training step (plain and DP-SGD) and per evaluated case with the U-Net's weights in
the usual layout vs channels-last, on one CPU thread, on real data.

Usage: python -m benchmarks.layout [--repeats 2]
MSD Hippocampus 3D (48 training cases, patch 32, batch 8) and MoNuSeg site 1 2D (patch 128,
batch 4), U-Net 16/32/64, augmentation on; the DP step is fedseg's (expected third of the cases
per step, 2 patches per case, noise x1; its Poisson batches differ from run to run, so its
times vary more). fedseg trains 3D U-Nets without DP on a CPU channels-last (``client/trainer.py``,
``training_layout``); this measures why.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import fedseg.client.trainer as trainer
from benchmarks.common import SHARED_DATA, report
from fedseg.client.privacy import DPSession
from fedseg.client.site_policy import SitePolicy
from fedseg.client.tasks import task_for
from fedseg.common.round_config import DPSettings
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.data import read_site, split_training
from fedseg.common.logs import setup_logging
from fedseg.common.models import build_model

WORKLOADS = {  # name: (site folder, spatial dims, in channels, patch, batch)
    "hippocampus 3D": ("hippocampus/site-msd", 3, 1, 32, 8),
    "monuseg 2D": ("monuseg/site1-breast-bladder", 2, 3, 128, 4),
}
LAYOUTS = {"usual": torch.contiguous_format, "channels-last": None}  # None: channels-last of the dims


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    rows = []
    for name, (folder, dims, channels, patch, batch) in WORKLOADS.items():
        site = read_site(SHARED_DATA / folder, seed=0)
        cases, val = split_training(site, 0.2, 0)
        cases, val = cases[:48], val[:6]
        spec = ModelSpec(dims, channels, site.num_classes, (16, 32, 64))
        task = task_for(spec)
        task.training_data(site, cases, patch, 0, True, 1024)  # decoded once, as across rounds
        best: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for layout, fmt in LAYOUTS.items():
                fmt = fmt or (torch.channels_last_3d if dims == 3 else torch.channels_last)
                trainer.training_layout = lambda spec, device, private=False, fmt=fmt: fmt  # forced either way
                torch.manual_seed(0)
                model = build_model(spec)
                start = time.perf_counter()
                plain = trainer.train_local(model, task, site, cases, epochs=1, batch_size=batch, lr=0.05,
                                            patch_size=patch, seed=0, augment=True, cache_mb=1024)
                plain_s = (time.perf_counter() - start) / plain.steps
                model.to(memory_format=fmt)
                start = time.perf_counter()
                task.evaluate(model, site, val, patch_size=patch)
                eval_s = (time.perf_counter() - start) / len(val)
                dp = DPSession.open(DPSettings("sample", noise_multiplier=1.0, planned_rounds=1), SitePolicy(),
                                    tempfile.mkdtemp(), num_cases=len(cases), batch_size=batch, epochs=1,
                                    run="layout", server_round=1, site=name)
                start = time.perf_counter()
                private = trainer.train_local(model, task, site, cases, epochs=1, batch_size=batch, lr=0.05,
                                              patch_size=patch, seed=0, augment=True, cache_mb=1024, dp=dp)
                dp_s = (time.perf_counter() - start) / private.steps
                times = best.setdefault(layout, [float("inf")] * 3)
                best[layout] = [min(a, b) for a, b in zip(times, (plain_s, dp_s, eval_s))]
        for what, column in (("plain step", 0), ("DP step", 1), ("evaluated case", 2)):
            usual, last = best["usual"][column], best["channels-last"][column]
            rows.append({"workload": name, "what": what, "s usual layout": usual, "s channels-last": last,
                         "speed-up": usual / last})
    report("layout", rows, {"repeats": args.repeats, "threads": 1})


if __name__ == "__main__":
    main()
