"""What the coordinator does with broken or hostile training replies, and what its global model
is then, against the model the honest sites alone make.

Usage: python -m benchmarks.hostile_replies [--rounds 3]
A synthetic 2D study of 5 sites in Flower's simulation engine, FedAvg without local layers:
site-a and site-b are honest; as its replies leave the node, site-c's carry a NaN, site-d's a
tensor of another shape, site-e's a claim of 10^9 training cases (``tests/simulations/hostile.py``).
The same run over site-a and site-b alone is the reference. Everything is seeded: one run is the
figure.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from benchmarks.common import report
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.server.app import run_federation
from fedseg.server.run_folder import RunFolder
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.simulations.hostile import HOSTILE, hostile_app

FAULTS = {"site-c": "a NaN in one tensor", "site-d": "one tensor of another shape",
          "site-e": "num-examples = 10^9 (it has 4)"}


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-hostile-"))
    write_study(work / "study", sites=2 + len(HOSTILE), dims=2, cases=6, size=32, shift=0.5, seed=5)
    cfg = RunConfig(study_dir=str(work / "study"), output_dir=str(work / "runs"), run_name="hostile",
                    num_server_rounds=args.rounds, local_epochs=1, batch_size=2, lr=0.05, patch_size=32,
                    channels=(8, 16), local_layers="none", min_train_sites=2, seed=3)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    run_simulation(server_app=server, client_app=hostile_app, num_supernodes=2 + len(HOSTILE),
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"address": "local", "num_cpus": 2, "logging_level": "ERROR"}})
    for site in ("site-a", "site-b"):
        shutil.copytree(work / "study" / site, work / "honest" / site)
    reference = simulate(cfg.replace(study_dir=str(work / "honest"), run_name="honest"), num_cpus=2)
    run_dir = work / "runs" / "hostile"
    got, want = (torch.load(d / "model" / "global.pt", weights_only=True)["state_dict"] for d in (run_dir, reference))
    gap = max(float((got[k] - want[k]).abs().max()) for k in want)
    rounds = RunFolder(run_dir).read_rounds()
    rows = []
    for site, fault in FAULTS.items():
        refused = [r["errors"][site] for r in rounds if site in r.get("errors", {})]
        rows.append({"site": site, "fault": fault, "rounds refused": f"{len(refused)} of {len(rounds)}",
                     "the coordinator's reason": refused[0].removeprefix("reply refused: ") if refused else "-"})
    rows.append({"site": "site-a, site-b", "fault": "honest",
                 "rounds refused": f"0 of {len(rounds)}" if all(
                     sorted(r["train"]) == ["site-a", "site-b"] for r in rounds) else "some",
                 "the coordinator's reason": "-"})
    report("hostile_replies", rows, {"rounds": args.rounds,
                                     "max |global - honest sites' global|": gap,
                                     "run completed": (run_dir / "summary.json").is_file()})


if __name__ == "__main__":
    main()
