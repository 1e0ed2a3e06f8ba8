"""How much of DP-SGD's largest possible signal a step gets: the alignment of clipped per-case
gradients, ||sum_i clip_C(g_i)|| / (n C), over every training case of one site, where g_i is the
mean gradient of K random patches of case i (augmentation multiplicity). 1.0: every case pulls the
same way, and only more cases or less noise can help; near 0: the cases disagree, and averaging
more patches per case (K) can still raise the signal.

Usage: python -m benchmarks.dp_alignment RUN_DIR [--patches 1,2,4,8]
       (RUN_DIR: a simulated run, e.g. the dp8-scratch run of ``benchmarks.dp_utility``; the model
       is its last round's global model with the first site's own local layers of that round,
       loaded as ``fedseg predict`` loads a site's model)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import report
from fedseg.client.site import sim_state_dir
from fedseg.client.site_model import round_checkpoints, saved_model
from fedseg.client.tasks import task_for
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.server.run_folder import RunFolder

CLIP = 0.1  # the recipe's dp-max-grad-norm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--patches", default="1,2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads((args.run_dir / "run.json").read_text())["config"]
    site = read_site(study_sites(cfg["study-dir"], RunFolder(args.run_dir).split_site())[0], seed=cfg["seed"])
    cases = split_training(site, cfg["val-fraction"], cfg["seed"])[0]
    last = round_checkpoints(args.run_dir)[-1]  # a site state dir keeps its last rounds' local layers
    model, spec, patch_size, *_ = saved_model(last, sim_state_dir(args.run_dir / "site-state", site.name))
    task = task_for(spec)
    model.train()
    data = task.training_data(site, cases, patch_size, seed=0)
    rows = []
    for k in (int(x) for x in args.patches.split(",")):
        started = time.monotonic()
        total = [torch.zeros_like(p) for p in model.parameters()]
        norms = []
        for i in range(len(cases)):
            model.zero_grad()
            task.loss(model, [data[i] for _ in range(k)], "cpu").backward()
            norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
            norms.append(norm)
            for kept, p in zip(total, model.parameters()):
                kept.add_(p.grad, alpha=min(1.0, CLIP / norm))
        signal = float(torch.sqrt(sum(t.pow(2).sum() for t in total)))
        rows.append({"patches per case": k, "cases": len(cases), "alignment": signal / (len(cases) * CLIP),
                     "median case gradient norm": sorted(norms)[len(norms) // 2],
                     "s": time.monotonic() - started})
        print(rows[-1], flush=True)
    report("dp_alignment", rows, {"run": str(args.run_dir), "checkpoint": last.name, "clip": CLIP,
                                  "site": site.name})


if __name__ == "__main__":
    main()
