"""Dice with record-level DP vs without, on real data, same command, rounds and seed.

Usage: python -m benchmarks.dp_utility [--dataset hippocampus|monuseg --sites 2 --rounds 10
       --local-epochs 2 --targets 8,4,2 --warm none,public,synthetic --public-cases 60
       --dp-set KEY=VALUE ...]

hippocampus: ``--public-cases`` seeded MSD Hippocampus cases (default 60) form a *public* site (a
disjoint split of the same data, labelled so); the others are one private site split into
``--sites`` virtual sites. ``--public-cases 0`` keeps all 260 private (~97 training volumes per
site for 2 sites, the setting of the scratch DP goal; no ``--warm public`` then).
Every DP run adds only ``dp=sample dp-target-epsilon=E`` to the non-private run's config: fedseg's
DP recipe chooses the rest (``--dp-set`` overrides it; ``--dp-set dp-target-epsilon=0 --dp-set
dp-noise-multiplier=0`` runs the recipe's clipped steps without noise, what DP's optimizer alone
reaches). ``--warm public`` starts both the non-private and the DP runs from a
model pretrained on the public site (``fedseg pretrain``), ``--warm synthetic`` from one
pretrained on a synthetic 3D study (another distribution the private sites must improve on); the
pretrained model's own Dice at the private sites (scored by the sites before round 1 of a run from
pretrained weights) is reported beside them.
monuseg: the four 2D client sites (6 training tiles each): fedseg warns that the noise swamps the
signal there (record-level DP needs many cases per site).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, report
from fedseg.common.logs import setup_logging
from fedseg.common.config import RunConfig
from fedseg.simulations.pooled import pretrain
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study

def hippocampus_split(work: Path, public_cases: int) -> tuple[Path, Path]:
    """(public site folder, private study folder): a seeded disjoint split of MSD Hippocampus,
    copied (the data contract refuses paths that leave a site folder)."""
    source = SHARED_DATA / "hippocampus" / "site-msd"
    meta = json.loads((source / "dataset.json").read_text())
    cases = list(meta["training"])
    random.Random(0).shuffle(cases)
    parts = {work / "public": cases[:public_cases], work / "private" / "site-msd": cases[public_cases:]}
    for folder, entries in parts.items():
        for sub in ("images", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for entry in entries:
            for key in ("image", "label"):
                shutil.copy(source / entry[key], folder / entry[key])
        (folder / "dataset.json").write_text(json.dumps({**meta, "training": entries, "test": []}))
    return work / "public", work / "private"


def label_dice(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each foreground label's Dice averaged over the sites (a DP model can learn one structure
    and miss another: on Hippocampus, with mirrored patches, it found the posterior part and not the
    anterior)."""
    keys = sorted({k for site in scores.values() for k in site if k.startswith("dice-")},
                  key=lambda k: int(k.removeprefix("dice-")))  # in label order, as the report
    return {f"mean {k}": sum(site[k] for site in scores.values()) / len(scores) for k in keys}


