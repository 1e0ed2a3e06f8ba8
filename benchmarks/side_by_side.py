"""fedseg against a plain MONAI loop doing the same training work, as a user comparing frameworks
would time them: the whole command's wall clock and the peak PSS of its process tree.

Usage: python -m benchmarks.side_by_side [--dataset monuseg|hippocampus] [--runs 3] [--rounds 5]
       [--local-epochs N] [--cpus 2] [--fedseg-args "--sites-at-once 1"] [--fedseg-only]
fedseg: ``fedseg simulate`` with FedAvg, ``--local-layers none``, every round scored, report and
gallery included. monuseg: the four sites, the 14 official test tiles held out, U-Net 16..128
with one residual unit, 256 px crops, batch 8 (a site's batch is all of its training tiles when
it has fewer), 120 local epochs. hippocampus: MSD Hippocampus as 4 virtual sites
(``--split-site 4``), the last held out, U-Net 16/32/64 with one residual unit, 32^3 patches,
batch 8, 10 local epochs. Plain loop: one process on the same cores, the same network, optimizer,
training cases (the sites' own split), batches and number of steps (each site in turn, weights
averaged in memory), random NumPy crops of the decoded cases in float32, the held-out cases
scored once at the end with MONAI's sliding window and Dice. Runs alternate (plain, fedseg,
plain, ...); ratios are taken within each pair.
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

from benchmarks.common import SETTINGS, Setting, report
from benchmarks.scale import PeakMemory
from fedseg.common.config import RunConfig
from fedseg.common.data import Case, SiteSpec, read_site, split_training, study_sites
from fedseg.common.precision import Precision
from fedseg.common.round_config import epoch_steps
from fedseg.common.transforms import eval_transforms, to_dicts


VAL_FRACTION, SEED = RunConfig().val_fraction, RunConfig().seed  # fedseg's defaults: the same split


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
    """The fedseg command, timed as a whole."""
    setting, out = SETTINGS[args.dataset], tempfile.mkdtemp(prefix="fedseg-side-")
    cmd = [sys.executable, "-m", "fedseg.common.cli", "simulate", str(setting.study),
           "--channels", ",".join(map(str, setting.channels)), "--patch-size", str(setting.patch),
           "--batch-size", str(setting.batch), "--lr", str(setting.lr), "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--local-layers", "none", "--heldout-sites", setting.heldout,
           "--num-cpus", str(args.cpus), "--output-dir", out, "--run-name", "side",
           *(["--split-site", str(setting.split)] if setting.split else []), *shlex.split(args.fedseg_args)]
    wall, peak, _ = timed(cmd)
    summary = json.loads((Path(out) / "side" / "summary.json").read_text())
    return {"wall s": wall, "peak PSS GiB": peak / 2**30, "held-out Dice": summary["heldout_summary"]["mean"]}


def plain_run(args: argparse.Namespace) -> dict[str, float]:
    """The plain loop in a process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.side_by_side", "--plain-loop", "--dataset", args.dataset,
           "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--cpus", str(args.cpus)]
    wall, peak, text = timed(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return {"wall s": wall, "peak PSS GiB": peak / 2**30, "held-out Dice": json.loads(text.splitlines()[-1])["dice"]}


def plain_unet(setting: Setting, dims: int, in_channels: int, classes: int) -> torch.nn.Module:
    """The side-by-side's network, built with MONAI alone."""
    return UNet(dims, in_channels, classes, setting.channels, (2,) * (len(setting.channels) - 1), num_res_units=1,
                norm=("instance", {"affine": True}))


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                patch: int) -> tuple[np.ndarray, np.ndarray]:
    """A random ``patch``-edged crop of a channel-first case and its label (zero-padded up to the
    patch where smaller), mirrored at random along each axis: plain NumPy, no foreground balancing."""
    pad = [(0, 0)] + [(0, max(0, patch - s)) for s in image.shape[1:]]
    image, label = np.pad(image, pad), np.pad(label, pad)
    corner = [int(rng.integers(0, s - patch + 1)) for s in image.shape[1:]]
    window = (slice(None),) + tuple(slice(c, c + patch) for c in corner)
    image, label = image[window], label[window]
    for axis in range(1, image.ndim):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis)
    return image, label


