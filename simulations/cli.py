"""Simulation commands: ``fedseg demo``, ``synth``, ``plan``, ``simulate``, ``study``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedseg.common.config import ConfigError, RunConfig, key_help, key_metavar, keys
from fedseg.common.round_config import SITE_CACHE_MB

ALIASES = {"num-server-rounds": ["--rounds"]}
PRETRAIN_KEYS = ("num-server-rounds", "local-epochs", "batch-size", "lr", "seed", "model",
                 "backbone", "pretrained-weights", "spatial-dims", "patch-size", "channels", "norm",
                 "val-fraction")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the simulation commands on the ``fedseg`` parser."""
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
    synth.add_argument("--spacings", default="",
                       help="3D: each site's voxel size in mm, e.g. 0.6,1,1.5 (one per site); every case is then "
                            "SIZE mm across, its objects of one physical size at every site")
    synth.set_defaults(func=_synth)

    plan = sub.add_parser("plan", help="the U-Net nnU-Net would plan for the study's pooled training "
                          "cases, made from each site's fingerprint: prints it and writes plan.json")
    plan.add_argument("study_dir")
    plan.add_argument("--split-site", type=int, default=0, metavar="K",
                      help="split a study of one site into K virtual sites (default: one site per folder)")
    plan.add_argument("--heldout-sites", default="", metavar="LIST",
                      help="comma-separated sites that never train, left out of the plan")
    plan.add_argument("--memory-gb", type=float, default=8.0,
                      help="device memory the patch and batch are sized for (nnU-Net's default: 8)")
    plan.add_argument("--output", default="plan.json", help="where to write the plan (default: ./plan.json)")
    plan.set_defaults(func=_plan)

    simulate = sub.add_parser("simulate", help="run a federated study over a study folder")
    simulate.add_argument("study_dir", nargs="?", help="study folder (omit with --resume-run)")
    simulate.add_argument("--resume-run", metavar="RUN_DIR",
                          help="continue this run folder (only --rounds and --round-timeout may change)")
    simulate.add_argument("--num-cpus", type=int, default=None,
                          help="CPU cores Ray may use (default: all): fewer training sites than cores "
                               "share them out as threads, more take turns, one core each")
    simulate.add_argument("--ray-address", default="", metavar="HOST:PORT",
                          help="run the virtual sites on this running Ray cluster instead of this "
                               "machine alone (README: larger studies)")
    _engine_flags(simulate)
    _config_flags(simulate, skip=("study-dir", "resume"))
    simulate.set_defaults(func=_simulate)

    pretrain = sub.add_parser("pretrain", help="train a model on public data (a site or study "
                              "folder, no DP) for pretrained-weights: a warm start for private sites")
    pretrain.add_argument("public_dir", metavar="PUBLIC_DIR")
    pretrain.add_argument("--output", required=True, help="where to write the state dict (.pt)")
    _config_flags(pretrain, only=PRETRAIN_KEYS)
    pretrain.set_defaults(func=_pretrain)

    study = sub.add_parser("study", help="baselines side by side: local, pooled, fedavg, fedprox, fedbn")
    study.add_argument("study_dir")
    study.add_argument("--baselines", default="local,pooled,fedavg,fedprox,fedbn")
    study.add_argument("--num-cpus", type=int, default=None,
                       help="CPU cores Ray may use (default: all): fewer training sites than cores "
                            "share them out as threads, more take turns, one core each")
    study.add_argument("--ray-address", default="", metavar="HOST:PORT",
                       help="run the virtual sites on this running Ray cluster (README: larger studies)")
    _engine_flags(study)
    _config_flags(study, skip=("study-dir", "resume", "strategy", "local-layers"))
    study.set_defaults(func=_study)


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    """What only a simulation has: virtual sites from one folder, GPU share and data cache."""
    from_help = "1.0 where the run computes on a GPU, else 0"
    parser.add_argument("--split-site", type=int, default=0, metavar="K",
                        help="split a study of one site into K virtual sites (disjoint, seeded; "
                             "default: one site per folder)")
    parser.add_argument("--gpus-per-site", type=float, default=None, metavar="X",
                        help=f"GPU share of each virtual site (0.25 runs four sites on one GPU at once; "
                             f"default: {from_help})")
    parser.add_argument("--sites-at-once", type=int, default=0, metavar="N",
                        help="training sites that compute side by side, each a process of its own "
                             "(1: one at a time on every core, the least memory; default: as many as "
                             "keep the cores busy)")
    parser.add_argument("--site-cache-mb", type=int, default=SITE_CACHE_MB, metavar="N",
                        help="MiB of decoded training cases each virtual site keeps across rounds "
                             "(0: read from disk every round; default: 1024)")


def _config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None) -> None:
    """One flag per run-config key, its help from the schema: meaning, default, choices; the DP
    recipe's overrides in a group of their own (fedseg sets them well by itself)."""
    helps = key_help()
    expert = parser.add_argument_group("expert DP recipe settings (-1: fedseg's DP recipe decides)")
    for key in keys():
        if key not in skip and (only is None or key in only):
            text, is_expert = helps[key]
            (expert if is_expert else parser).add_argument(
                f"--{key}", *ALIASES.get(key, []), dest=key, default=None, metavar=key_metavar(key), help=text)


