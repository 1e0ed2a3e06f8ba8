"""DP-SGD step time / non-DP step time for the 2D U-Net at batch 8, measured in one run.

Usage: python benchmarks/dp_overhead.py [--steps 10 --size 128]
Both sides: the same MONAI U-Net (channels 16,32,64,128, instance norm), batch 8 of 1x128x128,
DiceCE loss, SGD. The DP side goes through fedseg's own Opacus wrapping (Poisson sampling with
rate 8/N, per-case clipping, Gaussian noise, RDP accounting); the median of the steps after one
warm-up step is reported. Empty Poisson batches are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader

from benchmarks.common import report
from fedseg.client.privacy import DPRound, PrivacyLedger, make_private
from fedseg.common.models import ModelSpec, build_model


def time_steps(model, optimizer, loader, steps: int) -> list[float]:
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    times: list[float] = []
    while len(times) < steps + 1:
        for batch in loader:
            if batch["image"].shape[0] == 0:
                continue
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch["image"]), batch["label"]).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
            if len(times) == steps + 1:
                break
    return times[1:]  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, args.size, args.size, generator=gen),
             "label": (torch.rand(1, args.size, args.size, generator=gen) > 0.7).long()} for _ in range(64)]
    spec = ModelSpec(2, 1, 2, (16, 32, 64, 128), "instance")
    torch.manual_seed(0)
    plain = build_model(spec)
    plain_t = time_steps(plain, torch.optim.SGD(plain.parameters(), lr=0.01),
                         DataLoader(data, batch_size=8, shuffle=True), args.steps)
    torch.manual_seed(0)
    dp_model = build_model(spec)
    plan = DPRound(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=8 / 64, steps=args.steps, delta=1e-5)
    net, opt, loader, _ = make_private(dp_model, torch.optim.SGD(dp_model.parameters(), lr=0.01),
                                       DataLoader(data, batch_size=8), plan,
                                       PrivacyLedger(tempfile.mkdtemp()))
    dp_t = time_steps(net, opt, loader, args.steps)
    p, d = statistics.median(plain_t), statistics.median(dp_t)
    rows = [{"step": "non-DP SGD", "median s/step": p, "ratio": 1.0},
            {"step": "DP-SGD (Opacus, fedseg)", "median s/step": d, "ratio": d / p}]
    report("dp_overhead", rows, {"batch": 8, "image": f"1x{args.size}x{args.size}",
                                 "threads": torch.get_num_threads(), "target_ratio": 2.5})


if __name__ == "__main__":
    main()
