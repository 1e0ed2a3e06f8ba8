"""Site commands that run inside a hospital with no server: ``fedseg ingest``, ``check``,
``predict``, ``export``, ``privacy``, ``state``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the site commands on the ``fedseg`` parser."""
    ingest = sub.add_parser("ingest", help="turn a folder of DICOM studies (CT or MR series, labels as DICOM "
                            "SEG or a NIfTI mask in a series' folder) into a site folder, without patient "
                            "identifiers")
    ingest.add_argument("dicom_dir", metavar="DICOM_DIR")
    ingest.add_argument("site_dir", metavar="SITE_DIR", help="the new site folder")
    ingest.add_argument("--mapping", default=None, metavar="FILE.csv",
                        help="where the case id -> DICOM UIDs and patient ids table goes, outside the site "
                             "folder (default: SITE_DIR-dicom-ids.csv beside it); fedseg never reads it")
    ingest.set_defaults(func=run_ingest)
    check = sub.add_parser("check", help="validate site folders against the data contract, and "
                           "warn about text in them that may identify a patient")
    check.add_argument("site_dirs", nargs="+", metavar="SITE_DIR",
                       help="site folders (a study folder checks every site in it)")
    check.add_argument("--strict", action="store_true",
                       help="fail (exit 1) on identifying text too, not only on contract problems")
    check.set_defaults(func=run_check)
    predict = sub.add_parser("predict", help="segment a folder of images with the global model "
                             "and this site's local layers")
    predict.add_argument("images_dir", metavar="IMAGES_DIR")
    predict.add_argument("out_dir", metavar="OUT_DIR")
    predict.add_argument("--model", required=True,
                         help="the run's global model: RUN_DIR/model/global.pt (a checkpoint works too), "
                              "or a model.onnx written by `fedseg export` (run by ONNX Runtime)")
    predict.add_argument("--state-dir", default=None,
                         help="this site's state dir: its own local layers of that run (without it, "
                              "the site-local layers keep their initial values)")
    predict.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda or cuda:N")
    predict.add_argument("--format", choices=("nifti-png", "dicom-seg"), default="nifti-png",
                         help="nifti-png: IMAGES_DIR holds NIfTI/PNG images, one label map each; dicom-seg: "
                              "IMAGES_DIR holds DICOM studies, one DICOM SEG per CT/MR series "
                              "(OUT_DIR/<SeriesInstanceUID>.seg.dcm) referencing its images")
    predict.add_argument("--label-names", default="", metavar="NAME,NAME",
                         help="dicom-seg: the segments' names in label order (default label-1, ...)")
    predict.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                         help="mixed precision (auto: bf16/fp16 on CUDA, float32 on a CPU, the same masks as "
                              "the exported models; bf16: faster on a CPU with bf16 units)")
    predict.add_argument("--overlay", action="store_true",
                         help="also write <case>_overlay.png: the prediction in colour over the image, "
                              "for a person to look at (label files stay label maps)")
    predict.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                         help="more fedseg models whose class probabilities are averaged with --model's")
    predict.add_argument("--last-rounds", type=int, default=0, metavar="K",
                         help="add the run's last K round checkpoints (RUN_DIR/checkpoints) to the ensemble")
    predict.add_argument("--uncertainty", action="store_true",
                         help="also write <case>_uncertainty maps (per-pixel entropy of the ensemble, "
                              "or of test-time flips; same geometry as the image) and a score per case")
    predict.add_argument("--pre-annotate", action="store_true",
                         help="write pre_annotations.json: the predicted labels as a dataset.json "
                              "fragment, most uncertain case first, for annotators to correct")
    predict.add_argument("--adapt", action="store_true",
                         help="adapt the model's norm layers to these images first (a hospital that "
                              "never trained: BatchNorm statistics + a few entropy-minimization steps; "
                              "no label is read, the model files are not changed)")
    predict.set_defaults(func=run_predict)
    export = sub.add_parser("export", help="write the global model + this site's local layers as an "
                            "ONNX graph (checked against PyTorch) for ONNX Runtime or another platform, "
                            "or as a MONAI Bundle for MONAI Label and MONAI Deploy")
    export.add_argument("model", metavar="MODEL", help="RUN_DIR/model/global.pt (or a checkpoint)")
    export.add_argument("--state-dir", default=None,
                        help="this site's state dir: its own local layers of that run go into the export")
    export.add_argument("--format", choices=("onnx", "monai-bundle"), default="onnx",
                        help="onnx: one graph file; monai-bundle: a bundle folder (configs/, models/) that "
                             "`python -m monai.bundle run` executes on a folder of NIfTI images")
    export.add_argument("--output", required=True, metavar="OUT",
                        help="onnx: the graph (OUT.json beside it describes it: model, patch size, check); "
                             "monai-bundle: the bundle folder")
    export.add_argument("--quantize", choices=("int8",), default=None,
                        help="onnx: write the graph quantized to int8 for fast CPU inference, calibrated on "
                             "--calibration-images and checked against the float graph")
    export.add_argument("--calibration-images", default=None, metavar="IMAGES_DIR",
                        help="with --quantize: a folder of the site's own images (unlabeled is fine)")
    export.add_argument("--label-names", default="", metavar="NAME,NAME",
                        help="monai-bundle: the foreground classes' names in label order (default label-1, ...)")
    export.set_defaults(func=run_export)
    privacy = sub.add_parser("privacy", help="print a site's privacy ledger in plain words")
    privacy.add_argument("state_dir", metavar="STATE_DIR")
    privacy.add_argument("--max-epsilon", type=float, default=None,
                         help="the site's budget, to show what is left")
    privacy.set_defaults(func=run_privacy)
    state = sub.add_parser("state", help="list (or delete) the federation runs a site keeps "
                           "local layers for; the privacy ledger is never touched")
    state.add_argument("state_dir", metavar="STATE_DIR")
    state.add_argument("--delete", metavar="RUN", action="append", default=[],
                       help="remove this run's local layers (repeatable; names as listed)")
    state.set_defaults(func=run_state)


