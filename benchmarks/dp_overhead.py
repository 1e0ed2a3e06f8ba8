"""DP-SGD step time / non-DP step time for the 2D U-Net at batch 8, measured in one run.

Usage: python benchmarks/dp_overhead.py [--steps 10 --size 128]
Both sides: the same MONAI U-Net (channels 16,32,64,128, instance norm), batch 8 of 1x128x128
cases with K = 1, 2 and 4 patches each (augmentation multiplicity), DiceCE loss, SGD, through fedseg's
own training-loop steps: ``PlainStep`` and ``OpacusStep`` (per-sample gradients by torch.func,
averaged per case, clipped, Gaussian noise); the median of the steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import report
from fedseg.client.privacy import noise_generator
from fedseg.client.steps import OpacusStep, PlainStep
from fedseg.common.dp_recipe import DPRound
from fedseg.client.tasks import task_for
from fedseg.common.models import ModelSpec, build_model


def time_steps(step, optimizer, data: list[dict], steps: int, patches: int = 1) -> list[float]:
    """Seconds of ``steps`` full optimizer steps of 8 cases with ``patches`` patches each (after
    one warm-up step)."""
    times: list[float] = []
    for i in range(steps + 1):
        batch = [[data[(8 * i + j + 64 * k) % len(data)] for k in range(patches)] for j in range(8)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step(batch)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, args.size, args.size, generator=gen),
             "label": (torch.rand(1, args.size, args.size, generator=gen) > 0.7).long()} for _ in range(64)]
    spec = ModelSpec(2, 1, 2, (16, 32, 64, 128), "instance")
    task = task_for(spec)
    rows = []
    for patches in (1, 2, 4):  # K patches per case: the DP step averages them per case before clipping
        torch.manual_seed(0)
        plain = build_model(spec)
        step = PlainStep(task, plain, "cpu", [], 0.0)
        p = statistics.median(time_steps(step, task.optimizer(plain, 0.01), data, args.steps, patches))
        torch.manual_seed(0)
        dp_model = build_model(spec)
        plan = DPRound(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=8 / 64, steps=args.steps, delta=1e-5)
        # 8 patches per forward pass, as fedseg's trainer runs them (8 // K cases of K patches)
        dp_step = OpacusStep(task, dp_model, plan, 8.0, noise_generator("cpu"), "cpu",
                             chunk_cases=max(1, 8 // patches))
        d = statistics.median(time_steps(dp_step, dp_step.wrap(task.optimizer(dp_model, 0.01)), data,
                                         args.steps, patches))
        dp_step.close()
        rows += [{"patches per case": patches, "step": "non-DP SGD", "median s/step": p, "ratio": 1.0},
                 {"patches per case": patches, "step": "DP-SGD (fedseg OpacusStep)", "median s/step": d,
                  "ratio": d / p}]
    report("dp_overhead", rows, {"batch": 8, "image": f"1x{args.size}x{args.size}",
                                 "threads": torch.get_num_threads(), "target_ratio": 2.5})


if __name__ == "__main__":
    main()
