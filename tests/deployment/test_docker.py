"""Static checks of docker/ (no container engine needed): flags, base images, installs, mounts."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import flwr
import pytest
import yaml

from fedseg.client.site import NODE_CONFIG_KEYS

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def _flags(program: str) -> set[str]:
    out = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=120).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def gpu_override() -> dict:
    return yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())


@pytest.mark.parametrize("dockerfile, image, parts", [
    ("client.Dockerfile", "flwr/supernode", {"common", "client"}),  # never the coordinator's code
    ("server.Dockerfile", "flwr/superlink", {"common", "server"}),
])
def test_images_build_on_flowers_official_image_at_the_installed_version(dockerfile, image, parts):
    text = (DOCKER / dockerfile).read_text()
    assert f"FROM {image}:{flwr.__version__}" in text
    # fedseg is installed from the copied pyproject, so the image gets exactly its dependencies
    assert "COPY --chown=app:app setup.py pyproject.toml README.md ./" in text
    assert re.search(r"RUN python -m pip install --no-cache-dir \.$", text, re.M)
    copied = set(re.findall(r"^COPY --chown=app:app (\w+) \./\1$", text, re.M))
    assert copied == parts
    assert not re.search(r"COPY .*(study|data|state|certs|keys)", text)
    # every volume's mount point is created owned by the non-root user before it is declared,
    # so a named volume starts writable by the user the container runs as
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1))
    made = re.search(r"^RUN mkdir -p ([^&]+) && chown app:app ([^&]+?)( &&|$)", text, re.M)
    assert made and set(made.group(1).split()) == set(volumes) == set(made.group(2).split())
    assert text.index(made.group(0)) < text.index("USER app") < text.index("VOLUME")


HOSPITAL_ONLY = """
import importlib.abc, sys
class NoCoordinator(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("fedseg.server", "fedseg.simulations")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoCoordinator())
import fedseg.client.app
from fedseg.common.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_hospital_part_runs_without_server_and_simulations(study_2d):
    """What the client image installs (common/ + client/) imports and answers on its own."""
    def fedseg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", HOSPITAL_ONLY, *args], capture_output=True,
                              text=True, timeout=300)

    out = fedseg("check", str(study_2d / "site-a"))
    assert out.returncode == 0 and "site-a: OK" in out.stdout, out.stdout + out.stderr
    helps = fedseg("--help").stdout
    assert "simulate" not in helps and "predict" in helps and "certs" in helps, helps


def test_every_flag_in_compose_exists_in_the_installed_flower(compose):
    superlink, supernode = _flags("flower-superlink"), _flags("flower-supernode")
    for name, service in compose["services"].items():
        known = superlink if name == "superlink" else supernode
        for arg in service["command"]:
            flag = arg.split("=", 1)[0]
            assert flag in known, f"{name}: {flag} is not a flag of the installed Flower"
            assert flag != "--insecure"


def _node_config(service: dict) -> dict[str, str]:
    config = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--node-config="))
    return dict(item.split("=", 1) for item in shlex.split(config))


def test_sites_have_distinct_names_and_only_keys_fedseg_reads(compose, gpu_override):
    for services in (compose["services"], gpu_override["services"]):
        sites = {n: _node_config(s) for n, s in services.items() if n != "superlink"}
        assert len(sites) == 3
        assert sorted(c["site-name"] for c in sites.values()) == sorted(sites)  # all mount /data
        for name, config in sites.items():
            assert set(config) <= set(NODE_CONFIG_KEYS), (name, set(config) - set(NODE_CONFIG_KEYS))


def test_the_gpu_override_gives_each_site_a_gpu_and_trains_on_it(compose, gpu_override):
    supernode = _flags("flower-supernode")
    for name, service in gpu_override["services"].items():
        assert name in compose["services"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert _node_config(service)["device"] == "cuda"
        base = {k: v for k, v in _node_config(compose["services"][name]).items()}
        assert {k: v for k, v in _node_config(service).items() if k != "device"} == base
        assert all(arg.split("=", 1)[0] in supernode for arg in service["command"])


def test_node_config_paths_are_mounted(compose):
    for name, service in compose["services"].items():
        if name == "superlink":
            continue
        values = _node_config(service)
        targets = {v.split(":")[1]: v for v in service["volumes"]}
        assert targets["/data"].endswith(":ro"), "site data must be mounted read-only"
        assert values["site-dir"] in targets and values["state-dir"] in targets
        key = next(a.split("=", 1)[1] for a in service["command"]
                   if a.startswith("--auth-supernode-private-key="))
        assert key in targets and f"keys/{name}" in targets[key]


def test_documented_commands_never_use_insecure():
    for path in (ROOT / "README.md", DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml", DOCKER / "make-certs.sh",
                 DOCKER / "client.Dockerfile", DOCKER / "server.Dockerfile"):
        assert "--insecure" not in path.read_text(), path
