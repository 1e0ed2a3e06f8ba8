"""A simulated site process's memory as it answers round after round: MoNuSeg's four sites served
in turn by one process (as a Ray worker serves them), each message a round's training (20 steps
of batch 8, 256 px, U-Net 16..128) plus scoring its validation tiles, with and without handing the
freed heap back after each message (``client/memory.py``, what the ClientApp does).

Usage: python -m benchmarks.site_memory [--rounds 2] [--steps 20] [--cache-mb 1024,0]
Each variant runs in a fresh process; the figures are that process's anonymous memory (PSS) after
importing the libraries, after each message, and its peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import SHARED_DATA, report

STUDY = SHARED_DATA / "monuseg"


def _status(field: str, path: str = "/proc/self/status") -> int:
    """A kB field of /proc/self/status or smaps_rollup, in MiB."""
    with open(path) as lines:
        return next(int(line.split()[1]) // 1024 for line in lines if line.startswith(field + ":"))


def child(release: bool, cache_mb: int, rounds: int, steps: int) -> None:
    """One site process: every site in turn, ``rounds`` times; prints a JSON line of its memory."""
    import torch

    torch.set_num_threads(1)
    from fedseg.client.memory import release_freed_memory
    from fedseg.client.tasks import task_for
    from fedseg.client.trainer import train_local
    from fedseg.common.data import read_site, split_training, study_sites
    from fedseg.common.models import ModelSpec, build_model
    from fedseg.common.precision import site_precision

    libraries = _status("Pss_Anon", "/proc/self/smaps_rollup")
    sites = [read_site(s) for s in study_sites(STUDY) if s.name.startswith("site")]
    spec = ModelSpec(2, 3, 2, (16, 32, 64, 128), "instance")
    task, precision = task_for(spec), site_precision("auto", "cpu")
    after = []
    for _ in range(rounds):
        for site in sites:
            train, val = split_training(site, 0.2, 0)
            model = build_model(spec)
            train_local(model, task, site, train, epochs=steps, batch_size=8, lr=0.05, patch_size=256, seed=0,
                        cache_mb=cache_mb, precision=precision)
            task.evaluate(model, site, val, patch_size=256)
            if release:
                release_freed_memory()
            after.append(_status("Pss_Anon", "/proc/self/smaps_rollup"))
    print(json.dumps({"libraries": libraries, "after": after, "peak": _status("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-mb", default="1024,0")
    parser.add_argument("--child", nargs=2, metavar=("RELEASE", "CACHE_MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0] == "1", int(args.child[1]), args.rounds, args.steps)
        return
    rows = []
    for cache_mb in (int(c) for c in args.cache_mb.split(",")):
        for release in (False, True):
            out = subprocess.run([sys.executable, "-m", "benchmarks.site_memory", "--rounds", str(args.rounds),
                                  "--steps", str(args.steps), "--child", str(int(release)), str(cache_mb)],
                                 capture_output=True, text=True, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            rows.append({"site cache MiB": cache_mb, "freed memory handed back": "yes" if release else "no",
                         "anon MiB after import": got["libraries"], "after first message": got["after"][0],
                         "after last message": got["after"][-1], "most after a message": max(got["after"]),
                         "peak resident MiB": got["peak"]})
    report("site_memory", rows, {"rounds": args.rounds, "steps": args.steps, "messages": 4 * args.rounds})


if __name__ == "__main__":
    main()
