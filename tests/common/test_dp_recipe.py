"""The DP recipe: what fedseg chooses under dp=sample, what a run's own setting overrides, and
the plain warning for a site whose noise will swamp the signal."""

import pytest

from fedseg.common.config import AUTO, RunConfig
from fedseg.common.round_config import DPSettings
from fedseg.common.dp_recipe import (NOISE_WARNING, RECIPE, dp_training, ema_decay, noise_to_signal,
                                     plan_round, warning)


def test_recipe_keeps_the_steps_and_takes_a_third_of_the_cases_per_step():
    training = dp_training(DPSettings("sample"), num_cases=98, batch_size=8, epochs=2)
    assert training.steps == 2 * 13  # as many steps as the round without DP: 2 x ceil(98 / 8)
    assert training.expected_batch == 33  # round(98 / 3)
    assert (training.max_grad_norm, training.lr, training.momentum, training.patches_per_case) == (
        RECIPE["max_grad_norm"], RECIPE["lr"], RECIPE["momentum"], RECIPE["patches_per_case"])
    assert set(training.chosen) == {"dp-batch-size", "dp-max-grad-norm", "dp-lr", "dp-momentum",
                                    "dp-patches-per-case", "dp-steps"}
    # never fewer cases than the non-private batch, never more than the site has, at most 64
    assert dp_training(DPSettings("sample"), 6, 2, 1).expected_batch == 2
    assert dp_training(DPSettings("sample"), 500, 8, 1).expected_batch == 64
    assert dp_training(DPSettings("sample"), 3, 8, 1).expected_batch == 3


def test_a_warm_start_takes_steps_smaller_the_more_noise_there_is_unless_the_run_sets_its_rate():
    """At 75 cases, 10 rounds of 20 steps: eps 8 keeps lr_warm, eps 2 (noise x10.3 on ~25 cases)
    takes lr_warm x 0.13 / 0.41; scratch runs and an explicit dp-lr are never changed."""
    from fedseg.common.dp_recipe import WARM_NOISE, fit_to_noise

    def fitted(**given):
        dp = DPSettings("sample", target_epsilon=given.pop("eps"), planned_rounds=10, **given)
        training = dp_training(dp, num_cases=75, batch_size=8, epochs=2)
        plan = plan_round(dp, 75, training)
        return fit_to_noise(dp, training, plan), noise_to_signal(plan, training)

    (eps8, ratio8), (eps2, ratio2) = fitted(eps=8, warm_start=True), fitted(eps=2, warm_start=True)
    assert ratio8 < WARM_NOISE < ratio2
    assert eps8.lr == RECIPE["lr_warm"]
    assert eps2.lr == pytest.approx(RECIPE["lr_warm"] * WARM_NOISE / ratio2) and 0.02 < eps2.lr < 0.04
    assert fitted(eps=2)[0].lr == RECIPE["lr"]  # from scratch
    assert fitted(eps=2, warm_start=True, lr=0.2)[0].lr == 0.2  # the run's own rate wins


def test_a_warm_started_run_takes_smaller_steps():
    assert dp_training(DPSettings("sample", warm_start=True), 98, 8, 2).lr == RECIPE["lr_warm"] < RECIPE["lr"]
    from fedseg.common.model_kinds import ModelSpec

    spec = ModelSpec(3, 1, 3, (16, 32, 64))
    assert RunConfig(dp="sample", pretrained_weights="public.pt").site_round(spec, "id").dp.warm_start
    assert not RunConfig(dp="sample").site_round(spec, "id").dp.warm_start


