"""The same ServerApp/ClientApp under `flwr run` (Flower's own CLI) against a SuperLink in
simulation mode, as `flwr run . local` starts one; the test starts it itself and stops it by PID."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.deployment.federation import free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_flwr_run_completes_a_run_with_every_site_scored(model, request, tmp_path):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(  # loopback simulation runtime, like the `local` connection
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if model == "unet":
        study, extra = request.getfixturevalue("study_2d"), "patch-size=32 channels='8,16'"
    else:
        study, extra = request.getfixturevalue("study_instance"), "model='maskrcnn' norm='group' patch-size=48"
    run_config = (f"study-dir='{study}' num-server-rounds=1 output-dir='{tmp_path / 'runs'}' "
                  f"run-name='cli' {extra}")
    with open(tmp_path / "superlink.log", "wb") as log:
        superlink = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
             "--control-api-address", f"127.0.0.1:{free_port()}", "--host", "127.0.0.1",
             "--port", str(port), "--database", str(tmp_path / "state.db")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: port_open(port), 60, "the SuperLink to listen")
        proc = subprocess.run(["flwr", "run", ".", "sim", "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=3"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)  # the SuperLink and the runs it started
        superlink.wait(timeout=30)
    run_dir = tmp_path / "runs" / "cli"
    assert (run_dir / "summary.json").is_file(), (proc.stdout[-3000:] + proc.stderr[-3000:]
                                                  + (tmp_path / "superlink.log").read_text()[-3000:])
    (record,) = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert sorted(record["eval"]) == ["site-a", "site-b", "site-c"]
    expected = {"pq", "aji", "ap50", "dice"} if model == "maskrcnn" else {"dice", "hd95", "dice-1"}
    for site, scores in record["eval"].items():
        assert expected <= set(scores), site
        assert all(0.0 <= scores[k] <= 1.0 for k in expected - {"hd95"}), (site, scores)
