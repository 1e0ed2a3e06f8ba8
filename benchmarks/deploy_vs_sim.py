"""Wall time of the same 3-round run in deployment (real SuperLink/SuperNodes, TLS, node auth,
loopback) vs in Flower's simulation engine, measured in one run with the same run config on both
sides; the two runs' scores must agree.

Usage: python -m benchmarks.deploy_vs_sim
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import report
from fedseg.common.config import RunConfig
from fedseg.common.logs import setup_logging
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.deployment.federation import Federation


def main() -> None:
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="fedseg-deploy-"))
    study = work / "study"
    write_study(study, sites=2, dims=2, cases=8, size=48, seed=0)
    common = dict(num_server_rounds=3, local_epochs=2, batch_size=2, patch_size=32, channels=(8, 16, 32))
    start = time.perf_counter()
    simulate(RunConfig(study_dir=str(study), output_dir=str(work / "sim"), run_name="sim", **common))
    sim_s = time.perf_counter() - start

    fed = Federation(work / "fed")
    try:
        start = time.perf_counter()
        fed.start_superlink()
        for site in ("site-a", "site-b"):
            fed.start_supernode(site, fed.node_key(site), study / site, work / "state" / site)
        up_s = time.perf_counter() - start
        run_config = " ".join(f"{k.replace('_', '-')}={v!r}" if not isinstance(v, tuple)
                              else f"{k.replace('_', '-')}='{','.join(map(str, v))}'"
                              for k, v in common.items())
        out = fed.flwr("run", ".", "fedseg", "--stream", "--run-config",
                       f"{run_config} output-dir='{work / 'dep'}' run-name='dep'", timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        dep_s = time.perf_counter() - start
    finally:
        fed.stop()
    scores = [[json.loads(line)["eval"] for line in path.open()]
              for path in (work / "sim" / "sim" / "rounds.jsonl", work / "dep" / "dep" / "rounds.jsonl")]
    same = all(abs(sim[site]["dice"] - dep[site]["dice"]) < 1e-5 for sim, dep in zip(*scores) for site in sim)
    rows = [{"mode": "simulation (Ray, in-process)", "seconds": sim_s, "ratio": 1.0},
            {"mode": "deployment (SuperLink + 2 SuperNodes, TLS + auth)", "seconds": dep_s, "ratio": dep_s / sim_s},
            {"mode": "  of which: start SuperLink, register + start SuperNodes", "seconds": up_s,
             "ratio": up_s / sim_s}]
    report("deploy_vs_sim", rows, {"rounds": 3, "sites": 2, "same_scores": same})


if __name__ == "__main__":
    main()
