"""Seconds per case of site inference (MONAI sliding windows over whole cases) and the Dice each
way gives, on real data: PyTorch float32, PyTorch bf16 autocast, the `fedseg export` ONNX graph in
ONNX Runtime, and `fedseg export --quantize int8`'s graph (calibrated on the first training site's
images); on a GPU also PyTorch float32 and AMP there.

Usage: python -m benchmarks.predict_latency [--dataset hippocampus|monuseg] [--epochs 20]
hippocampus: a U-Net 16/32/64 (patch 32) trained on 200 MSD Hippocampus cases, scored on the 60
cases it never saw. monuseg: a U-Net 16..128 (patch 256) trained on the four client sites' tiles,
scored on the held-out site's 1000 x 1000 tiles. Dice change is against PyTorch float32. Seconds
per case: the median over 10 cases, in 3 passes that take turns over the variants; each figure is
the median [range] of the passes, and a speed ratio is taken within each pass.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from benchmarks.common import SHARED_DATA, report
from benchmarks.dp_utility import hippocampus_split
from fedseg.client.export import OnnxNetwork, export_onnx
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site, split_training
from fedseg.common.transforms import image_transforms, to_dicts
from fedseg.common.logs import setup_logging
from fedseg.common.precision import site_precision
from fedseg.server.checkpoints import save_global_model
from fedseg.simulations.pooled import train_pooled

TIMED_CASES = 10
PASSES = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=("hippocampus", "monuseg"), default="hippocampus")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="fedseg-latency-"))
    if args.dataset == "hippocampus":
        public, private = hippocampus_split(work, 60)
        cfg = RunConfig(num_server_rounds=1, local_epochs=args.epochs, batch_size=8, lr=0.05, patch_size=32,
                        channels=(16, 32, 64), norm="instance", local_layers="none", amp="off")
        train_sites, test_site = [read_site(private / "site-msd", seed=0)], read_site(public, seed=0)
        cases = list(test_site.training)
    else:
        study = SHARED_DATA / "monuseg"
        cfg = RunConfig(num_server_rounds=1, local_epochs=args.epochs, batch_size=4, lr=0.05, patch_size=256,
                        channels=(16, 32, 64, 128), norm="batch", local_layers="none", amp="off")
        train_sites = [read_site(study / s, seed=0) for s in sorted(p.name for p in study.iterdir())
                       if (study / s / "dataset.json").is_file() and s != "heldout"]
        test_site = read_site(study / "heldout", seed=0)
        cases = split_training(test_site, cfg.val_fraction, 0)[1]
    started = time.perf_counter()
    model, task, _ = train_pooled(cfg, train_sites, seed_site="latency")
    train_s = time.perf_counter() - started
    model = model.cpu().eval()
    meta = {"model": task.spec.to_dict(), "local_layers": "none", "local_keys": [],
            "patch_size": cfg.patch_size, "run_name": "latency", "run_id": "0",
            "flip_axes": []}  # no test-time mirroring: every variant runs the same windows
    weights = save_global_model(work / "run", 1, ArrayRecord(model.state_dict()), meta)
    onnx_path = work / "model.onnx"
    export_onnx(weights, None, onnx_path)
    onnx_path, int8_path = work / "model.onnx", work / "model-int8.onnx"
    export_onnx(weights, None, onnx_path)
    int8 = export_onnx(weights, None, int8_path, calibration_images=train_sites[0].root / "images")["int8"]
    variants = {"PyTorch float32": (model, "off"), "PyTorch bf16 autocast": (model, "bf16"),
                "ONNX Runtime float32 (fedseg export)": (OnnxNetwork(onnx_path), "off"),
                "ONNX Runtime int8 (fedseg export --quantize int8)": (OnnxNetwork(int8_path), "off")}
    if torch.cuda.is_available():
        variants |= {"PyTorch float32, CUDA": (model, "off"), "PyTorch AMP, CUDA": (model, "auto")}
    images = [image_transforms(Path(item["image"]))(item["image"]) for item in to_dicts(cases[:TIMED_CASES])]
    passes: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(PASSES):  # interleaved, so a slow spell of the machine hits every variant alike
        for name, (network, amp) in variants.items():
            passes[name].append(seconds_per_case(task, network, images, cfg.patch_size, amp,
                                                 "cuda" if "CUDA" in name else "cpu"))
    rows, reference = [], None
    for name, (network, amp) in variants.items():
        device = "cuda" if "CUDA" in name else "cpu"
        with site_precision(amp, device).autocast():
            dice = task.evaluate(network, test_site, cases, patch_size=cfg.patch_size, device=device)["dice"]
        network.cpu()
        reference = dice if reference is None else reference
        speedups = [f / s for f, s in zip(passes["PyTorch float32"], passes[name])]
        rows.append({"dataset": args.dataset, "inference": name, "device": device,
                     "s/case": spread(passes[name]), "speed vs float32": spread(speedups),
                     "mean Dice": dice, "Dice change": dice - reference})
    report(f"predict_latency_{args.dataset}", rows, {
        "cases scored": len(cases), "cases timed": len(images), "passes": PASSES, "threads": torch.get_num_threads(),
        "training seconds": train_s, "epochs": args.epochs, "int8 calibration": int8,
        "passes s/case": passes})


def seconds_per_case(task, network, images: list[torch.Tensor], patch: int, amp: str, device: str) -> float:
    """Median seconds of one whole-case sliding-window inference (after one warm call)."""
    precision, seconds = site_precision(amp, device), []
    with precision.autocast():
        task.infer(network, images[0], patch, device)  # warm: the first call builds kernels
        for image in images:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            task.infer(network, image, patch, device)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def spread(values: list[float]) -> str:
    """``median [min-max]``."""
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


if __name__ == "__main__":
    main()
