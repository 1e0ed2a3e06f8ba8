"""A site's state survives its disk: a full state dir fails the round with a clear reason and
leaves every file as it was (no half-written ledger or local layers); two federations that share
a state dir keep one exact ledger."""

import errno
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from fedseg.client.app import app as client_app
from fedseg.client.audit import OUTBOX_FILE
from fedseg.client.privacy import LEDGER_FILE, DPSession, PrivacyLedger
from fedseg.client.site_policy import SitePolicy
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.config import RunConfig
from fedseg.common.data import read_site
from fedseg.common.models import ModelSpec, build_model
from tests.client.test_privacy import independent_epsilon
from tests.conftest import node_context, round_message

SPEC = ModelSpec(2, 1, 3, (8, 16), "instance")
CFG = RunConfig(dp="sample", dp_noise_multiplier=1.0, channels=(8, 16), patch_size=32, batch_size=2)


def _files(folder: Path) -> dict[str, bytes]:
    """Every state file but the outbox (an append-only log, whose line of a refused write may be torn)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != OUTBOX_FILE}


def test_a_full_state_dir_fails_the_round_clearly_and_leaves_every_file_whole(site, tmp_path, monkeypatch,
                                                                             server_identity):
    state = tmp_path / "state"
    context = node_context(site.root, state)
    assert not client_app(round_message(CFG, SPEC, server_round=1), context).has_error()
    before = _files(state)

    real_fsync = os.fsync

    def full_disk(fd: int) -> None:  # the disk holding the state dir is full: every flush to it fails
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(state)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    reply = client_app(round_message(CFG, SPEC, server_round=2), context)
    assert reply.has_error()
    assert "could not be read or written" in reply.error.reason and "No space left" in reply.error.reason
    assert _files(state) == before  # the ledger and the local layers as they were, no temporary file left

    monkeypatch.setattr(os, "fsync", real_fsync)  # space again: the round runs (the ledger is not held)
    again = client_app(round_message(CFG, SPEC, server_round=2), context)
    assert not again.has_error()
    assert [r["round"] for r in json.loads((state / LEDGER_FILE).read_text())["rounds"]] == [1, 2]


def _dp_round(site_dir: str, state_dir: str, server_round: int, opened, go_on) -> None:
    """One DP round at the site in a process of its own, as a second federation's would run."""
    site = read_site(Path(site_dir))
    dp = DPSession.open(CFG.site_round(SPEC, "id").dp, SitePolicy(), Path(state_dir),
                        num_cases=len(site.training), batch_size=2, epochs=1, run=f"federation-{server_round}",
                        server_round=server_round, site=site.name)
    opened.set()
    go_on.wait(60)
    train_local(build_model(SPEC), task_for(SPEC), site, list(site.training), epochs=1, batch_size=2,
                lr=0.05, patch_size=32, seed=server_round, dp=dp)


def test_two_federations_sharing_a_state_dir_keep_one_exact_ledger(site, tmp_path):
    spawn = multiprocessing.get_context("spawn")
    state = tmp_path / "state"
    first_open, second_open, go_on = spawn.Event(), spawn.Event(), spawn.Event()
    first = spawn.Process(target=_dp_round, args=(str(site.root), str(state), 1, first_open, go_on))
    second = spawn.Process(target=_dp_round, args=(str(site.root), str(state), 2, second_open, go_on))
    first.start()
    assert first_open.wait(120)  # the first federation has planned its DP round (and read the ledger)
    second.start()
    # the second federation waits for the ledger while the first round is still open
    assert not second_open.wait(25)
    go_on.set()
    first.join(120)
    second.join(120)
    assert first.exitcode == 0 and second.exitcode == 0
    ledger = PrivacyLedger(state)
    assert [r["run"] for r in ledger.data["rounds"]] == ["federation-1", "federation-2"]
    steps = sum(r["steps"] for r in ledger.data["rounds"])
    q = ledger.data["rounds"][0]["sample_rate"]
    assert ledger.epsilon(1e-5) == pytest.approx(independent_epsilon(q, 1.0, steps, 1e-5))
