"""Coordinator commands: ``fedseg report``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the coordinator commands on the ``fedseg`` parser."""
    report = sub.add_parser("report", help="(re)write report.html and plots/ for a run folder")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Rewrite a finished run's report from its files (the simulation gallery included)."""
    from fedseg.common.config import ConfigError
    from fedseg.server.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{run_dir}: not a finished run folder (no summary.json)")
    print(f"wrote {write_report(run_dir)}")
    return 0
