"""Issue #12's guide loop, outside fedseg's pipeline: one site of MSD Hippocampus cases trained with
DP-SGD in a plain loop (Opacus per-sample gradients, Poisson batches, a per-step moving average of
the weights), scored on held-out cases. It checks the issue's figure (0.564 Dice at eps 8 with 140
cases, 100 steps of 64, clip 0.1, lr 2.5, EMA) and what fedseg's recipe loses or gains against it.

Usage: python -m benchmarks.dp_plain_loop [--lrs 2.5,1.0 --cases 140 --batch 64 --steps 100
       --channels 16,32,64 --patches 1 --ema 0.95]
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from opacus.accountants.utils import get_noise_multiplier

from benchmarks.common import SHARED_DATA, report
from fedseg.client.privacy import noise_generator
from fedseg.client.steps import OpacusStep
from fedseg.client.tasks import task_for
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.data import read_site
from fedseg.common.dp_recipe import ACCOUNTANT, DPRound
from fedseg.common.models import build_model

TEST_CASES = 60  # the last 60 of the seeded order; the first 60 are dp_utility's public split


def train_and_score(lr: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    site = read_site(SHARED_DATA / "hippocampus" / "site-msd", seed=0)
    cases = list(site.training)
    random.Random(0).shuffle(cases)
    train, test = cases[60:60 + args.cases], cases[-TEST_CASES:]
    channels = tuple(int(c) for c in args.channels.split(","))
    spec = ModelSpec(spatial_dims=3, in_channels=1, out_channels=3, channels=channels, norm="instance")
    task, model = task_for(spec), build_model(spec)
    rate = args.batch / len(train)
    sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=1e-5, sample_rate=rate,
                                 steps=args.steps, accountant=ACCOUNTANT)
    data = task.training_data(site, train, 32, seed=0)
    step = OpacusStep(task, model, DPRound(sigma, args.clip, rate, args.steps, 1e-5), args.batch,
                      noise_generator("cpu"), "cpu")
    optimizer = step.wrap(torch.optim.SGD(model.parameters(), lr=lr))
    average = copy.deepcopy(model)
    draws = torch.Generator().manual_seed(1)
    started = time.monotonic()
    for _ in range(args.steps):
        batch = torch.nonzero(torch.rand(len(train), generator=draws) < rate).flatten().tolist()
        optimizer.zero_grad(set_to_none=True)
        step([[data[i] for _ in range(args.patches)] for i in batch])
        optimizer.step()
        with torch.no_grad():
            for kept, now in zip(average.parameters(), model.parameters()):
                kept.mul_(args.ema).add_(now.detach(), alpha=1 - args.ema)
    step.close()
    seconds = time.monotonic() - started
    return {"lr": lr, "cases": len(train), "expected batch": args.batch, "steps": args.steps,
            "noise": sigma, "final weights dice": task.evaluate(model, site, test, patch_size=32)["dice"],
            "moving average dice": task.evaluate(average, site, test, patch_size=32)["dice"],
            "train s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="2.5,1.0")
    parser.add_argument("--cases", type=int, default=140)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--patches", type=int, default=1)
    parser.add_argument("--ema", type=float, default=0.95, help="per-step decay of the weights' average")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--channels", default="16,32,64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        rows.append(train_and_score(lr, args))
        print(rows[-1], flush=True)
    report("dp_plain_loop", rows, {**vars(args), "test_cases": TEST_CASES, "delta": 1e-5,
                                   "issue_figure": "0.564 Dice (lr 2.5, EMA)"})


if __name__ == "__main__":
    main()
