"""Many tiny sites: seconds per round and peak memory of a fedseg simulation vs a plain loop doing
the same per-site training and evaluation in one process.

Usage: python -m benchmarks.scale [--sites 10,100,1000] [--rounds 3] [--num-cpus 1] [--no-plain]
Every site holds 4 synthetic 16 px 2D cases (3 train, 1 validate); U-Net 4/8, one local epoch of
batch 2, patch 16. The plain loop is `sim_overhead`'s (FedAvg in memory, data decoded once), with
the same per-case scores (MONAI Dice and HD95 per label) fedseg's evaluation computes;
fedseg gets ``--num-cpus`` Ray CPUs, the plain loop one thread. Peak memory is the summed
proportional set size (PSS) of the process and every process it started (Ray's included),
sampled every 0.5 s. Seconds per round, on both sides, are the mean of the rounds between the
first (which also pays for Ray's workers starting) and the last (whose model is also scored by an
evaluation message of its own); "outside rounds" is start-up, discovery and the report. ``--no-plain``
skips the plain loop (for a memory-only run at 10,000 sites; no ratio then).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import report
from benchmarks.sim_overhead import plain_monai_loop
from fedseg.common.config import RunConfig
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.logs import setup_logging
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study


class PeakMemory:
    """Largest summed PSS of a process (default: this one) and all its descendants while running."""

    def __init__(self, root: int | None = None) -> None:
        self.root = root or os.getpid()
        self.peak, self._stop = 0, threading.Event()
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), summed PSS bytes)
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            pss = sum(_pss(pid) for pid in _tree(self.root))
            self.samples.append((time.monotonic(), pss))
            self.peak = max(self.peak, pss)

    def peak_before(self, moment: float) -> int:
        """The largest sample taken before ``moment`` (``time.monotonic()``)."""
        return max((pss for t, pss in self.samples if t < moment), default=0)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _steady(seconds: list[float]) -> float:
    """Mean seconds of the rounds between the first and the last (the last alone if there are
    fewer than three)."""
    middle = seconds[1:-1] or seconds[-1:]
    return sum(middle) / len(middle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=1)
    parser.add_argument("--no-plain", action="store_true", help="fedseg only: no plain loop, no ratio")
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fedseg-scale-"))
    rows = []
    for n in (int(x) for x in args.sites.split(",")):
        study = work / f"study-{n}"
        write_study(study, sites=n, dims=2, cases=4, size=16, seed=0)
        cfg = RunConfig(study_dir=str(study), output_dir=str(work / "runs"), run_name=f"n{n}",
                        num_server_rounds=args.rounds, local_epochs=1, batch_size=2, patch_size=16,
                        channels=(4, 8), lr=0.05, min_train_sites=n, seed=0,
                        amp="off")  # the plain loop computes in float32 too
        plain_round = None
        if not args.no_plain:
            plain = plain_monai_loop(cfg, ModelSpec(2, 1, 3, cfg.channels, cfg.norm), scores=True)
            plain_round = _steady(plain.round_seconds)
        started = time.monotonic()
        with PeakMemory() as memory:
            run_dir = simulate(cfg, num_cpus=args.num_cpus)
        wall = time.monotonic() - started
        rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        per_round = _steady([r["seconds"] for r in rounds])
        rows.append({"sites": n, "fedseg s/round": per_round, "plain loop s/round": plain_round,
                     "ratio": per_round / plain_round if plain_round else None, "fedseg wall s": wall,
                     "outside rounds s": wall - sum(r["seconds"] for r in rounds),
                     "peak PSS GiB": memory.peak / 2**30})
        print(rows[-1], flush=True)
    report("scale", rows, {"rounds": args.rounds, "num_cpus": args.num_cpus,
                           "site": "4 cases of 16 px 2D, U-Net 4/8, 1 epoch batch 2"})


if __name__ == "__main__":
    main()
