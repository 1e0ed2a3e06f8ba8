"""fedseg's DP training recipe: what a site trains with under ``dp=sample`` where the run leaves a
setting to fedseg (-1), the DP-SGD plan of a round, and a plain check of whether the noise will
swamp the signal.

Non-private settings (batch 8, lr 0.05 with momentum 0.9) collapse under DP noise: every DP model
of the first MSD Hippocampus benchmark predicted background. The recipe keeps the round's number
of optimizer steps, but each step averages an expected third of the site's cases (Poisson
sampled), clips each case's gradient to 0.1, and takes plain SGD steps. A run that starts from
pretrained weights that score well at the sites takes 10x smaller steps (larger ones let the noise
wear the pretrained model away round by round), from weaker ones larger steps (``warm_lr``). Only
around a good start (``GOOD_START`` or more at the sites, or not scored) does the server evaluate
and save a moving average of the global model, which smooths the noise; from scratch or a weak
start the model is still climbing and an average would lag it, so there is none. Each case's
gradient is the mean over 2 random patches. The measurements behind each choice are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedseg.common.config import AUTO, RunConfig
from fedseg.common.round_config import DPSettings

ACCOUNTANT = "rdp"  # Opacus RDPAccountant (Renyi DP of the subsampled Gaussian mechanism)
BATCH_SHARE = 1 / 3  # expected cases per step, as a share of the site's cases
MAX_BATCH = 64
RECIPE = {"max_grad_norm": 0.1, "lr": 1.0, "lr_warm": 0.1, "momentum": 0.0, "patches_per_case": 2,
          "ema": 0.7}
NOISE_WARNING = 0.2  # noise std / expected batch above which the noise swamps the signal
WARM_NOISE = 0.13  # noise / signal up to which a warm start takes the full lr_warm (eps 8 here)
NO_WARM_START = 0.05  # mean Dice of pretrained weights at the sites below which they are no warm start
GOOD_START = 0.8  # mean Dice of pretrained weights at the sites from which a warm start takes lr_warm


@dataclass(frozen=True)
class DPTraining:
    """The DP-SGD training settings of a round at one site.

    Args:
        expected_batch: expected cases per step (Poisson rate = expected_batch / cases).
        steps: optimizer steps this round.
        max_grad_norm: per-case clipping norm C.
        lr: SGD learning rate.
        momentum: SGD momentum.
        patches_per_case: patches whose gradients are averaged per case before clipping.
        chosen: run-config keys whose values the recipe chose (the rest were set by the run).
    """

    expected_batch: int
    steps: int
    max_grad_norm: float
    lr: float
    momentum: float
    patches_per_case: int
    chosen: tuple[str, ...] = ()


@dataclass(frozen=True)
class DPRound:
    """The DP-SGD parameters of one round at one site, as the accountant sees them.

    Args:
        noise_multiplier: Gaussian noise std / max_grad_norm.
        max_grad_norm: per-case gradient clipping bound C.
        sample_rate: Poisson probability that a case is in a step's batch.
        steps: optimizer steps this round.
        delta: the delta epsilon is reported at.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float


def site_round(dp: DPSettings, num_cases: int, batch_size: int, epochs: int,
               planned_noise: float | None = None, lr_factor: float = 1.0) -> tuple[DPTraining, DPRound]:
    """What a site with ``num_cases`` training cases trains with in a DP round, and the round's
    plan as the accountant sees it: the one computation behind both the site's training and the
    plan the server records in run.json.

    Args:
        dp: the DP settings the server asks for.
        batch_size, epochs: the round's non-private schedule (the DP round takes as many steps).
        planned_noise: the noise this run derived from its target epsilon in an earlier round.
        lr_factor: the run's learning-rate schedule in this round (``lr-schedule``).
    """
    training = dp_training(dp, num_cases, batch_size, epochs)
    plan = plan_round(dp, num_cases, training, planned_noise)
    training = fit_to_noise(dp, training, plan)
    return replace(training, lr=training.lr * lr_factor), plan


