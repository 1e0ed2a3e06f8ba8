"""The same ServerApp/ClientApp under `flwr run . local` (Flower's own CLI and simulation runtime)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _superlinks() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _stop(pids: set[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pids & _superlinks() and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids & _superlinks():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr CLI not on PATH")
@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_flwr_run_local_writes_the_same_run_folder(model, request, tmp_path):
    before = _superlinks()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if model == "unet":
        study, extra = request.getfixturevalue("study_2d"), "patch-size=32 channels='8,16'"
    else:
        study, extra = request.getfixturevalue("study_instance"), "model='maskrcnn' norm='group' patch-size=48"
    run_config = (f"study-dir='{study}' num-server-rounds=1 output-dir='{tmp_path / 'runs'}' "
                  f"run-name='cli' {extra}")
    try:
        proc = subprocess.run(["flwr", "run", ".", "local", "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=3"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        _stop(_superlinks() - before)  # `flwr run . local` leaves its SuperLink running
    run_dir = tmp_path / "runs" / "cli"
    assert (run_dir / "summary.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert sorted(record["eval"]) == ["site-a", "site-b", "site-c"]
    if model == "maskrcnn":
        assert all({"pq", "aji", "ap50", "dice"} <= set(m) for m in record["eval"].values())
