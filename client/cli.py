"""Site tools that run inside a hospital with no server: ``fedseg check``, ``predict``, ``privacy``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedseg.client.predict import predict_folder
from fedseg.client.privacy import LEDGER_FILE, PrivacyLedger
from fedseg.common.data import check_site


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    """Register the site commands on the ``fedseg`` parser."""
    check = sub.add_parser("check", help="validate site folders against the data contract")
    check.add_argument("site_dirs", nargs="+", metavar="SITE_DIR")
    check.set_defaults(func=run_check)
    predict = sub.add_parser("predict", help="segment a folder of images with the global model "
                             "and this site's local layers")
    predict.add_argument("images_dir", metavar="IMAGES_DIR")
    predict.add_argument("out_dir", metavar="OUT_DIR")
    predict.add_argument("--model", required=True, help="model/global.pt of a run")
    predict.add_argument("--state-dir", default=None, help="this site's state dir (local layers)")
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(func=run_predict)
    privacy = sub.add_parser("privacy", help="print a site's privacy ledger in plain words")
    privacy.add_argument("state_dir", metavar="STATE_DIR")
    privacy.add_argument("--max-epsilon", type=float, default=None,
                         help="the site's budget, to show what is left")
    privacy.set_defaults(func=run_privacy)


def run_check(args: argparse.Namespace) -> int:
    """Print every problem with its file; exit code 0 only when every site is clean."""
    failed = 0
    for site_dir in args.site_dirs:
        problems = check_site(site_dir)
        if problems:
            failed += 1
            print(f"{site_dir}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{site_dir}: OK")
    sys.stdout.flush()
    return 1 if failed else 0


def run_privacy(args: argparse.Namespace) -> int:
    """Explain the ledger: epsilon and delta spent, rounds, steps, noise, budget left."""
    path = Path(args.state_dir) / LEDGER_FILE
    if not path.is_file():
        print(f"{path}: no privacy ledger (this site has not trained with dp=sample)")
        return 1
    ledger = PrivacyLedger(args.state_dir)
    rounds = ledger.data["rounds"]
    if not rounds:
        print(f"{path}: ledger is empty: no DP training yet, epsilon 0")
        return 0
    delta = rounds[-1]["delta"]
    epsilon = ledger.epsilon(delta)
    steps = sum(r["steps"] for r in rounds)
    print(f"privacy ledger {path}")
    print(f"  spent: epsilon = {epsilon:.4f} at delta = {delta:g}  (Opacus RDP accountant, "
          f"record-level: one case = one patient)")
    print(f"  {len(rounds)} training round(s), {steps} DP-SGD steps")
    for r in rounds:
        print(f"    round {r['round']}: {r['steps']} steps, sample rate {r['sample_rate']:.3g}, "
              f"noise x{r['noise_multiplier']:.3g}, clip {r['max_grad_norm']:g} -> epsilon {r['epsilon']:.4f}")
    if args.max_epsilon is not None:
        left = args.max_epsilon - epsilon
        print(f"  budget: max-epsilon {args.max_epsilon:g}, left {max(left, 0):.4f}"
              + ("  (EXHAUSTED)" if left <= 0 else ""))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Segment every image in IMAGES_DIR; print seconds per case."""
    done = predict_folder(args.model, args.state_dir, args.images_dir, args.out_dir, args.device)
    for target, seconds in done:
        print(f"{target}  {seconds:.2f}s")
    total = sum(s for _, s in done)
    print(f"{len(done)} case(s), {total / len(done):.2f}s per case")
    return 0
