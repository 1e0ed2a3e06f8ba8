"""Site tools that run inside a hospital with no server: ``fedseg check``."""

from __future__ import annotations

import argparse
import sys

from fedseg.common.data import check_site


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    """Register the site commands on the ``fedseg`` parser."""
    check = sub.add_parser("check", help="validate site folders against the data contract")
    check.add_argument("site_dirs", nargs="+", metavar="SITE_DIR")
    check.set_defaults(func=run_check)


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
