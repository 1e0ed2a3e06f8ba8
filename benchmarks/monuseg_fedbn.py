"""Real data: FedAvg and FedBN on the four MoNuSeg client sites vs each site training alone.

Usage: python benchmarks/monuseg_fedbn.py [--rounds 5 --local-epochs 4]
Every model is scored on each site's own validation split (seeded) and on the held-out MoNuSeg
site (official test tiles from hospitals and organs no client has).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, report
from fedseg.common.logs import setup_logging
from fedseg.common.config import RunConfig
from fedseg.simulations.simulate import simulate

SITES = ["site1-breast-bladder", "site2-kidney", "site3-prostate-stomach", "site4-liver-colon"]


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=4)
    args = parser.parse_args()
    monuseg = SHARED_DATA / "monuseg"
    work = Path(tempfile.mkdtemp(prefix="fedseg-monuseg-"))
    base = dict(num_server_rounds=args.rounds, local_epochs=args.local_epochs, batch_size=4, lr=0.05,
                patch_size=128, channels=(16, 32, 64), seed=0, output_dir=str(work / "runs"),
                heldout_sites=("heldout",))
    results: dict[str, dict[str, float | None]] = {}
    for name, layers in (("fedavg", "none"), ("fedbn", "norm")):
        run = simulate(RunConfig(study_dir=str(monuseg), local_layers=layers, run_name=name, **base))
        results[name] = _dice(run)
    for site in SITES:  # local-only: a study holding just this site and the held-out one
        study = work / f"alone-{site}"
        study.mkdir()
        for s in (site, "heldout"):
            (study / s).symlink_to(monuseg / s)
        run = simulate(RunConfig(study_dir=str(study), local_layers="norm", min_train_sites=1,
                                 run_name=f"local-{site}", **base))
        results[f"local:{site}"] = _dice(run)
    rows = []
    for site in SITES + ["heldout"]:
        row = {"site": site, "fedavg": results["fedavg"].get(site), "fedbn": results["fedbn"].get(site)}
        row["local-only"] = results[f"local:{site}"].get(site) if site in SITES else None
        rows.append(row)
    report("monuseg_fedbn", rows, {"rounds": args.rounds, "local_epochs": args.local_epochs,
                                   "metric": "validation foreground Dice, final round",
                                   "heldout_from_local_models": {s: results[f"local:{s}"].get("heldout")
                                                                 for s in SITES}})


def _dice(run_dir: Path) -> dict[str, float | None]:
    last = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()][-1]
    return {site: m.get("dice") for site, m in last["eval"].items()}


if __name__ == "__main__":
    main()
