"""Seconds per case of site inference (MONAI sliding windows over whole cases) and the Dice each
way gives, on real data: PyTorch float32, PyTorch bf16 autocast, the `fedseg export` ONNX graph in
ONNX Runtime, and that graph quantized to int8 (ONNX Runtime static quantization, calibrated on
training patches); on a GPU also PyTorch float32 and AMP there.

Usage: python -m benchmarks.predict_latency [--dataset hippocampus|monuseg] [--epochs 20]
hippocampus: a U-Net 16/32/64 (patch 32) trained on 200 MSD Hippocampus cases, scored on the 60
cases it never saw. monuseg: a U-Net 16..128 (patch 256) trained on the four client sites' tiles,
scored on the held-out site's 1000 x 1000 tiles. Dice change is against PyTorch float32.
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
    model, task = train_pooled(cfg, train_sites, seed_site="latency")
    train_s = time.perf_counter() - started
    model = model.cpu().eval()
    meta = {"model": task.spec.to_dict(), "local_layers": "none", "local_keys": [],
            "patch_size": cfg.patch_size, "run_name": "latency", "run_id": "0"}
    weights = save_global_model(work / "run", 1, ArrayRecord(model.state_dict()), meta)
    onnx_path = work / "model.onnx"
    export_onnx(weights, None, onnx_path)
    int8_path = quantized(onnx_path, train_sites[0], cfg.patch_size)
    variants = {"PyTorch float32": (model, "off"), "PyTorch bf16 autocast": (model, "bf16"),
                "ONNX Runtime float32 (fedseg export)": (OnnxNetwork(onnx_path), "off"),
                "ONNX Runtime int8 (static, QDQ)": (OnnxNetwork(int8_path), "off")}
    if torch.cuda.is_available():
        variants |= {"PyTorch float32, CUDA": (model, "off"), "PyTorch AMP, CUDA": (model, "auto")}
    rows, reference = [], None
    for name, (network, amp) in variants.items():
        device = "cuda" if "CUDA" in name else "cpu"
        precision = site_precision(amp, device)
        seconds = []
        for item in to_dicts(cases):
            image = image_transforms(Path(item["image"]))(item["image"])
            with precision.autocast():
                task.infer(network, image, cfg.patch_size, device)  # warm: first call builds kernels
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                task.infer(network, image, cfg.patch_size, device)
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
            if len(seconds) == 10:
                break
        with precision.autocast():
            dice = task.evaluate(network, test_site, cases, patch_size=cfg.patch_size, device=device)["dice"]
        reference = dice if reference is None else reference
        network.cpu()
        rows.append({"dataset": args.dataset, "inference": name, "device": device,
                     "median s/case": statistics.median(seconds), "mean Dice": dice,
                     "Dice change": dice - reference})
    report(f"predict_latency_{args.dataset}", rows, {"cases scored": len(cases), "threads": torch.get_num_threads(),
                                                     "training seconds": train_s, "epochs": args.epochs})


def quantized(onnx_path: Path, site, patch: int) -> Path:
    """The graph with int8 weights and activations (ONNX Runtime static quantization, QDQ, per
    channel), calibrated on 16 random training patches of ``site``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cases = split_training(site, 0.25, 0)[0][:16]
    patches = []
    for item in to_dicts(cases):
        image = image_transforms(Path(item["image"]))(item["image"])
        corner = [max(0, (s - patch) // 2) for s in image.shape[1:]]
        window = image[(slice(None), *(slice(c, c + patch) for c in corner))]
        pad = [x for s in reversed(window.shape[1:]) for x in (0, patch - s)]
        patches.append(torch.nn.functional.pad(window, pad)[None].numpy())

    class Patches(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"image": p} for p in patches)

        def get_next(self):
            return next(self.items, None)

    prepared, out = onnx_path.with_name("prepared.onnx"), onnx_path.with_name("model-int8.onnx")
    quant_pre_process(str(onnx_path), str(prepared))
    quantize_static(str(prepared), str(out), Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


if __name__ == "__main__":
    main()