def run_check(args: argparse.Namespace) -> int:
    """Print every problem with its file, and identifying text as warnings; exit code 0 only
    when every site is clean (with ``--strict``, also free of identifying text)."""
    folders = _site_folders(args.site_dirs)
    if all(folder is None for folder in folders):
        return 1
    from fedseg.common.data import check_site
    from fedseg.client.identifying_text import identifying_text

    failed, warned = 0, False
    for site_dir in folders:
        if site_dir is None:
            failed += 1
            continue
        problems, warnings = check_site(site_dir), identifying_text(site_dir)
        warned |= bool(warnings)
        print(f"{site_dir}: " + (f"{len(problems)} problem(s)" if problems else "OK")
              + (f", {len(warnings)} warning(s)" if warnings else ""))
        for problem in problems:
            print(f"  - {problem}")
        for warning in warnings:
            print(f"  - warning: {warning}")
        failed += bool(problems) or (args.strict and bool(warnings))
    if warned:
        print("identifying text stays at the site (fedseg never sends file names or headers); "
              "rename or scrub it before sharing these folders with anyone")
    sys.stdout.flush()
    return 1 if failed else 0


def _site_folders(paths: list[str]) -> list[Path | None]:
    """Site folders to check: a study folder stands for its sites; a missing path is reported."""
    folders: list[Path | None] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            print(f"{path}: not found", file=sys.stderr)
            folders.append(None)
        elif not (path / "dataset.json").is_file() and any(path.glob("*/dataset.json")):
            sites = sorted(p.parent for p in path.glob("*/dataset.json"))
            print(f"{path} is a study folder: checking its {len(sites)} site(s)")
            folders += sites
        else:
            folders.append(path)
    return folders