def decoded_cases(spec: SiteSpec, cases: list[Case]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cases decoded and normalized once, as NumPy (image, int64 label) arrays."""
    load = eval_transforms(spec)
    return [(np.asarray(c["image"]), np.asarray(c["label"]).astype(np.int64)) for c in map(load, to_dicts(cases))]


def plain_steps(model: torch.nn.Module, cases: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                epochs: int, setting: Setting, precision: Precision | None = None) -> int:
    """``epochs`` passes of plain SGD over the cases in shuffled batches (the last of a pass may
    be smaller, as fedseg's), one random crop per case; the number of steps."""
    loss_fn, steps = DiceCELoss(to_onehot_y=True, softmax=True), 0
    opt = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=0.9)
    for _ in range(epochs):
        order = rng.permutation(len(cases))
        for start in range(0, len(cases), setting.batch):
            picked = [random_crop(rng, *cases[i], setting.patch) for i in order[start:start + setting.batch]]
            image = torch.from_numpy(np.stack([p[0] for p in picked]))
            label = torch.from_numpy(np.stack([p[1] for p in picked]))
            opt.zero_grad()
            with precision.autocast() if precision else contextlib.nullcontext():
                loss = loss_fn(model(image), label)
            loss.backward()
            opt.step()
            steps += 1
    return steps


def plain_loop(setting: Setting, rounds: int, local_epochs: int, cpus: int) -> float:
    """FedAvg as one plain MONAI/PyTorch loop; the mean held-out Dice."""
    torch.set_num_threads(cpus)
    rng = np.random.default_rng(0)
    refs = {r.name: r for r in study_sites(setting.study, setting.split)}
    sites, heldout = [], read_site(refs.pop(setting.heldout))
    for ref in refs.values():
        spec = read_site(ref)
        sites.append(decoded_cases(spec, split_training(spec, VAL_FRACTION, SEED)[0]))
    dims, channels, classes = heldout.spatial_dims, sites[0][0][0].shape[0], len(heldout.labels)

    torch.manual_seed(0)
    global_model = plain_unet(setting, dims, channels, classes)
    for _ in range(rounds):
        states, weights = [], []
        for cases in sites:
            model = plain_unet(setting, dims, channels, classes)
            model.load_state_dict(global_model.state_dict())
            model.train()
            steps = plain_steps(model, cases, rng, local_epochs, setting)
            assert steps == epoch_steps(len(cases), setting.batch, local_epochs)  # fedseg's steps
            states.append(model.state_dict())
            weights.append(len(cases))
        global_model.load_state_dict({k: sum(s[k] * w for s, w in zip(states, weights)) / sum(weights)
                                      for k in states[0]})
    global_model.eval()
    dice = DiceMetric(include_background=False)
    load = eval_transforms(heldout)
    _, scored = split_training(heldout, VAL_FRACTION, SEED)  # what fedseg scores at a held-out site

    def hot(x: torch.Tensor) -> torch.Tensor:
        return one_hot(x.long(), classes).movedim(-1, 1)

    with torch.no_grad():
        for item in to_dicts(scored):
            case = load(item)
            logits = sliding_window_inference(case["image"][None].as_tensor(), (setting.patch,) * dims, 4,
                                              global_model, 0.25)
            dice(hot(logits.argmax(1)), hot(case["label"].as_tensor()))  # label: (1, *spatial)
    return float(dice.aggregate().item())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", choices=tuple(SETTINGS), default="monuseg")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=0, help="0: the dataset's")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--fedseg-args", default="", help="more flags for fedseg simulate")
    parser.add_argument("--fedseg-only", action="store_true", help="time fedseg alone (no ratios)")
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.local_epochs = args.local_epochs or SETTINGS[args.dataset].local_epochs
    if args.plain_loop:
        print(json.dumps({"dice": plain_loop(SETTINGS[args.dataset], args.rounds, args.local_epochs, args.cpus)}))
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
    name = "side_by_side" + ("" if args.dataset == "monuseg" else f"_{args.dataset}")
    report(name + (f"_{variant}" if variant else ""), rows, {
        "fedseg wall / plain wall": spread(ratios),
        "fedseg peak PSS GiB": spread([f["peak PSS GiB"] for _, f in pairs]),
        "plain peak PSS GiB": spread([p["peak PSS GiB"] for p, _ in pairs if p]),
        "fedseg held-out Dice": spread([f["held-out Dice"] for _, f in pairs]),
        "plain held-out Dice": spread([p["held-out Dice"] for p, _ in pairs if p]),
        "settings": vars(args)})


if __name__ == "__main__":
    main()
