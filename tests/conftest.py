"""Shared fixtures: tiny synthetic studies and a fast run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.common.config import RunConfig
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


def tiny_config(study: Path, out: Path, **changes: object) -> RunConfig:
    """Smallest useful run: 2 rounds, 1 epoch, 8/16 channels, 32 px patches."""
    base = dict(study_dir=str(study), output_dir=str(out), num_server_rounds=2, local_epochs=1,
                batch_size=2, lr=0.05, patch_size=32, channels=(8, 16), seed=3)
    base.update(changes)
    return RunConfig(**base)
