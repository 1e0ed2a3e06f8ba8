"""The run summary: per-site spread, held-out block, instance means, DP epsilon, best round."""

import math

import pytest

from fedseg.server.summary import below_pretrained, site_spread, summarize


def test_site_spread_is_mean_worst_gap_and_population_std_skipping_missing_scores():
    spread = site_spread({"a": 0.8, "b": 0.5, "c": None, "d": float("nan"), "e": 0.2})
    # three finite values: mean (0.8 + 0.5 + 0.2) / 3 = 0.5; std sqrt((0.09 + 0 + 0.09) / 3)
    assert spread["mean"] == pytest.approx(0.5)
    assert (spread["worst_site"], spread["worst_dice"]) == ("e", 0.2)
    assert spread["gap"] == pytest.approx(0.6)
    assert spread["std"] == pytest.approx(math.sqrt(0.06))
    assert site_spread({"a": None}) == {"mean": None, "worst_site": None, "worst_dice": None,
                                        "gap": None, "std": None}


def _round(n, dice, train=None, **extra):
    return {"round": n, "train": train or {}, "eval": {s: {"dice": d} for s, d in dice.items()},
            "errors": {}, **extra}


def test_summary_takes_the_last_round_and_the_best_round_by_mean_dice():
    rounds = [_round(1, {"a": 0.4, "b": 0.6, "h": 0.1}),
              _round(2, {"a": 0.9, "b": 0.7, "h": 0.3}),   # mean over a, b: 0.8 (best)
              _round(3, {"a": 0.8, "b": 0.6, "h": 0.5})]   # mean 0.7 (last)
    summary = summarize(rounds, ["a", "b"], ["h"])
    assert summary["rounds"] == 3
    assert summary["sites"] == {"a": {"dice": 0.8}, "b": {"dice": 0.6}}
    assert summary["in_federation"]["mean"] == pytest.approx(0.7)
    assert summary["in_federation"]["worst_site"] == "b"
    assert summary["in_federation"]["gap"] == pytest.approx(0.2)
    assert summary["heldout"] == {"h": {"dice": 0.5}} and summary["heldout_summary"]["mean"] == 0.5
    assert summary["best_round"] == {"round": 2, "mean_dice": pytest.approx(0.8)}
    assert "record_level_dp" not in summary and "instance" not in summary


def test_epsilon_is_each_sites_latest_even_when_it_refused_later_rounds():
    rounds = [_round(1, {"a": 0.5, "b": 0.5}, train={"a": {"epsilon": 2.0, "delta": 1e-5},
                                                     "b": {"epsilon": 2.5, "delta": 1e-5}}),
              _round(2, {"a": 0.6, "b": 0.6}, train={"b": {"epsilon": 3.5, "delta": 1e-5}})]
    dp = summarize(rounds, ["a", "b"], [])["record_level_dp"]
    assert dp == {"epsilon": {"a": 2.0, "b": 3.5}, "delta": 1e-5, "max_epsilon": 3.5}


def test_instance_scores_are_averaged_over_sites_with_the_worst_named():
    rounds = [{"round": 1, "train": {}, "errors": {},
               "eval": {"a": {"dice": 0.8, "pq": 0.5, "aji": 0.4, "ap50": 0.6},
                        "b": {"dice": 0.7, "pq": 0.3, "aji": 0.5, "ap50": None},
                        "h": {"dice": 0.6, "pq": 0.2, "aji": 0.3, "ap50": 0.1}}}]
    instance = summarize(rounds, ["a", "b"], ["h"])["instance"]
    assert instance["sites"]["pq"] == {"mean": pytest.approx(0.4), "worst_site": "b", "worst": 0.3}
    assert instance["sites"]["ap50"] == {"mean": 0.6, "worst_site": "a", "worst": 0.6}  # b: none
    assert instance["heldout"]["aji"]["mean"] == 0.3


def test_client_level_epsilon_comes_from_the_last_round():
    rounds = [_round(1, {"a": 0.5}, **{"client-level-dp": {"epsilon": 1.0}}),
              _round(2, {"a": 0.5}, **{"client-level-dp": {"epsilon": 1.7}})]
    assert summarize(rounds, ["a"], [])["client_level_dp"] == {"epsilon": 1.7}
    assert summarize([], ["a"], []) == {"rounds": 0}


def test_fairness_groups_are_combined_across_sites_by_their_cases():
    rounds = [{"round": 1, "train": {}, "errors": {}, "eval": {
        "a": {"dice": 0.8, "group-dice:liver": 0.9, "group-cases:liver": 6.0,
              "group-dice:lung": 0.6, "group-cases:lung": 5.0},
        "b": {"dice": 0.7, "group-dice:liver": 0.7, "group-cases:liver": 10.0},
        "h": {"dice": 0.5, "group-dice:lung": 0.3, "group-cases:lung": 5.0}}}]
    groups = summarize(rounds, ["a", "b"], ["h"])["groups"]
    # liver: (0.9 * 6 + 0.7 * 10) / 16 = 0.775; lung: (0.6 * 5 + 0.3 * 5) / 10 = 0.45
    assert groups["per_group"]["liver"] == {"dice": pytest.approx(0.775), "cases": 16.0, "sites": ["a", "b"]}
    assert groups["per_group"]["lung"]["dice"] == pytest.approx(0.45)
    assert groups["worst_group"] == "lung" and groups["gap"] == pytest.approx(0.325)
    assert "groups" not in summarize([_round(1, {"a": 0.5})], ["a"], [])


def test_a_run_that_ends_below_its_pretrained_model_is_told():
    rounds = [_round(1, {"a": 0.80, "b": 0.78}), _round(2, {"a": 0.76, "b": 0.74})]
    summary = summarize(rounds, ["a", "b"], [])
    summary["pretrained_alone"] = {"in_federation": {"mean": 0.80}}
    text = below_pretrained(summary)
    assert text is not None and "0.750" in text and "(0.800)" in text and "best round: 1, 0.790" in text
    summary["pretrained_alone"]["in_federation"]["mean"] = 0.755  # within the margin: not a loss
    assert below_pretrained(summary) is None
    assert below_pretrained(summarize(rounds, ["a", "b"], [])) is None  # a run from scratch