def run(label: str, init: str, cfg: RunConfig, rows: list[dict], split_site: int) -> None:
    started = time.monotonic()
    run_dir = simulate(cfg, split_site=split_site)
    summary = json.loads((run_dir / "summary.json").read_text())
    if label == "no DP" and "pretrained_alone" in summary:  # scored by the sites before round 1
        start = summary["pretrained_alone"]["in_federation"]
        rows.append({"run": "pretrained model alone", "init": init, "max epsilon spent": None,
                     "mean dice": start["mean"], "worst site dice": start["worst_dice"],
                     **label_dice(summary["pretrained_alone"]["sites"]), "s/round": None, "wall s": None})
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    dp = summary.get("record_level_dp", {})
    rows.append({"run": label, "init": init, "max epsilon spent": dp.get("max_epsilon"),
                 "mean dice": summary["in_federation"]["mean"],
                 "worst site dice": summary["in_federation"]["worst_dice"],
                 **label_dice(rounds[-1]["eval"]),
                 "s/round": sum(r["seconds"] for r in rounds) / len(rounds),
                 "wall s": time.monotonic() - started})
    print(rows[-1], flush=True)


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=("hippocampus", "monuseg"), default="hippocampus")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--targets", default="8,4,2")
    parser.add_argument("--warm", default="none,public,synthetic")
    parser.add_argument("--public-cases", type=int, default=60,
                        help="Hippocampus cases held back as public data (0: all private)")
    parser.add_argument("--pretrain-epochs", type=int, default=40,
                        help="passes over the public data when pretraining")
    parser.add_argument("--dp-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config setting for the DP runs only (e.g. dp-lr=2.5), to compare "
                             "against the recipe's choice")
    args = parser.parse_args()
    raw = dict(item.split("=", 1) for item in args.dp_set)
    parsed = RunConfig.from_dict(raw)
    dp_changes = {key.replace("-", "_"): getattr(parsed, key.replace("-", "_")) for key in raw}
    work = Path(tempfile.mkdtemp(prefix="fedseg-dputil-"))
    if args.dataset == "monuseg":
        study = work / "monuseg"
        for site in ("site1-breast-bladder", "site2-kidney", "site3-prostate-stomach", "site4-liver-colon"):
            shutil.copytree(SHARED_DATA / "monuseg" / site, study / site)
        shape = dict(study_dir=str(study), batch_size=2, patch_size=128)
        public, split = None, 0
    else:
        public, private = hippocampus_split(work, args.public_cases)
        public = public if args.public_cases else None
        split = args.sites
        shape = dict(study_dir=str(private), batch_size=8, patch_size=32)
    base = RunConfig(output_dir=str(work / "runs"), num_server_rounds=args.rounds,
                     local_epochs=args.local_epochs, lr=0.05, channels=(16, 32, 64),
                     local_layers="norm", seed=0, **shape)
    targets = [float(t) for t in args.targets.split(",") if t]
    rows: list[dict] = []
    for warm in args.warm.split(","):
        cfg, init = base, "scratch"
        if (warm == "synthetic" and args.dataset == "hippocampus") or (warm == "public" and public is not None):
            source = public
            if warm == "synthetic":
                source = work / "synthetic"
                write_study(source, sites=1, dims=3, cases=60, size=40, num_labels=2, seed=3)
            weights = work / f"{warm}.pt"
            pretrain(source, weights, base.replace(pretrained_weights="", num_server_rounds=1,
                                                   local_epochs=args.pretrain_epochs, val_fraction=0.1))
            init = f"warm ({warm} data)"
            cfg = base.replace(pretrained_weights=str(weights))
        elif warm != "none":
            continue
        name = warm.replace("none", "scratch")
        run("no DP", init, cfg.replace(run_name=f"nodp-{name}"), rows, split)
        for target in targets:
            dp_cfg = cfg.replace(run_name=f"dp{target:g}-{name}", dp="sample",
                                 dp_target_epsilon=target).replace(**dp_changes)
            label = (f"DP target eps {dp_cfg.dp_target_epsilon:g}" if dp_cfg.dp_target_epsilon > 0
                     else f"DP noise x{dp_cfg.dp_noise_multiplier:g}")  # --dp-set dp-target-epsilon=0
            run(label, init, dp_cfg, rows, split)
    for row in rows:
        reference = next(r for r in rows if r["init"] == row["init"] and r["run"] == "no DP")
        row["vs no DP"] = row["mean dice"] / reference["mean dice"] if reference["mean dice"] else None
    suffix = "".join(f"_{k}{v}" for k, v in raw.items())
    report(f"dp_utility_{args.dataset}_{args.sites}sites_{args.warm.replace(',', '-')}{suffix}", rows,
           {"rounds": args.rounds, "local_epochs": args.local_epochs, "delta": base.dp_delta,
            "batch_size": base.batch_size, "public_cases": args.public_cases if public else 0,
            "pretrain_epochs": args.pretrain_epochs, "dp_settings": raw,
            "goal": "scratch >= 0.60x at eps 8; warm >= 0.90x at eps 8, >= 0.80x at eps 4"})


if __name__ == "__main__":
    main()
