"""The expected training time a coordinator prints before round 1, from the sites' timed steps."""

import pytest

from fedseg.server.step_timing import describe_expected, duration_text, expected_times, round_seconds


def test_a_round_takes_the_slowest_site_or_the_sites_in_turns_on_the_shared_cores():
    sites = {"a": 5.0, "b": 4.0, "c": 3.0}
    assert round_seconds(sites) == 5.0  # each site on its own machine
    assert round_seconds(sites, at_once=1) == 12.0  # one after another
    assert round_seconds(sites, at_once=2) == 7.0  # a | b then c: the longest first, on the first lane free
    assert round_seconds(sites, at_once=3) == 5.0
    assert round_seconds({}) == 0.0


def test_the_expected_time_names_the_slowest_site_and_the_untimed_ones():
    expected = expected_times({"a": 0.5, "b": 0.2}, {"a": 120, "b": 240, "c": 60}, rounds=10, at_once=2)
    assert expected["steps_per_round"] == {"a": 120, "b": 240}  # c was not timed
    assert expected["site_round_seconds"] == {"a": 60.0, "b": 48.0}
    assert expected["round_seconds"] == 60.0 and expected["run_seconds"] == pytest.approx(600.0)
    text = describe_expected(expected, 10, untimed=["c"])
    assert text.startswith("expected training time: 60 s per round, 10.0 min for 10 round(s)")
    assert "slowest site a: 120 steps x 0.50 s" in text and "2 site(s) at a time" in text
    assert text.endswith("not timed: c)")


def test_durations_read_as_a_person_reads_them():
    assert [duration_text(s) for s in (0.42, 9.96, 25.4, 95, 5400)] == ["0.4 s", "10.0 s", "25 s", "1.6 min", "1.5 h"]
