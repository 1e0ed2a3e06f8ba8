"""fedseg against a plain MONAI loop doing the same training work, as a user comparing frameworks
would time them: the whole command's wall clock and the peak PSS of its process tree.

Usage: python -m benchmarks.side_by_side [--runs 3] [--rounds 5] [--local-epochs 120] [--cpus 2]
       [--fedseg-args "--sites-at-once 1"] [--fedseg-only]
fedseg: ``fedseg simulate`` on MoNuSeg's four sites, the 14 official test tiles held out, U-Net
16..128 with one residual unit, 256 px crops, batch 8 (a site's batch is all of its training
tiles when it has fewer), FedAvg, ``--local-layers none``, every round scored, report and
gallery included. Plain loop: one process on the same cores, the same network, optimizer,
batches and number of steps (each site in turn, weights averaged in memory), random NumPy crops
of the decoded tiles in float32, the held-out tiles scored once at the end with MONAI's sliding
window and Dice. Runs alternate (plain, fedseg, plain, ...); ratios are taken within each pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from torch.nn.functional import one_hot

from benchmarks.common import SHARED_DATA, report
from benchmarks.scale import PeakMemory
from fedseg.common.data import Case, SiteSpec, read_site, split_training, study_sites
from fedseg.common.precision import Precision
from fedseg.common.transforms import eval_transforms, to_dicts

STUDY = SHARED_DATA / "monuseg"
CHANNELS = (16, 32, 64, 128)
PATCH, BATCH, LR = 256, 8, 0.05


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; its wall seconds, the peak summed PSS of its process tree (sampled twice a
    second) and its standard output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        with PeakMemory(proc.pid) as memory:
            proc.wait()
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text[-2000:]}")
    return wall, memory.peak, text


def fedseg_run(args: argparse.Namespace) -> dict[str, float]:
    """The issue's fedseg command, timed as a whole."""
    out = tempfile.mkdtemp(prefix="fedseg-side-")
    cmd = [sys.executable, "-m", "fedseg.common.cli", "simulate", str(STUDY), "--channels", ",".join(map(str, CHANNELS)),
           "--patch-size", str(PATCH), "--batch-size", str(BATCH), "--lr", str(LR), "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--local-layers", "none", "--heldout-sites", "heldout",
           "--num-cpus", str(args.cpus), "--output-dir", out, "--run-name", "side", *shlex.split(args.fedseg_args)]
    wall, peak, _ = timed(cmd)
    summary = json.loads((Path(out) / "side" / "summary.json").read_text())
    return {"wall s": wall, "peak PSS GiB": peak / 2**30, "held-out Dice": summary["heldout_summary"]["mean"]}


def plain_run(args: argparse.Namespace) -> dict[str, float]:
    """The plain loop in a process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.side_by_side", "--plain-loop", "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--cpus", str(args.cpus)]
    wall, peak, text = timed(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return {"wall s": wall, "peak PSS GiB": peak / 2**30, "held-out Dice": json.loads(text.splitlines()[-1])["dice"]}


def plain_unet() -> torch.nn.Module:
    """The side-by-side's network, built with MONAI alone."""
    return UNet(2, 3, 2, CHANNELS, (2, 2, 2), num_res_units=1, norm=("instance", {"affine": True}))


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random PATCH x PATCH crop of a (C, H, W) tile and its label, mirrored at random along
    each axis: plain NumPy, no foreground balancing."""
    y, x = (int(rng.integers(0, s - PATCH + 1)) for s in image.shape[1:])
    image, label = image[:, y:y + PATCH, x:x + PATCH], label[:, y:y + PATCH, x:x + PATCH]
    for axis in (1, 2):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis)
    return image, label


def decoded_tiles(spec: SiteSpec, cases: list[Case]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cases decoded and normalized once, as NumPy (image, int64 label) arrays."""
    load = eval_transforms(spec)
    return [(np.asarray(c["image"]), np.asarray(c["label"]).astype(np.int64)) for c in map(load, to_dicts(cases))]


