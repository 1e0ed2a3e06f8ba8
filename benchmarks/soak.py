"""A long deployed federation with faults: every round completes or is resumed, every privacy
ledger agrees with the rounds its site took part in, and the long-lived processes' memory and
open files stay flat.

Usage: python -m benchmarks.soak [--rounds 200] [--sites 4] [--site-kill-every 20]
       [--coordinator-kills 2] [--warm-up 20] [--dp sample|off] [--local-layers norm|none]
       [--round-timeout 120]
Real processes on 127.0.0.1 (``flower-superlink`` with TLS and node authentication, one
``flower-supernode`` per site, ``flwr run . fedseg``), a synthetic 2D study, U-Net 8/16 (under
record-level DP with ``--dp sample``), ``min-train-sites`` = sites - 1 (a killed site's round
waits ``--round-timeout`` seconds for its lost reply). Every
``--site-kill-every`` rounds one site (in turn, all but the last, which lives through the whole
run) is killed -9 and restarted at once; ``--coordinator-kills`` times, evenly spaced, the
SuperLink with its ServerApp is killed -9 and the run resumed (``resume=true``). Each second the
script samples every long-lived process tree's PSS and open file descriptors; a process's growth is
its last sample against its sample ``--warm-up`` rounds after it started. Needs the ``flower-*``
commands on PATH (the environment fedseg is installed in).

Where the arithmetic allows it (no DP noise, no local layers a killed site may have trained
before its reply was lost), the final global model is compared with an uninterrupted simulation
of the same sequence: the same run, each site missing the rounds it missed here
(``tests.deployment.replay``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import report
from fedseg.server.checkpoints import latest_checkpoint
from fedseg.server.run_folder import RunFolder
from fedseg.simulations.synth import write_study
from tests.deployment.federation import Federation
from tests.deployment.replay import replay

RUN = "patch-size=32 channels='8,16' batch-size=2 lr=0.05 dp-noise-multiplier=1.0"


def tree_usage(pid: int) -> tuple[int, int]:
    """(PSS bytes, open file descriptors) of a process and its long-lived descendants (0, 0 if
    gone): a SuperNode's ``flwr-clientapp`` lives for one message and is left out."""
    pids, seen = [pid], set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids.extend(int(c) for c in children)
    pss = fds = 0
    for p in seen:
        try:
            if b"flwr-clientapp" in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            fds += len(list(Path(f"/proc/{p}/fd").iterdir()))
        except OSError:
            continue
    return pss, fds


class Lives:
    """Samples of every long-lived process, one life per start (a killed process's next start is
    a new life)."""

    def __init__(self) -> None:
        self.lives: list[dict] = []
        self.current: dict[str, dict] = {}

    def started(self, name: str, at_round: int) -> None:
        life = {"process": name, "from round": at_round, "samples": []}
        self.lives.append(life)
        self.current[name] = life

    def sample(self, fed: Federation, done: int) -> None:
        for name, life in self.current.items():
            proc = fed.procs.get(name)
            if proc is not None and proc.poll() is None:
                life["samples"].append((done, *tree_usage(proc.pid)))

    def rows(self, warm_up: int) -> list[dict]:
        rows = []
        for life in self.lives:
            samples = [s for s in life["samples"] if s[0] >= life["from round"] + warm_up]
            if len(samples) < 2 or samples[-1][0] == samples[0][0]:
                continue
            (r0, pss0, fd0), (r1, pss1, fd1) = samples[0], samples[-1]
            rows.append({"process": life["process"], "rounds": f"{r0}-{r1}", "PSS MiB at start": pss0 / 2**20,
                         "PSS MiB at end": pss1 / 2**20, "PSS growth %": 100 * (pss1 / pss0 - 1) if pss0 else None,
                         "fds at start": fd0, "fds at end": fd1,
                         "fd growth %": 100 * (fd1 / fd0 - 1) if fd0 else None})
        return rows