def dp_training(dp: DPSettings, num_cases: int, batch_size: int, epochs: int) -> DPTraining:
    """The recipe for a site with ``num_cases`` training cases whose non-private round would
    take ``epochs`` passes in batches of ``batch_size``: as many steps, larger expected batches,
    smaller steps when fine-tuning pretrained weights (larger ones let the noise wipe out what
    the model knew); every setting the run gave explicitly is kept."""
    auto_steps = epochs * -(-num_cases // batch_size)
    auto_batch = min(num_cases, max(batch_size, min(MAX_BATCH, round(num_cases * BATCH_SHARE))))
    given = {"dp-batch-size": dp.batch_size, "dp-max-grad-norm": dp.max_grad_norm, "dp-lr": dp.lr,
             "dp-momentum": dp.momentum, "dp-patches-per-case": dp.patches_per_case,
             "dp-steps": dp.steps}
    recipe = {"dp-batch-size": auto_batch, "dp-max-grad-norm": RECIPE["max_grad_norm"],
              "dp-lr": warm_lr(dp.start_dice) if dp.warm_start else RECIPE["lr"],
              "dp-momentum": RECIPE["momentum"],
              "dp-patches-per-case": RECIPE["patches_per_case"], "dp-steps": auto_steps}
    value = {k: recipe[k] if v == AUTO else v for k, v in given.items()}
    return DPTraining(min(int(value["dp-batch-size"]), num_cases), int(value["dp-steps"]),
                      float(value["dp-max-grad-norm"]), float(value["dp-lr"]),
                      float(value["dp-momentum"]), int(value["dp-patches-per-case"]),
                      tuple(k for k, v in given.items() if v == AUTO))


def warm_lr(start_dice: float) -> float:
    """A warm start's learning rate by what the pretrained model scored at the sites before round
    1 (-1: not scored): lr_warm from ``GOOD_START`` up, the scratch rate at ``NO_WARM_START``,
    log-linear between: a good model needs small steps to keep what it knows, a weak one larger
    steps to improve (benchmarks/RESULTS.md, dp_utility)."""
    if start_dice < 0 or start_dice >= GOOD_START:
        return RECIPE["lr_warm"]
    share = (GOOD_START - max(start_dice, NO_WARM_START)) / (GOOD_START - NO_WARM_START)
    return RECIPE["lr_warm"] * (RECIPE["lr"] / RECIPE["lr_warm"]) ** share


def plan_round(dp: DPSettings, num_cases: int, training: DPTraining,
               planned_noise: float | None = None) -> DPRound:
    """The round's Poisson rate (expected batch / cases), steps and noise. With a target epsilon
    the noise multiplier is derived once for all planned rounds with Opacus'
    ``get_noise_multiplier`` (``planned_noise``: what this run derived before)."""
    sample_rate = training.expected_batch / num_cases
    noise = dp.noise_multiplier
    if dp.target_epsilon > 0 and planned_noise is None:
        from opacus.accountants.utils import get_noise_multiplier

        noise = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, steps=training.steps * dp.planned_rounds,
                                     accountant=ACCOUNTANT)
    elif dp.target_epsilon > 0:
        noise = planned_noise
    return DPRound(noise, training.max_grad_norm, sample_rate, training.steps, dp.delta)


def fit_to_noise(dp: DPSettings, training: DPTraining, plan: DPRound) -> DPTraining:
    """A warm start's learning rate, when the recipe chose it, shrunk in proportion to the noise
    beyond ``WARM_NOISE``: at small epsilon the noise otherwise undoes what the pretrained model
    knew (benchmarks/RESULTS.md, dp_utility)."""
    if not dp.warm_start or "dp-lr" not in training.chosen:
        return training
    return replace(training, lr=training.lr * min(1.0, WARM_NOISE / noise_to_signal(plan, training)))


def noise_to_signal(plan: DPRound, training: DPTraining) -> float:
    """Noise std on the averaged gradient relative to the largest possible per-case signal (C):
    sigma / expected batch. Above ``NOISE_WARNING`` the model learns little or nothing."""
    return plan.noise_multiplier / max(training.expected_batch, 1)


def describe(site: str, num_cases: int, training: DPTraining, plan: DPRound, dp: DPSettings) -> str:
    """One line a person can read: what the site trains with under DP, and why."""
    chosen = f" (fedseg chose {', '.join(training.chosen)})" if training.chosen else ""
    target = (f" for epsilon {dp.target_epsilon:g} over {dp.planned_rounds} round(s)"
              if dp.target_epsilon > 0 else "")
    if dp.warm_start:
        chosen += (f"; from pretrained weights that scored {dp.start_dice:.3f} at the sites"
                   if dp.start_dice >= 0 else "; from pretrained weights")
    return (f"site {site}: dp=sample, {training.steps} steps/round of ~{training.expected_batch} of "
            f"{num_cases} cases, clip {training.max_grad_norm:g}, SGD lr {training.lr:.3g} momentum "
            f"{training.momentum:g}, {training.patches_per_case} patch(es) per case{chosen}; noise "
            f"x{plan.noise_multiplier:.3g}{target}")


def warning(site: str, num_cases: int, training: DPTraining, plan: DPRound,
            warm_start: bool = False) -> str | None:
    """A plain warning when the noise will swamp the signal, with what to do about it (for a run
    from pretrained weights: what the site can expect of them)."""
    ratio = noise_to_signal(plan, training)
    if ratio <= NOISE_WARNING:
        return None
    head = (f"site {site}: with {num_cases} training cases the DP noise (x{plan.noise_multiplier:.3g} on "
            f"~{training.expected_batch} cases per step, {ratio:.2f} of the signal) will swamp what the "
            "model learns at this epsilon; record-level DP protects each case, and a site needs "
            "many cases (hundreds) for it to leave a useful model. ")
    if warm_start:
        return head + (f"fedseg takes small steps (lr {training.lr:.3g}) so that the noise does not wear "
                       "the pretrained model away: expect about its Dice, not more. Consider a larger "
                       "epsilon, more cases per site, or site-level DP (dp=client) across many sites")
    return head + ("Consider site-level DP (dp=client) across many sites, more cases per site, or a "
                   "model pretrained on public data (pretrained-weights)")


def ema_decay(cfg: RunConfig, start_dice: float = -1.0) -> float:
    """The server's moving-average decay: the run's ``dp-ema``, else the recipe's under dp=sample
    for a run from pretrained weights that scored ``GOOD_START`` or more at the sites (or were not
    scored). None from scratch or from a weaker start, where the average lags a model still
    learning."""
    if cfg.dp_ema != AUTO:
        return cfg.dp_ema
    good = start_dice < 0 or start_dice >= GOOD_START
    return RECIPE["ema"] if cfg.dp == "sample" and cfg.pretrained_weights and good else 0.0