def run_privacy(args: argparse.Namespace) -> int:
    """Explain the ledger: epsilon and delta spent, rounds, steps, noise, budget left."""
    if not Path(args.state_dir).is_dir():
        print(f"{args.state_dir}: not found (a site's state dir is its node config's state-dir)",
              file=sys.stderr)
        return 1
    from fedseg.client.privacy import LEDGER_FILE, PrivacyLedger
    from fedseg.common.dp_recipe import NOISE_WARNING

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
          f"record-level: one case = one patient; every run at this site counts)")
    print(f"  {len(rounds)} training round(s), {steps} DP-SGD steps")
    for r in rounds:
        print(f"    run {r.get('run', '?')} round {r['round']}: {r['steps']} steps, sample rate "
              f"{r['sample_rate']:.3g}, noise x{r['noise_multiplier']:.3g}, clip "
              f"{r['max_grad_norm']:g} -> epsilon {r['epsilon']:.4f}"
              + ("  (noise swamped the signal)" if r.get("noise_to_signal", 0) > NOISE_WARNING else ""))
    swamped = [r for r in rounds if r.get("noise_to_signal", 0) > NOISE_WARNING]
    if swamped:
        print(f"  warning: in {len(swamped)} round(s) the noise was over {NOISE_WARNING:g} of the "
              "largest per-case signal (noise x sigma on few cases per step): the model learned "
              "little for the epsilon it spent. Record-level DP needs many cases per site; see "
              "the README (Differential privacy) for what a site with few cases can do")
    if args.max_epsilon is not None:
        left = args.max_epsilon - epsilon
        print(f"  budget: max-epsilon {args.max_epsilon:g}, left {max(left, 0):.4f}"
              + ("  (EXHAUSTED)" if left <= 0 else ""))
    return 0


def run_state(args: argparse.Namespace) -> int:
    """List the runs whose local layers the site keeps; ``--delete`` removes some."""
    from fedseg.client.state import SiteState

    state = SiteState(args.state_dir)
    if not Path(args.state_dir).is_dir():
        print(f"{args.state_dir}: no such state dir", file=sys.stderr)
        return 1
    for key in args.delete:
        try:
            print(f"deleted {state.delete_run(key)} (the privacy ledger keeps its epsilon)")
        except ValueError as err:
            print(str(err), file=sys.stderr)
            return 1
    runs = state.runs()
    if not runs:
        print(f"{args.state_dir}: no stored runs")
        return 0
    print(f"{'run':<40} {'run name':<28} {'last round':>10} {'modified':<17} {'size':>9}")
    for r in runs:
        print(f"{r.key:<40} {r.run_name:<28} {r.round:>10} {r.modified:<17} {r.bytes / 1024:>7.0f}kB")
    return 0