def plain_steps(model: torch.nn.Module, tiles: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                steps: int, precision: Precision | None = None) -> None:
    """``steps`` plain SGD steps on batches of random crops (at most BATCH tiles, each once)."""
    loss_fn, batch = DiceCELoss(to_onehot_y=True, softmax=True), min(BATCH, len(tiles))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(steps):
        picked = [random_crop(rng, *tiles[i]) for i in rng.permutation(len(tiles))[:batch]]
        image = torch.from_numpy(np.stack([p[0] for p in picked]))
        label = torch.from_numpy(np.stack([p[1] for p in picked]))
        opt.zero_grad()
        with precision.autocast() if precision else contextlib.nullcontext():
            loss = loss_fn(model(image), label)
        loss.backward()
        opt.step()


def plain_loop(rounds: int, local_epochs: int, cpus: int) -> float:
    """FedAvg as one plain MONAI/PyTorch loop; the mean held-out Dice."""
    torch.set_num_threads(cpus)
    rng = np.random.default_rng(0)
    refs = {r.name: r for r in study_sites(STUDY)}
    sites, heldout = [], read_site(refs.pop("heldout"))
    for ref in refs.values():
        spec = read_site(ref)
        sites.append(decoded_tiles(spec, split_training(spec, 0.2, 0)[0]))

    torch.manual_seed(0)
    global_model = plain_unet()
    for _ in range(rounds):
        states, weights = [], []
        for cases in sites:
            model = plain_unet()
            model.load_state_dict(global_model.state_dict())
            model.train()
            plain_steps(model, cases, rng, local_epochs * -(-len(cases) // min(BATCH, len(cases))))
            states.append(model.state_dict())
            weights.append(len(cases))
        global_model.load_state_dict({k: sum(s[k] * w for s, w in zip(states, weights)) / sum(weights)
                                      for k in states[0]})
    global_model.eval()
    dice = DiceMetric(include_background=False)
    load = eval_transforms(heldout)
    with torch.no_grad():
        for item in to_dicts(heldout.training + heldout.test):
            case = load(item)
            logits = sliding_window_inference(case["image"][None].as_tensor(), (PATCH, PATCH), 4, global_model, 0.25)
            pred = one_hot(logits.argmax(1), 2).permute(0, 3, 1, 2)
            dice(pred, one_hot(case["label"].as_tensor().long(), 2).permute(0, 3, 1, 2))  # label: (1, H, W)
    return float(dice.aggregate().item())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=120)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--fedseg-args", default="", help="more flags for fedseg simulate")
    parser.add_argument("--fedseg-only", action="store_true", help="time fedseg alone (no ratios)")
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        print(json.dumps({"dice": plain_loop(args.rounds, args.local_epochs, args.cpus)}))
        return
    sides = (("fedseg", fedseg_run),) if args.fedseg_only else (
        ("plain MONAI loop", plain_run), ("fedseg", fedseg_run))
    rows = []
    for run in range(1, args.runs + 1):
        for side, measure in sides:
            rows.append({"run": run, "side": side, **measure(args)})
            print(rows[-1], flush=True)
    pairs = [(p, f) for p, f in zip(rows[::2], rows[1::2])] if not args.fedseg_only else [({}, f) for f in rows]
    ratios = [f["wall s"] / p["wall s"] for p, f in pairs if p]

    def spread(values: list[float]) -> dict[str, float] | None:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    variant = "_".join(args.fedseg_args.replace("-", " ").split())
    report("side_by_side" + (f"_{variant}" if variant else ""), rows, {
        "fedseg wall / plain wall": spread(ratios),
        "fedseg peak PSS GiB": spread([f["peak PSS GiB"] for _, f in pairs]),
        "plain peak PSS GiB": spread([p["peak PSS GiB"] for p, _ in pairs if p]),
        "fedseg held-out Dice": spread([f["held-out Dice"] for _, f in pairs]),
        "plain held-out Dice": spread([p["held-out Dice"] for p, _ in pairs if p]),
        "settings": vars(args)})


if __name__ == "__main__":
    main()
