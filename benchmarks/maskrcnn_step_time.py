"""Seconds per Mask R-CNN training step (fedseg's own loop), with and without per-case DP, and
seconds to segment a whole tile, on MoNuSeg.

Usage: python -m benchmarks.maskrcnn_step_time [--device cuda] [--backbones slim,resnet50]
           [--site ../shared/data/monuseg/site1-breast-bladder]
A step is one optimizer update on ``--batch-size`` random 256 px crops (DP: a Poisson sample of
that expected size, each case's gradient clipped alone). Fixed costs (loading and caching tiles)
(loading and caching tiles, moving the model) are measured by a zero-epoch run and subtracted;
a one-epoch run first warms up the device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SHARED_DATA, report
from fedseg.client.privacy import DPSession
from fedseg.client.site_policy import SitePolicy
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.round_config import DPSettings
from fedseg.common.data import read_site
from fedseg.common.transforms import eval_transforms, to_dicts
from fedseg.common.models import ModelSpec, build_model

SPEC = {b: ModelSpec(2, 3, 2, (8, 16), "group", "maskrcnn", b, 256) for b in ("slim", "resnet50")}


def timed_run(backbone: str, site_dir: Path, batch: int, epochs: int, dp: bool, device: str) -> tuple[float, int]:
    """Wall seconds of one ``train_local`` call from a fresh model, and its optimizer steps."""
    spec = read_site(site_dir)
    cases = list(spec.training)
    steps = epochs * -(-len(cases) // batch)
    torch.manual_seed(0)
    model = build_model(SPEC[backbone])
    session = None
    if dp:
        session = DPSession.open(DPSettings("sample"), SitePolicy(), tempfile.mkdtemp(), num_cases=len(cases),
                                 batch_size=batch, epochs=epochs, run="bench", server_round=1, site=spec.name)
    _sync(device)
    start = time.perf_counter()
    train_local(model, task_for(SPEC[backbone]), spec, cases, epochs=epochs, batch_size=batch, lr=0.01,
                patch_size=256, seed=0, device=device, dp=session)
    _sync(device)
    return time.perf_counter() - start, steps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_image(backbone: str, site_dir: Path, device: str) -> float:
    spec = read_site(site_dir)
    model, task = build_model(SPEC[backbone]).to(device).eval(), task_for(SPEC[backbone])
    image = eval_transforms(spec, keep_instances=True)(to_dicts([spec.training[0]])[0])["image"]
    task.infer(model, image, 256, device)  # warm-up
    start = time.perf_counter()
    task.infer(model, image, 256, device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbones", default="slim")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs over the site's tiles")
    parser.add_argument("--site", default=str(SHARED_DATA / "monuseg" / "site1-breast-bladder"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    site, batch, device = Path(args.site), args.batch_size, args.device
    rows = []
    for backbone in args.backbones.split(","):
        timed_run(backbone, site, batch, 1, False, device)  # warm-up
        fixed, _ = timed_run(backbone, site, batch, 0, False, device)
        seconds, steps = timed_run(backbone, site, batch, args.epochs, False, device)
        plain = (seconds - fixed) / steps
        seconds, steps = timed_run(backbone, site, batch, args.epochs, True, device)
        private = (seconds - fixed) / steps
        rows.append({"backbone": backbone, "device": args.device, "s/step": plain, "DP s/step": private,
                     "DP / non-DP": private / plain,
                     "s per 1000x1000 tile (inference)": seconds_per_image(backbone, Path(args.site), args.device)})
    report(f"maskrcnn_step_time_{device}", rows, {"batch_size": batch, "crop": 256, "epochs": args.epochs,
                                                 "site": site.name, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