def test_a_weaker_pretrained_model_takes_larger_steps_up_to_the_scratch_rate():
    """The warm rate follows what the pretrained weights scored at the sites before round 1:
    lr_warm from a good model (or an unscored one), the scratch rate at NO_WARM_START, between
    them the weaker the start the larger the step; the score travels in the round config."""
    from fedseg.common.model_kinds import ModelSpec
    from fedseg.common.round_config import SiteRoundConfig
    from fedseg.common.dp_recipe import GOOD_START, NO_WARM_START, warm_lr

    def lr(start_dice: float) -> float:
        return dp_training(DPSettings("sample", warm_start=True, start_dice=start_dice), 75, 8, 2).lr

    assert lr(-1.0) == lr(0.9) == lr(GOOD_START) == RECIPE["lr_warm"]
    assert lr(NO_WARM_START) == pytest.approx(RECIPE["lr"]) and lr(0.0) == pytest.approx(RECIPE["lr"])
    rates = [lr(d) for d in (0.1, 0.385, 0.6, 0.75)]
    assert rates == sorted(rates, reverse=True) and RECIPE["lr_warm"] < rates[-1] < rates[0] < RECIPE["lr"]
    assert 0.3 <= lr(0.385) <= 0.4  # 10 public Hippocampus cases: 0.3 beat 0.1 (RESULTS)
    assert lr(0.385) == warm_lr(0.385)
    assert dp_training(DPSettings("sample", start_dice=0.385), 75, 8, 2).lr == RECIPE["lr"]  # not warm
    spec = ModelSpec(3, 1, 3, (16, 32, 64))
    wire = RunConfig(dp="sample", pretrained_weights="p.pt").site_round(spec, "id", start_dice=0.385)
    assert SiteRoundConfig.from_record(wire.to_record()).dp.start_dice == 0.385
    assert RunConfig(dp="sample").site_round(spec, "id", start_dice=0.385).dp.start_dice == -1.0


def test_a_setting_the_run_gives_always_wins():
    dp = DPSettings("sample", max_grad_norm=1.5, batch_size=10, lr=0.02, momentum=0.9, patches_per_case=3,
                    steps=5)
    training = dp_training(dp, num_cases=98, batch_size=8, epochs=2)
    assert (training.expected_batch, training.max_grad_norm, training.lr, training.momentum,
            training.patches_per_case, training.steps) == (10, 1.5, 0.02, 0.9, 3, 5)
    assert training.chosen == ()
    cfg = RunConfig(dp="sample", dp_lr=0.3, dp_batch_size=12)
    assert (cfg.dp_lr, cfg.dp_batch_size, RunConfig.from_dict({"dp-lr": "-1"}).dp_lr) == (0.3, 12, AUTO)
    assert RunConfig().dp_max_grad_norm == AUTO


def test_plan_rate_is_the_expected_batch_over_the_cases():
    dp = DPSettings("sample", noise_multiplier=1.3)
    training = dp_training(dp, num_cases=98, batch_size=8, epochs=2)
    plan = plan_round(dp, 98, training)
    assert plan.sample_rate == pytest.approx(33 / 98) and plan.noise_multiplier == 1.3
    assert plan.steps == 26 and plan.max_grad_norm == RECIPE["max_grad_norm"]


def test_few_cases_are_warned_with_what_to_do():
    dp = DPSettings("sample", target_epsilon=8.0, planned_rounds=5)
    tiny = dp_training(dp, num_cases=6, batch_size=2, epochs=4)  # a MoNuSeg site
    plan = plan_round(dp, 6, tiny)
    assert noise_to_signal(plan, tiny) == pytest.approx(plan.noise_multiplier / 2)
    assert noise_to_signal(plan, tiny) > NOISE_WARNING
    text = warning("site2-kidney", 6, tiny, plan)
    assert "6 training cases" in text and "dp=client" in text and "pretrained-weights" in text
    warm = warning("site2-kidney", 6, tiny, plan, warm_start=True)  # it has pretrained weights already
    assert "6 training cases" in warm and "pretrained-weights" not in warm and "expect about its Dice" in warm
    many = dp_training(dp, num_cases=500, batch_size=8, epochs=2)
    assert warning("big", 500, many, plan_round(dp, 500, many)) is None


def test_the_servers_moving_average_is_on_only_for_warm_started_record_level_dp_unless_set():
    assert ema_decay(RunConfig(dp="sample", pretrained_weights="public.pt")) == RECIPE["ema"]
    assert ema_decay(RunConfig(dp="sample", pretrained_weights="public.pt"), start_dice=0.803) == RECIPE["ema"]
    # from a weak start the model climbs and the average lags it, as from scratch
    assert ema_decay(RunConfig(dp="sample", pretrained_weights="public.pt"), start_dice=0.385) == 0.0
    assert ema_decay(RunConfig(dp="sample")) == 0.0  # from scratch the average lags the model
    assert ema_decay(RunConfig()) == 0.0 and ema_decay(RunConfig(dp="client")) == 0.0
    assert ema_decay(RunConfig(dp="sample", dp_ema=0.0)) == 0.0
    assert ema_decay(RunConfig(dp_ema=0.5)) == 0.5