def run_ingest(args: argparse.Namespace) -> int:
    """Ingest DICOM into a new site folder and say what was left out and why."""
    from fedseg.client.dicom_ingest import ingest

    done = ingest(args.dicom_dir, args.site_dir, args.mapping)
    labelled = sum(1 for p in (done.site_dir / "labels").glob("*.nii.gz"))
    left = f"{len(done.skipped)} series left out:" if done.skipped else "nothing left out"
    print(f"{len(done.cases)} case(s) ingested ({labelled} labelled, {len(done.cases) - labelled} for inference "
          f"only); {left}")
    for line in done.skipped:
        print(f"  {line}")
    print(f"wrote {done.site_dir}; the case ids' DICOM UIDs and patient ids are in {done.mapping}: keep it at the "
          f"hospital (fedseg never reads it). Next: fedseg check {done.site_dir} --strict")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export, check and describe the site's model."""
    from fedseg.client.export import export_onnx

    if not Path(args.model).is_file():
        print(f"{args.model}: not found; a run writes its global model to RUN_DIR/model/global.pt",
              file=sys.stderr)
        return 2
    layers = {"site": "with this site's own local layers",
              "unseen-site": "with the federation's unseen-site norm set (this state dir holds no local "
                             "layers of that run)",
              "initial": "with initial local layers (no local layers of that run found)"}
    if args.format == "monai-bundle":
        return _export_bundle(args, layers)
    if bool(args.quantize) != bool(args.calibration_images) or (args.quantize and args.format != "onnx"):
        print("--quantize int8 goes with --calibration-images IMAGES_DIR (the site's own images) and --format onnx",
              file=sys.stderr)
        return 2
    info = export_onnx(args.model, args.state_dir, args.output, args.calibration_images)
    check = info["check"]
    patch = "x".join(map(str, info["patch_size"]))
    print(f"wrote {args.output} (+ .json): {info['model']['spatial_dims']}D U-Net, patch {patch}, "
          f"{layers.get(info['local_layers'], 'no site-local layers')}; "
          f"ONNX Runtime vs PyTorch: logits within {check['max_abs_diff']:.2g}, "
          f"{check['label_agreement']:.2%} of labels equal")
    if "int8" in info:
        print(f"quantized to int8 on {info['int8']['calibration_patches']} patches of {args.calibration_images}: "
              f"{info['int8']['label_agreement']:.2%} of their voxels keep the float graph's label")
    if info["local_layers"] == "site":
        print("the file holds this site's own local layers: keep it at the site, like its state dir")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Segment every image in IMAGES_DIR; print seconds per case."""
    from fedseg.client.predict import predict_folder
    from fedseg.client.site_model import round_checkpoints

    if not Path(args.model).is_file():
        print(f"{args.model}: not found; a run writes its global model to RUN_DIR/model/global.pt",
              file=sys.stderr)
        return 2
    if not Path(args.images_dir).is_dir():
        print(f"{args.images_dir}: not found", file=sys.stderr)
        return 2
    if args.state_dir is None:
        print("WARNING: no --state-dir: a site that trained in this run should pass it (its own "
              "local layers, e.g. its norms under FedBN); without it a FedBN model uses the "
              "federation's unseen-site norm set (add --adapt to fit it to these images)",
              file=sys.stderr)
    from fedseg.common.devices import resolve_device

    try:
        device = resolve_device(args.device, "--device")
    except ValueError as err:
        print(str(err), file=sys.stderr)
        return 2
    if args.format == "dicom-seg":
        return _predict_dicom(args, device)
    checkpoints = round_checkpoints(Path(args.model).parent.parent)
    ensemble = [Path(p) for p in args.ensemble] + (checkpoints[-args.last_rounds:] if args.last_rounds else [])
    done = predict_folder(args.model, args.state_dir, args.images_dir, args.out_dir, device,
                          overlay=args.overlay, ensemble=ensemble, uncertainty=args.uncertainty,
                          pre_annotate=args.pre_annotate, adapt=args.adapt, amp=args.amp)
    for case in done:
        score = f"  uncertainty {case.uncertainty:.4f}" if case.uncertainty is not None else ""
        print(f"{case.labels}  {case.seconds:.2f}s{score}")
    total = sum(case.seconds for case in done)
    members = (f", ensemble of {1 + len(ensemble)} models" if ensemble else "") + (
        ", norms adapted to these images" if args.adapt else "")
    print(f"{len(done)} case(s), {total / len(done):.2f}s per case{members}")
    if args.pre_annotate:
        print(f"pre-annotations, most uncertain first: {Path(args.out_dir) / 'pre_annotations.json'}")
    return 0


def _predict_dicom(args: argparse.Namespace, device: str) -> int:
    from fedseg.client.dicom_seg import predict_dicom

    if args.ensemble or args.last_rounds or args.uncertainty or args.pre_annotate or args.overlay or args.adapt:
        print("--format dicom-seg writes the model's labels as DICOM SEG; --ensemble, --last-rounds, --uncertainty, "
              "--pre-annotate, --overlay and --adapt go with --format nifti-png", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.label_names.split(",") if n.strip()] or None
    done, skipped = predict_dicom(args.model, args.state_dir, args.images_dir, args.out_dir, device, args.amp, names)
    for case in done:
        print(f"{case.labels}  ({case.image})  {case.seconds:.2f}s")
    print(f"{len(done)} series segmented" + (f"; {len(skipped)} left out:" if skipped else ""))
    for line in skipped:
        print(f"  {line}")
    return 0


def _export_bundle(args: argparse.Namespace, layers: dict[str, str]) -> int:
    from fedseg.client.bundle import RUN_NEEDS, export_bundle

    names = [n.strip() for n in args.label_names.split(",") if n.strip()] or None
    meta = export_bundle(args.model, args.state_dir, args.output, names)
    local = meta["fedseg"]["local_layers"]
    print(f"wrote the MONAI Bundle {args.output} (configs/, models/model.pt, models/model.ts): "
          f"{meta['task']}, {layers.get(local, 'no site-local layers')}")
    print(f"run it: cd {args.output} && python -m monai.bundle run --config_file configs/inference.json "
          f"--dataset_dir IMAGES_DIR --output_dir OUT_DIR  (needs {RUN_NEEDS})")
    if local == "site":
        print("the bundle holds this site's own local layers: keep it at the site, like its state dir")
    return 0
