"""Site training throughput (patches/s): fedseg's training loop vs a plain MONAI loop, same device,
model, patch size, batch and data, with mixed precision off and on; and seconds per case of
whole-volume sliding-window inference.

Usage: python -m benchmarks.gpu_throughput [--device cuda --patch-size 96 --channels 32,64,128,256
       --size 128 --cases 8 --batch-size 2 --steps 40 --amp off,bf16]
Needs no Flower (the device machine has none): it times ``client/trainer.train_local``, the loop a
site runs inside every train message. Issue #13's target: fedseg >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss

from benchmarks.common import report
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.data import read_site
from fedseg.common.transforms import eval_transforms, to_dicts, train_transforms
from fedseg.common.models import ModelSpec, build_model
from fedseg.common.precision import site_precision
from fedseg.simulations.synth import write_study


def plain_loop(spec, cases, mspec: ModelSpec, args, device: str, amp: str) -> float:
    """Seconds for ``args.steps`` steps of the textbook MONAI loop (after one warm-up step)."""
    precision = site_precision(amp, device)
    data = CacheDataset(to_dicts(cases), transform=train_transforms(spec, args.patch_size), progress=False)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(mspec).to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = precision.scaler()
    done, started = -1, 0.0
    while done < args.steps:
        for batch in loader:
            if done == 0:
                _sync(device)
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            done += 1
            if done >= args.steps:
                break
    _sync(device)
    return time.perf_counter() - started


def fedseg_loop(spec, cases, mspec: ModelSpec, args, device: str, amp: str) -> float:
    """Seconds for the same number of steps in fedseg's own loop (one warm-up epoch subtracted)."""
    task, precision = task_for(mspec), site_precision(amp, device)
    torch.manual_seed(0)
    model = build_model(mspec)
    epoch_steps = -(-len(cases) // args.batch_size)
    epochs = max(1, args.steps // epoch_steps)
    options = dict(batch_size=args.batch_size, lr=0.01, patch_size=args.patch_size, seed=0, device=device,
                   precision=precision, cache_mb=4096)
    train_local(model, task, spec, cases, epochs=1, **options)  # warm-up: decode, kernels, cache
    _sync(device)
    started = time.perf_counter()
    train_local(model, task, spec, cases, epochs=epochs, **options)
    _sync(device)
    return (time.perf_counter() - started) * args.steps / (epochs * epoch_steps)


def inference_seconds(spec, cases, mspec: ModelSpec, args, device: str, amp: str) -> float:
    """Seconds per whole case by sliding windows of the patch size (after one warm-up case)."""
    precision = site_precision(amp, device)
    model = build_model(mspec).to(device).eval()
    images = [eval_transforms(spec)(item)["image"][None].to(device) for item in to_dicts(cases[:3])]
    roi = (args.patch_size,) * spec.spatial_dims
    with torch.no_grad(), precision.autocast():
        sliding_window_inference(images[0], roi, 4, model, overlap=0.25)
        _sync(device)
        started = time.perf_counter()
        for image in images:
            sliding_window_inference(image, roi, 4, model, overlap=0.25)
        _sync(device)
    return (time.perf_counter() - started) / len(images)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch-size", type=int, default=96)
    parser.add_argument("--channels", default="32,64,128,256")
    parser.add_argument("--size", type=int, default=128, help="edge of the synthetic 3D volumes")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--amp", default="off,bf16")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedseg-gpu-"))
    (site_dir,) = write_study(work, sites=1, dims=3, cases=args.cases, size=args.size, seed=0)
    spec = read_site(site_dir)
    cases = list(spec.training)
    mspec = ModelSpec(3, 1, spec.num_classes, tuple(int(c) for c in args.channels.split(",")), "instance")
    rows = []
    for amp in args.amp.split(","):
        plain = plain_loop(spec, cases, mspec, args, args.device, amp)
        ours = fedseg_loop(spec, cases, mspec, args, args.device, amp)
        patches = args.steps * args.batch_size
        rows.append({"device": args.device, "amp": amp, "plain MONAI patches/s": patches / plain,
                     "fedseg patches/s": patches / ours, "fedseg / plain": plain / ours,
                     "inference s/case": inference_seconds(spec, cases, mspec, args, args.device, amp)})
    report(f"gpu_throughput_{args.device.replace(':', '')}", rows,
           {"patch_size": args.patch_size, "channels": args.channels, "volume": args.size,
            "batch_size": args.batch_size, "steps": args.steps, "target": ">= 0.9x the plain loop"})


if __name__ == "__main__":
    main()
