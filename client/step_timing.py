"""A site times a few training steps of the run's network on its own data before round 1, so that
the coordinator can say how long a round and the run will take. The network is freshly
initialized and thrown away; only the seconds per step leave the site."""

from __future__ import annotations

from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common.data import Case, SiteSpec
from fedseg.common.models import build_model
from fedseg.common.precision import site_precision
from fedseg.common.round_config import SiteRoundConfig

TIMED_STEPS = 2  # after one untimed step, which opens the cases and builds the kernels


def seconds_per_step(cfg: SiteRoundConfig, site: SiteSpec, cases: list[Case], device: str,
                     steps: int = TIMED_STEPS) -> float:
    """Seconds of one training step at the round's batch size, patch, precision and device:
    the mean of ``steps`` steps on a batch of the site's training ``cases`` (loading and cropping
    the patches excluded: a round prefetches them while it trains)."""
    task = task_for(cfg.model)
    batch = cases[: cfg.batch_size]
    precision = site_precision(cfg.amp, device, deterministic=cfg.deterministic)

    def train(epochs: int) -> tuple[float, int]:
        result = train_local(build_model(cfg.model), task, site, batch, epochs=epochs, batch_size=cfg.batch_size,
                             lr=cfg.lr, patch_size=cfg.patch_size, seed=cfg.data.seed, device=device,
                             augment=cfg.augment, cache_mb=cfg.data.site_cache_mb, flips=cfg.flip_axes,
                             precision=precision, step_memory_mb=cfg.step_memory_mb)
        return result.seconds - result.data_seconds, result.steps

    train(1)
    seconds, done = train(steps)
    return seconds / done
