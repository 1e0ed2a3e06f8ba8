"""The ``fedseg`` command: demo, synth, simulate, and the site tools (check)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedseg.client.cli import add_site_commands
from fedseg.common.config import ConfigError, RunConfig, keys
from fedseg.common.data import DataError

ALIASES = {"num-server-rounds": ["--rounds"]}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one command; errors print one clear line, never a traceback."""
    parser = argparse.ArgumentParser(prog="fedseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="synthesize a 3-site 2D study and run FedAvg+FedBN on it")
    demo.add_argument("--output-dir", default="runs")
    demo.add_argument("--rounds", type=int, default=15)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    synth = sub.add_parser("synth", help="write a synthetic multi-site study folder")
    synth.add_argument("out")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--dims", type=int, choices=(2, 3), default=2)
    synth.add_argument("--cases", type=int, default=12)
    synth.add_argument("--test-cases", type=int, default=0)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--labels", type=int, default=2, help="foreground classes (semantic)")
    synth.add_argument("--shift", type=float, default=0.5, help="domain-shift strength in [0, 1]")
    synth.add_argument("--task", choices=("semantic", "instance"), default="semantic")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)

    simulate = sub.add_parser("simulate", help="run a federated study over a study folder")
    simulate.add_argument("study_dir", nargs="?", help="study folder (omit with --resume)")
    simulate.add_argument("--resume-run", metavar="RUN_DIR", help="continue this run folder")
    simulate.add_argument("--num-cpus", type=int, default=None)
    for key in keys():
        if key not in ("study-dir", "resume"):
            simulate.add_argument(f"--{key}", *ALIASES.get(key, []), dest=key, default=None)
    simulate.set_defaults(func=_simulate)

    certs = sub.add_parser("certs", help="make TLS certificates (coordinator) or a node key (hospital)")
    certs_sub = certs.add_subparsers(dest="kind", required=True)
    server = certs_sub.add_parser("server", help="CA + SuperLink certificate")
    server.add_argument("out")
    server.add_argument("--host", action="append", required=True,
                        help="IP or DNS name the SuperLink is reached at (repeatable)")
    server.add_argument("--days", type=int, default=365)
    node = certs_sub.add_parser("node", help="a hospital SuperNode's authentication key pair")
    node.add_argument("out")
    node.add_argument("--name", required=True)
    certs.set_defaults(func=_certs)

    report = sub.add_parser("report", help="(re)write report.html and plots/ for a run folder")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=_report)

    study = sub.add_parser("study", help="baselines side by side: local, pooled, fedavg, fedprox, fedbn")
    study.add_argument("study_dir")
    study.add_argument("--baselines", default="local,pooled,fedavg,fedprox,fedbn")
    study.add_argument("--num-cpus", type=int, default=None)
    for key in keys():
        if key not in ("study-dir", "resume", "strategy", "local-layers"):
            study.add_argument(f"--{key}", *ALIASES.get(key, []), dest=key, default=None)
    study.set_defaults(func=_study)

    add_site_commands(sub)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"fedseg {args.command}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"fedseg {args.command}: {err}", file=sys.stderr)
        return 1


def _certs(args: argparse.Namespace) -> int:
    from fedseg.common.credentials import write_node_key, write_server_certificates

    if args.kind == "server":
        files = write_server_certificates(args.out, args.host, args.days)
        print("wrote " + ", ".join(str(p) for p in files.values()))
        print("keep ca.key and server.key on the coordinator; give ca.crt to every hospital")
    else:
        private, public = write_node_key(args.out, args.name)
        print(f"wrote {private} (stays at the hospital) and {public} (send to the coordinator)")
    return 0


def _study(args: argparse.Namespace) -> int:
    from fedseg.simulations.study import run_study

    given = {k: v for k, v in vars(args).items() if k in keys() and v is not None}
    cfg = RunConfig.from_dict({**given, "study-dir": args.study_dir})
    try:
        out = run_study(cfg, [b.strip() for b in args.baselines.split(",") if b.strip()], args.num_cpus)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print((out / "comparison.csv").read_text())
    print(f"study folder: {out}  (study.html, comparison.csv/json, cross_site.csv/json)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedseg.server.report import write_report
    from fedseg.simulations.gallery import make_gallery

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{run_dir}: not a finished run folder (no summary.json)")
    print(f"wrote {write_report(run_dir, gallery=make_gallery(run_dir))}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from fedseg.simulations.synth import write_study

    try:
        sites = write_study(args.out, sites=args.sites, dims=args.dims, cases=args.cases,
                            test_cases=args.test_cases, size=args.size, num_labels=args.labels,
                            shift=args.shift, task=args.task, seed=args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"wrote {len(sites)} site(s) to {args.out}: {', '.join(s.name for s in sites)}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    given = {k: v for k, v in vars(args).items() if k in keys() and v is not None}
    if args.resume_run:
        run_dir = Path(args.resume_run)
        given |= {"output-dir": str(run_dir.parent), "run-name": run_dir.name, "resume": True}
        if not (run_dir / "run.json").is_file():
            raise ConfigError(f"cannot resume: {run_dir / 'run.json'} not found")
        stored = json.loads((run_dir / "run.json").read_text())["config"]
        given = {**stored, **given}
    elif args.study_dir:
        given["study-dir"] = args.study_dir
    else:
        raise ConfigError("give a STUDY_DIR, or --resume-run RUN_DIR")
    return _run_and_report(RunConfig.from_dict(given), args.num_cpus)


def _demo(args: argparse.Namespace) -> int:
    from fedseg.simulations.synth import write_study

    study = Path(args.output_dir) / "demo-study"
    if not (study / "site-a" / "dataset.json").is_file():
        write_study(study, sites=3, dims=2, cases=16, size=64, num_labels=2, shift=0.6, seed=args.seed)
        print(f"wrote synthetic 3-site study to {study} (sites differ in contrast, noise, blur, bias field)")
    cfg = RunConfig(study_dir=str(study), num_server_rounds=args.rounds, local_epochs=5, batch_size=4,
                    lr=0.05, patch_size=48, channels=(16, 32, 64), strategy="fedavg", local_layers="norm",
                    output_dir=args.output_dir, seed=args.seed,
                    run_name=f"demo-fedbn-{time.strftime('%Y%m%d-%H%M%S')}")
    return _run_and_report(cfg, None)


def _run_and_report(cfg: RunConfig, num_cpus: int | None) -> int:
    from fedseg.server.report import site_table
    from fedseg.simulations.simulate import simulate

    started = time.monotonic()
    run_dir = simulate(cfg, num_cpus=num_cpus)
    print()
    print(site_table(run_dir))
    print(f"\nrun folder: {run_dir}  ({time.monotonic() - started:.0f}s)")
    print(f"report: {run_dir / 'report.html'}")
    return 0


def setup_logging() -> None:
    """fedseg's progress on stdout; Flower's own log only from warnings up."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s fedseg %(message)s", "%H:%M:%S"))
    root = logging.getLogger("fedseg")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.filters[:] = [_quiet_flower]


def _quiet_flower(record: logging.LogRecord) -> bool:
    # fedseg prints its own per-round progress; `fedseg simulate` is the supported entry point,
    # so Flower's notice about run_simulation being deprecated is noise here
    return record.levelno >= logging.WARNING and "DEPRECATED FEATURE" not in str(record.msg)


if __name__ == "__main__":
    sys.exit(main())