def _given(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in vars(args).items() if k in keys() and v is not None}


def _study(args: argparse.Namespace) -> int:
    from fedseg.simulations.study import run_study

    cfg = RunConfig.from_dict({**_given(args), "study-dir": args.study_dir})
    if not Path(args.study_dir).is_dir():
        raise ConfigError(f"{args.study_dir}: study folder not found")
    try:
        out = run_study(cfg, [b.strip() for b in args.baselines.split(",") if b.strip()], args.num_cpus,
                        args.ray_address, args.gpus_per_site, args.site_cache_mb, args.split_site,
                        args.sites_at_once)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print((out / "comparison.csv").read_text())
    print(f"study folder: {out}  (study.html, comparison.csv/json, cross_site.csv/json)")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from fedseg.simulations.pooled import pretrain

    result = pretrain(args.public_dir, args.output, RunConfig.from_dict(_given(args)))
    scores = ", ".join(f"{site} {dice:.3f}" for site, dice in result["validation_dice"].items())
    print(f"wrote {args.output}: trained on {result['cases']} public case(s); validation Dice {scores}")
    print(f"start a federation from it with --pretrained-weights {args.output} (public data costs "
          "no site any privacy budget)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from fedseg.simulations.synth import write_study

    try:
        sites = write_study(args.out, sites=args.sites, dims=args.dims, cases=args.cases,
                            test_cases=args.test_cases, size=args.size, num_labels=args.labels,
                            shift=args.shift, task=args.task, seed=args.seed,
                            spacings=tuple(float(v) for v in args.spacings.split(",") if v.strip()))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"wrote {len(sites)} site(s) to {args.out}: {', '.join(s.name for s in sites)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from fedseg.common.data import read_site, study_sites
    from fedseg.common.errors import DataError
    from fedseg.common.plan import describe, plan_federation, site_fingerprint, write_plan

    if not Path(args.study_dir).is_dir():
        raise ConfigError(f"{args.study_dir}: study folder not found")
    if args.memory_gb <= 0:
        raise ConfigError(f"--memory-gb {args.memory_gb:g}: must be > 0")
    heldout = {s for s in args.heldout_sites.split(",") if s}
    parts = {}
    for ref in study_sites(args.study_dir, args.split_site):
        site = read_site(ref)
        if site.name in heldout or not site.training:
            print(f"{site.name}: no training cases in the plan" + (" (held out)" if site.name in heldout else ""))
            continue
        started = time.monotonic()
        try:
            parts[site.name] = site_fingerprint(site)
        except DataError as err:  # that site is left out; the others still plan
            print(f"{site.name}: left out of the plan: {err}")
            continue
        print(f"{site.name}: fingerprint of {len(site.training)} training case(s) in {time.monotonic() - started:.1f}s")
    if not parts:
        raise DataError(f"{args.study_dir}: no site could give a fingerprint to plan from")
    plans, merged, notes = plan_federation(parts, args.memory_gb)
    for note in notes:
        print(f"warning: {note}")
    print()
    print(describe(plans, merged))
    print(f"\nwrote {write_plan(args.output, plans, merged)}")
    if f"{merged.spatial_dims}d" in plans:
        print(f"a federation trains the {merged.spatial_dims}d configuration with --model auto (the plan's batch is "
              f"for {args.memory_gb:g} GB of device memory; the run trains at its own --batch-size)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    if args.resume_run:
        from fedseg.server.run_folder import resume_config

        cfg = resume_config(args.resume_run, _given(args))
    elif args.study_dir:
        cfg = RunConfig.from_dict({**_given(args), "study-dir": args.study_dir})
        if not Path(args.study_dir).is_dir():
            raise ConfigError(f"{args.study_dir}: study folder not found")
    else:
        raise ConfigError("give a STUDY_DIR, or --resume-run RUN_DIR")
    return _run_and_report(cfg, args.num_cpus, args.ray_address, args.gpus_per_site, args.site_cache_mb,
                           args.split_site, args.sites_at_once)


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


def _run_and_report(cfg: RunConfig, num_cpus: int | None, ray_address: str = "",
                    gpus_per_site: float | None = None, site_cache_mb: int = SITE_CACHE_MB,
                    split_site: int = 0, sites_at_once: int = 0) -> int:
    from fedseg.server.report import site_table
    from fedseg.simulations.simulate import simulate

    started = time.monotonic()
    run_dir = simulate(cfg, num_cpus=num_cpus, ray_address=ray_address, gpus_per_site=gpus_per_site,
                       site_cache_mb=site_cache_mb, split_site=split_site, sites_at_once=sites_at_once)
    print()
    print(site_table(run_dir))
    print(f"\nrun folder: {run_dir}  ({time.monotonic() - started:.0f}s)")
    print(f"report: {run_dir / 'report.html'}")
    return 0
