"""What a resumed run accepts from the sites that answer it: its own sites, with the data shape
they had when the run started, and its own training sites whichever of them are up."""

import pytest

from fedseg.common.config import ConfigError, RunConfig
from fedseg.server.discovery import cohort_misfit, site_names

COHORT = {"site-a": {"spatial-dims": 2, "in-channels": 1, "num-classes": 3, "task": "semantic"},
          "site-b": {"spatial-dims": 2, "in-channels": 1, "num-classes": 3, "task": "semantic"},
          "site-h": {"spatial-dims": 2, "in-channels": 1, "num-classes": 3, "task": "semantic"}}


def _answer(site: str, **changes) -> dict:
    return {"site": site, **COHORT.get(site, COHORT["site-a"]), "problems": 0, **changes}


def test_a_site_of_the_run_with_its_shape_fits_and_any_other_is_told_why_not():
    assert cohort_misfit(_answer("site-b"), COHORT) is None
    assert "not one of the run's sites ['site-a', 'site-b', 'site-h'] (a new site joins a new run)" in \
        cohort_misfit(_answer("site-z"), COHORT)
    assert cohort_misfit(_answer("site-a", **{"in-channels": 3, "task": "instance"}), COHORT) == \
        "site site-a now reports in-channels=3 (was 1), task=instance (was semantic)"


def test_a_resumed_run_keeps_its_training_sites_when_one_is_down():
    cfg = RunConfig(heldout_sites=("site-h",), min_train_sites=1)
    site_of, heldout, training = site_names({7: _answer("site-a")}, cfg, sorted(COHORT))
    assert site_of == {7: "site-a"} and heldout == set() and training == ["site-a", "site-b"]
    with pytest.raises(ConfigError, match="heldout-sites' names unknown site"):  # a new run needs it up
        site_names({7: _answer("site-a")}, cfg)
    with pytest.raises(ConfigError, match="min-train-sites' = 2 but only 1 training site"):
        site_names({7: _answer("site-a")}, cfg.replace(min_train_sites=2), sorted(COHORT))
