"""Bytes each site sends and receives per round vs the float32 size of the shared parameters.

Usage: python -m benchmarks.comm
Runs three real rounds in Flower's simulation for each local-layers mode and transfer precision
(`transfer-dtype`) with a 4-level U-Net, reads the bytes that rounds.jsonl recorded from the
actual messages of the last round, and the final mean validation Dice.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import report
from fedseg.common.logs import setup_logging
from fedseg.common.config import RunConfig
from fedseg.common.models import ModelSpec, build_model, local_keys
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study


def main() -> None:
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="fedseg-comm-"))
    write_study(work / "study", sites=2, dims=2, cases=6, size=64, seed=0)
    rows = []
    for layers, dtype in (("none", "float32"), ("norm", "float32"), ("norm", "float16")):
        cfg = RunConfig(study_dir=str(work / "study"), output_dir=str(work / "runs"),
                        run_name=f"{layers}-{dtype}", num_server_rounds=3, local_epochs=2, lr=0.05,
                        patch_size=64, channels=(16, 32, 64, 128), local_layers=layers,
                        transfer_dtype=dtype, seed=0)
        run_dir = simulate(cfg, num_cpus=2)
        record = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()][-1]
        dice = json.loads((run_dir / "summary.json").read_text())["in_federation"]["mean"]
        spec = ModelSpec(2, 1, 3, cfg.channels, cfg.norm)
        model = build_model(spec)
        local = local_keys(model, spec, layers)
        shared = {k: v for k, v in model.state_dict().items() if k not in local}
        float32 = sum(v.numel() * 4 for v in shared.values())
        for site, metrics in record["train"].items():
            rows.append({"local-layers": layers, "transfer-dtype": dtype, "site": site,
                         "shared tensors": len(shared), "float32 bytes": float32,
                         "bytes up": metrics["bytes-up"], "bytes down": record["bytes-down"][site],
                         "up ratio": metrics["bytes-up"] / float32,
                         "down ratio": record["bytes-down"][site] / float32, "final mean Dice": dice})
    report("comm", rows, {"target_ratio": 1.02, "model": "UNet 2D channels 16,32,64,128"})


if __name__ == "__main__":
    main()
