"""fedseg simulation vs a plain MONAI training loop doing the same optimizer steps, in one run.

Usage: python benchmarks/sim_overhead.py [--rounds 5 --local-epochs 3 --sites 3]
Both sides use one CPU thread (the simulation gets one Ray CPU, so sites run one after another),
the same synthetic study, model, patches, batch size and per-round sliding-window validation
scored with MONAI's Dice and HD95 per case, as fedseg's evaluation does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from benchmarks.common import report
from fedseg.common.logs import setup_logging
from fedseg.common.config import RunConfig
from fedseg.common.round_config import SITE_CACHE_MB
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.common.transforms import eval_transforms, to_dicts, train_transforms
from fedseg.common.metrics import SegmentationScores
from fedseg.common.models import ModelSpec, build_model
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study

KEPT_MB = 1024  # --site-cache-mb of the variant that keeps decoded cases across rounds


@dataclass(frozen=True)
class PlainRun:
    """What ``plain_monai_loop`` measured: seconds in all, optimizer steps, seconds of the last
    round's validation, and seconds of each round."""

    seconds: float
    steps: int
    last_validation_s: float
    round_seconds: list[float]


def plain_monai_loop(cfg: RunConfig, mspec: ModelSpec, scores: bool = False) -> PlainRun:
    """FedAvg written as one plain loop: every site trains in turn, weights averaged in memory;
    with ``scores``, each validation case is also scored with MONAI's Dice and HD95 per label
    (what fedseg's evaluation reports)."""
    sites = [read_site(ref, seed=cfg.seed) for ref in study_sites(cfg.study_dir)]
    data = []
    for spec in sites:
        train, val = split_training(spec, cfg.val_fraction, cfg.seed)
        ds = CacheDataset(to_dicts(train), transform=train_transforms(spec, cfg.patch_size), progress=False)
        data.append((spec, ds, [eval_transforms(spec)(d) for d in to_dicts(val)], len(train)))
    torch.manual_seed(cfg.seed)
    global_model = build_model(mspec)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    steps, round_seconds = 0, []
    start = time.perf_counter()
    for _ in range(cfg.num_server_rounds):
        round_start = time.perf_counter()
        states, weights, validation_s = [], [], 0.0
        for spec, ds, val, n in data:
            model = build_model(mspec)
            model.load_state_dict(global_model.state_dict())
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
            model.train()
            for _ in range(cfg.local_epochs):
                for batch in DataLoader(ds, batch_size=cfg.batch_size, shuffle=True):
                    opt.zero_grad()
                    loss_fn(model(batch["image"]), batch["label"]).backward()
                    opt.step()
                    steps += 1
            model.eval()
            validation_start = time.perf_counter()
            with torch.no_grad():
                for item in val:
                    logits = sliding_window_inference(item["image"][None], (cfg.patch_size,) * 2, 4, model, 0.25)
                    if scores:
                        SegmentationScores(mspec.out_channels).add(logits.argmax(1, keepdim=True),
                                                                   item["label"][None], (1.0, 1.0))
            validation_s += time.perf_counter() - validation_start
            states.append(model.state_dict())
            weights.append(n)
        total = sum(weights)
        global_model.load_state_dict({k: sum(s[k].float() * w / total for s, w in zip(states, weights))
                                      for k in states[0]})
        round_seconds.append(time.perf_counter() - round_start)
    return PlainRun(time.perf_counter() - start, steps, validation_s, round_seconds)


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", default="3,15", help="one workload per value")
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-overhead-"))
    write_study(work / "study", sites=args.sites, dims=2, cases=16, size=64, shift=0.6, seed=0)
    torch.set_num_threads(1)
    rows = []
    for epochs in (int(e) for e in args.local_epochs.split(",")):
        cfg = RunConfig(study_dir=str(work / "study"), output_dir=str(work / "runs"), run_name=f"sim-e{epochs}",
                        num_server_rounds=args.rounds, local_epochs=epochs, batch_size=4,
                        lr=0.05, patch_size=48, channels=(16, 32, 64), local_layers="none", seed=0,
                        amp="off")  # the plain loop computes in float32 too
        plain = plain_monai_loop(cfg, ModelSpec(2, 1, 3, cfg.channels, cfg.norm), scores=True)
        plain_steps = plain.steps
        # fedseg's round lines time training and the previous round's scoring (inside its train message):
        # the last round's scoring comes after them, so the loop's is left out of the comparison
        plain_s = plain.seconds - plain.last_validation_s
        rows.append({"local epochs": epochs, "what": "plain MONAI loop", "seconds": plain_s,
                     "optimizer steps": plain_steps, "ratio": 1.0})
        for cache_mb in (SITE_CACHE_MB, KEPT_MB):  # the default (read every round), and cases kept across rounds
            tag = f"--site-cache-mb {cache_mb}"
            start = time.perf_counter()
            run_dir = simulate(cfg.replace(run_name=f"sim-e{epochs}-c{cache_mb}"), num_cpus=1,
                               site_cache_mb=cache_mb)
            sim_s = time.perf_counter() - start
            rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
            rounds_s = sum(r["seconds"] for r in rounds)
            sim_steps = sum(m["steps"] for r in rounds for m in r["train"].values())
            assert sim_steps == plain_steps, (sim_steps, plain_steps)
            rows += [{"local epochs": epochs, "what": f"fedseg rounds (Flower sim, {tag})", "seconds": rounds_s,
                      "optimizer steps": sim_steps, "ratio": rounds_s / plain_s},
                     {"local epochs": epochs, "what": f"fedseg whole run (+Ray start, discovery; {tag})",
                      "seconds": sim_s, "optimizer steps": sim_steps, "ratio": sim_s / plain_s}]
    report("sim_overhead", rows, {"rounds": args.rounds, "sites": args.sites, "target_ratio": 1.15})


if __name__ == "__main__":
    main()
