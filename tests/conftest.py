"""Shared fixtures: tiny synthetic studies and a fast run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.client.state import SiteState
from fedseg.common.config import RunConfig
from fedseg.common.data import SiteSpec, read_site
from fedseg.server.run_folder import RunFolder
from fedseg.simulations.synth import write_study

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def study_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites, 2D, 6 cases of 32x32 each, 2 foreground labels."""
    out = tmp_path_factory.mktemp("study2d")
    write_study(out, sites=3, dims=2, cases=6, size=32, num_labels=2, shift=0.6, seed=1)
    return out


@pytest.fixture(scope="session")
def study_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sites, 3D NIfTI, 4 cases of 24^3."""
    out = tmp_path_factory.mktemp("study3d")
    write_study(out, sites=2, dims=3, cases=4, size=24, num_labels=1, shift=0.5, seed=2)
    return out


@pytest.fixture(scope="session")
def study_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 instance sites (nuclei-like blobs), 2D, 6 cases of 48x48 each."""
    out = tmp_path_factory.mktemp("study-instance")
    write_study(out, sites=3, dims=2, cases=6, size=48, task="instance", shift=0.5, seed=5)
    return out


@pytest.fixture()
def site(tmp_path: Path) -> SiteSpec:
    """One 2D site of 6 synthetic 32 px cases, 2 foreground labels."""
    return read_site(write_study(tmp_path / "study", sites=1, dims=2, cases=6, size=32, seed=0)[0])


def read_rounds(run_dir: Path) -> list[dict]:
    """A run's rounds.jsonl as the run folder reads it ([] before its first line)."""
    return RunFolder(run_dir).read_rounds()


def local_layers_file(state_dir: Path, run_dir: Path | None = None) -> Path | None:
    """A site's local-layers file of a run: the run of ``run_dir`` (its run.json), else the run
    ``round_message`` names (no run name, run id 0123456789abcdef); None when it has none."""
    name, run_id = "", "0123456789abcdef"
    if run_dir is not None:
        info = json.loads((run_dir / "run.json").read_text())
        name, run_id = info["config"]["run-name"], info["run_id"]
    return SiteState(state_dir).run(name, run_id).local_layers_path()


@pytest.fixture()
def server_identity():
    """Messages are created by a server process; give this one the identity Flower's runtime sets."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def tiny_config(study: Path, out: Path, **changes: object) -> RunConfig:
    """Smallest useful run: 2 rounds, 1 epoch, 8/16 channels, 32 px patches."""
    base = dict(study_dir=str(study), output_dir=str(out), num_server_rounds=2, local_epochs=1,
                batch_size=2, lr=0.05, patch_size=32, channels=(8, 16), seed=3)
    base.update(changes)
    return RunConfig(**base)


def round_message(cfg: RunConfig, spec, server_round: int = 1, run_id: str = "0123456789abcdef",
                  message_type: str = "train", extra: dict | None = None):
    """A train/evaluate message as the ServerApp sends it: the initial shared weights and the
    typed round config (plus what Flower adds, and anything a test slips in as ``extra``)."""
    import torch
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedseg.common.models import build_model, local_keys, split_state
    from fedseg.common.records import shared_record

    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    local = local_keys(model, spec, cfg.local_layers)
    shared, _ = split_state(model, local)
    config = {**cfg.site_round(spec, run_id).to_record(), "server-round": server_round, **(extra or {})}
    content = RecordDict({"arrays": shared_record(shared, local), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=7, message_type=message_type)


def node_context(site_dir: Path, state_dir: Path, **node_config: object):
    """The Context a hospital's SuperNode gives the ClientApp (its own node config)."""
    from flwr.app import Context, RecordDict

    config = {"site-dir": str(site_dir), "state-dir": str(state_dir), **node_config}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def rename_cases(site_dir: Path, prefix: str) -> None:
    """Rename a site's case files to start with ``prefix`` (e.g. a patient's name) and use it as
    their fairness group too, as a careless export would."""
    import json
    import shutil

    meta = json.loads((site_dir / "dataset.json").read_text())
    for i, entry in enumerate(meta["training"] + meta.get("test", [])):
        for key in ("image", "label"):
            new = str(Path(entry[key]).with_name(f"{prefix}_{Path(entry[key]).name}"))
            shutil.move(site_dir / entry[key], site_dir / new)
            entry[key] = new
        entry["group"] = f"{prefix}_{i % 2}"
    (site_dir / "dataset.json").write_text(json.dumps(meta))
