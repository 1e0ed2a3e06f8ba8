"""Where a simulated round's time goes: the sites' own timings from rounds.jsonl (loading and
cropping the patches the steps waited for, the steps themselves, scoring the training sites'
validation cases, the held-out site's scoring and its test-time adaptation), the coordinator's
checkpoint, and what is left of the cores' time (messaging, Ray, sites waiting for each other).

Usage: python -m benchmarks.round_profile [--dataset monuseg|hippocampus] [--rounds 2]
       [--local-epochs N] [--cpus 2] [--heldout-adapt final|every] [--evaluate-every K] [--amp off,bf16]
       [--site-cache-mb MB]
monuseg: the four sites + the 14 official test tiles held out, U-Net 16..128 with one residual
unit, 256 px crops, batch 8, 120 local epochs (one step per epoch at these sites: the
side-by-side with the peer framework). hippocampus: MSD Hippocampus as 4 virtual sites, the
last held out, U-Net 16/32/64, 32^3 patches, batch 8, 5 local epochs. Every part is summed over
the sites and rounds; a share is of the rounds' wall time x the cores. Peak
PSS: this process and every process it started (Ray's and the sites'), summed, sampled twice a
second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time

from benchmarks.common import SETTINGS, report
from benchmarks.scale import PeakMemory
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.common.round_config import SITE_CACHE_MB
from fedseg.simulations.simulate import simulate

PROFILE_EPOCHS = {"monuseg": 120, "hippocampus": 5}  # local epochs per round by default


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=tuple(SETTINGS), default="monuseg")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=0, help="0: the dataset's")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--heldout-adapt", default="final", choices=("final", "every"))
    parser.add_argument("--evaluate-every", type=int, default=1)
    parser.add_argument("--amp", default="auto", help="run-config amp; several (off,bf16): one run each, in turn")
    parser.add_argument("--site-cache-mb", type=int, default=SITE_CACHE_MB)
    args = parser.parse_args()
    setup_logging()
    s, epochs = SETTINGS[args.dataset], args.local_epochs or PROFILE_EPOCHS[args.dataset]
    rows, extra = [], {}
    for amp in args.amp.split(","):
        cfg = RunConfig(study_dir=str(s.study), output_dir=tempfile.mkdtemp(prefix="fedseg-profile-"),
                        run_name="profile", num_server_rounds=args.rounds, local_epochs=epochs,
                        batch_size=s.batch, lr=s.lr, channels=s.channels, patch_size=s.patch, local_layers="none",
                        heldout_sites=(s.heldout,), heldout_adapt=args.heldout_adapt,
                        evaluate_every=args.evaluate_every, amp=amp, seed=0)
        started = time.perf_counter()
        with PeakMemory() as memory, GalleryStart() as gallery:
            run_dir = simulate(cfg, num_cpus=args.cpus, split_site=s.split, site_cache_mb=args.site_cache_mb)
        wall = time.perf_counter() - started
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        parts, budget = profile(rounds, s.heldout, args.cpus)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows += [{"amp": amp, **part} for part in parts]
        extra[amp] = {
            "rounds seconds": sum(r["seconds"] for r in rounds), "whole run seconds": wall,
            "peak PSS GiB": memory.peak / 2**30, "peak PSS GiB before the gallery": memory.peak_before(gallery.at) / 2**30,
            "evaluation share": sum(p["seconds"] for p in parts if p["part"] in EVALUATION) / budget,
            "held-out Dice": summary.get("heldout_summary", {}).get("mean"),
            "in-federation Dice": summary.get("in_federation", {}).get("mean")}
    first, *others = extra
    for other in others:  # measured in this run, one after the other
        extra[f"{other} vs {first}"] = {
            "rounds seconds ratio": extra[other]["rounds seconds"] / extra[first]["rounds seconds"],
            "held-out Dice change": _change(extra, other, first, "held-out Dice"),
            "in-federation Dice change": _change(extra, other, first, "in-federation Dice")}
    report(f"round_profile_{args.dataset}", rows, {
        **extra, "rounds": args.rounds, "cpus": args.cpus, "site-cache-mb": args.site_cache_mb,
        "heldout-adapt": args.heldout_adapt,
        "evaluate-every": args.evaluate_every, "local epochs": epochs})


class GalleryStart(logging.Handler):
    """When the run's report gallery started (``time.monotonic()``; inf until it does), from
    fedseg's own log line."""

    def __init__(self) -> None:
        super().__init__()
        self.at = math.inf

    def __enter__(self) -> GalleryStart:
        logging.getLogger("fedseg").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("fedseg").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("building the report gallery") and self.at == math.inf:
            self.at = time.monotonic()


def _change(extra: dict, new: str, old: str, key: str) -> float | None:
    a, b = extra[new][key], extra[old][key]
    return None if a is None or b is None else a - b


EVALUATION = ("score training sites", "score held-out", "adapt held-out")


def profile(rounds: list[dict], heldout: str, cpus: int) -> tuple[list[dict], float]:
    """Each part's seconds summed over the sites and rounds, and its share of the rounds'
    core-seconds (wall x cores, or the parts' sum where sites shared cores); "rest" is what no
    part accounts for. Parts are summed over the
    run because a training site scores round r's model inside round r + 1's train message."""
    times = [t for r in rounds for t in r.get("time", {}).items()]
    parts = {"data wait": sum(t.get("data", 0.0) for _, t in times),
             "steps": sum(t.get("train", 0.0) - t.get("data", 0.0) for _, t in times),
             "score training sites": sum(t.get("score", 0.0) for s, t in times if s != heldout),
             "score held-out": sum(t.get("score", 0.0) for s, t in times if s == heldout),
             "adapt held-out": sum(t.get("adapt", 0.0) for s, t in times if s == heldout),
             "checkpoint (coordinator)": sum(r.get("seconds-checkpoint", 0.0) for r in rounds)}
    # sites sharing cores (more sites than cores, side by side) each count their own wall time
    budget = max(sum(r["seconds"] for r in rounds) * cpus, sum(parts.values()))
    parts["rest (messaging, Ray, idle cores)"] = budget - sum(parts.values())
    return [{"part": name, "seconds": seconds, "share": seconds / budget} for name, seconds in parts.items()], budget


if __name__ == "__main__":
    main()
