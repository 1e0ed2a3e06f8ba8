"""A site's own training curves: with node config ``tensorboard=true`` each training round's
per-step loss, its mean loss, epsilon and the scores the site computed go to TensorBoard event
files in the site's state dir (``state-dir/runs/<run>/tensorboard``). They stay at the site."""

from __future__ import annotations

import logging
from pathlib import Path

from fedseg.client.trainer import TrainResult

log = logging.getLogger(__name__)


def write_local_curves(folder: Path, server_round: int, result: TrainResult, scores: dict[str, float]) -> None:
    """Add one round to the run's curves; ``scores`` are last round's model's, scored this round.

    A site without TensorBoard installed, or whose state dir cannot take the files, logs why and
    trains on: its curves are its own record, not the run's.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("node config tensorboard=true, but TensorBoard is not installed here: "
                    "pip install 'fedseg[tracking]'")
        return
    try:
        with SummaryWriter(log_dir=str(folder / "tensorboard")) as writer:
            first = (server_round - 1) * result.steps
            for i, loss in enumerate(result.losses, start=1):
                writer.add_scalar("train/loss-per-step", loss, first + i)
            writer.add_scalar("train/loss", result.loss, server_round)
            if result.epsilon is not None:
                writer.add_scalar("train/epsilon", result.epsilon, server_round)
            for name, value in scores.items():
                writer.add_scalar(f"val/{name}", value, server_round - 1)
    except OSError as err:
        log.warning("the site's training curves of round %d were not written: %s", server_round, err)
