"""Static checks of docker/ (no container engine needed): flags, base images, installs, mounts."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import flwr
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def _flags(program: str) -> set[str]:
    out = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=120).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


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
    assert "USER app" in text and not re.search(r"COPY .*(study|data|state|certs|keys)", text)


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


def test_node_config_paths_are_mounted(compose):
    for name, service in compose["services"].items():
        if name == "superlink":
            continue
        config = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--node-config="))
        values = dict(item.split("=", 1) for item in shlex.split(config))
        targets = {v.split(":")[1]: v for v in service["volumes"]}
        assert targets["/data"].endswith(":ro"), "site data must be mounted read-only"
        assert values["site-dir"] in targets and values["state-dir"] in targets
        key = next(a.split("=", 1)[1] for a in service["command"]
                   if a.startswith("--auth-supernode-private-key="))
        assert key in targets and f"keys/{name}" in targets[key]


def test_documented_commands_never_use_insecure():
    for path in (ROOT / "README.md", DOCKER / "compose.yaml", DOCKER / "make-certs.sh",
                 DOCKER / "client.Dockerfile", DOCKER / "server.Dockerfile"):
        assert "--insecure" not in path.read_text(), path