def ledger_agrees(state_dir: Path, site: str, rounds: list[dict]) -> bool:
    """Every round the run logged the site as trained is in its ledger, and epsilon never fell."""
    if not any("epsilon" in r["train"].get(site, {}) for r in rounds):
        return not (state_dir / "privacy_ledger.json").exists()  # no DP: nothing spent, nothing written
    ledger = json.loads((state_dir / "privacy_ledger.json").read_text())
    recorded = {r["round"] for r in ledger["rounds"]}
    eps = [r["epsilon"] for r in ledger["rounds"]]
    trained = [r for r in rounds if site in r["train"]]
    return ({r["round"] for r in trained} <= recorded and eps == sorted(eps)
            and all(r["train"][site]["epsilon"] <= eps[-1] + 1e-9 for r in trained))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--site-kill-every", type=int, default=20)
    parser.add_argument("--coordinator-kills", type=int, default=2)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--dp", choices=("sample", "off"), default="sample")
    parser.add_argument("--local-layers", choices=("norm", "none"), default="norm")
    parser.add_argument("--round-timeout", type=float, default=120.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-soak-"))
    sites = [p.name for p in write_study(work / "study", sites=args.sites, dims=2, cases=6, size=32, seed=0)]
    runs, run_dir = work / "runs", work / "runs" / "soak"
    fed, lives = Federation(work / "fed"), Lives()
    coordinator_at = [args.rounds * (i + 1) // (args.coordinator_kills + 1) for i in range(args.coordinator_kills)]
    site_kills = coordinator_kills = 0
    started = time.monotonic()
    try:
        fed.start_superlink()
        lives.started("superlink", 0)
        keys = {site: fed.node_key(site) for site in sites}
        for site in sites:
            fed.start_supernode(site, keys[site], work / "study" / site, work / "state" / site)
            lives.started(site, 0)
        fed.start_run(f"{RUN} num-server-rounds={args.rounds} min-train-sites={args.sites - 1} "
                      f"dp='{args.dp}' local-layers='{args.local_layers}' round-timeout={args.round_timeout} "
                      f"output-dir='{runs}' run-name='soak'")
        next_site_kill = args.site_kill_every
        while not (run_dir / "summary.json").is_file():
            found = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
            done = found[0] if found else 0
            lives.sample(fed, done)
            if coordinator_at and done >= coordinator_at[0]:
                coordinator_at.pop(0)
                fed.kill("superlink")
                fed.kill("flwr-run")
                coordinator_kills += 1
                fed.start_superlink()
                lives.started("superlink", done)
                fed.start_run(f"num-server-rounds={args.rounds} output-dir='{runs}' run-name='soak' resume=true")
            elif done >= next_site_kill and done < args.rounds:
                site = sites[site_kills % (len(sites) - 1)]
                fed.kill(site)
                site_kills += 1
                fed.restart_supernode(site, keys[site], work / "study" / site, work / "state" / site)
                lives.started(site, done)
                next_site_kill += args.site_kill_every
            if "ServerApp raised an exception" in fed.log_of("flwr-run"):
                raise RuntimeError(f"the run stopped\n{fed.logs()}")
            time.sleep(1.0)
    finally:
        fed.stop()
    rounds = RunFolder(run_dir).read_rounds()
    ledgers = {site: ledger_agrees(work / "state" / site, site, rounds) for site in sites}
    wall = time.monotonic() - started
    report("soak", lives.rows(args.warm_up), {
        "rounds planned": args.rounds, "rounds logged": len(rounds),
        "rounds in order": [r["round"] for r in rounds] == list(range(1, args.rounds + 1)),
        "site kills": site_kills, "coordinator kills": coordinator_kills,
        "rounds with a failed site": sum(1 for r in rounds if r["errors"]),
        "ledgers agree with the rounds": all(ledgers.values()), "wall s": wall,
        "final model vs uninterrupted simulation, max abs difference": replayed_difference(args, run_dir, work)})


def replayed_difference(args: argparse.Namespace, run_dir: Path, work: Path) -> float | str:
    """Largest difference between the final global model and an uninterrupted simulation's of
    the same sequence, or why the arithmetic does not allow the comparison."""
    if args.dp != "off" or args.local_layers != "none":
        return "not compared: DP noise and a killed site's local layers cannot be replayed"
    replayed = replay(run_dir, work / "study", work / "replay")
    got, want = (torch.load(d / "model" / "global.pt", weights_only=True)["state_dict"] for d in (run_dir, replayed))
    return max(float((got[k] - want[k]).abs().max()) for k in want)


if __name__ == "__main__":
    main()
