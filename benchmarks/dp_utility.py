"""Dice with record-level DP vs without, on real data, same rounds and seed.

Usage: python -m benchmarks.dp_utility [--dataset monuseg|hippocampus --rounds 5 --targets 8,4,2]
monuseg: the four 2D client sites (6 training tiles each). hippocampus: the 3D MSD set split into
two virtual sites (~97 training volumes each).
Each DP run lets every site derive its noise multiplier for a total epsilon target (delta 1e-5,
Opacus RDP); the table gives the final epsilon actually spent and the mean validation Dice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, report
from fedseg.common.config import RunConfig
from fedseg.common.cli import setup_logging
from fedseg.simulations.simulate import simulate


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--targets", default="8,4,2")
    parser.add_argument("--dataset", choices=("monuseg", "hippocampus"), default="monuseg")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-dputil-"))
    if args.dataset == "monuseg":
        study = work / "monuseg"
        study.mkdir()
        for site in ("site1-breast-bladder", "site2-kidney", "site3-prostate-stomach", "site4-liver-colon"):
            (study / site).symlink_to(SHARED_DATA / "monuseg" / site)
        shape = dict(study_dir=str(study), batch_size=2, patch_size=128)
    else:
        shape = dict(study_dir=str(SHARED_DATA / "hippocampus"), split_site=2, batch_size=8, patch_size=32)
    base = RunConfig(output_dir=str(work / "runs"), num_server_rounds=args.rounds,
                     local_epochs=args.local_epochs, lr=0.05, channels=(16, 32, 64),
                     local_layers="norm", seed=0, **shape)
    rows = []
    runs = [("no DP", base.replace(run_name="nodp"))] + [
        (f"DP target eps {t}", base.replace(run_name=f"dp{t}", dp="sample", dp_target_epsilon=float(t),
                                            dp_max_grad_norm=1.0))
        for t in args.targets.split(",")]
    for label, cfg in runs:
        summary = json.loads((simulate(cfg) / "summary.json").read_text())
        dp = summary.get("record_level_dp", {})
        rows.append({"run": label, "max epsilon spent": dp.get("max_epsilon"),
                     "mean dice": summary["in_federation"]["mean"],
                     "worst site dice": summary["in_federation"]["worst_dice"]})
    for row in rows:
        row["dice vs no DP"] = row["mean dice"] / rows[0]["mean dice"]
    report(f"dp_utility_{args.dataset}", rows, {"rounds": args.rounds, "local_epochs": args.local_epochs,
                                "delta": base.dp_delta, "batch_size": base.batch_size, "goal": 0.90})


if __name__ == "__main__":
    main()
