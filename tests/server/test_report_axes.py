"""The report's curves label rounds with whole numbers, however few rounds a run has."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedseg.server.report import round_axis  # noqa: E402


@pytest.mark.parametrize("rounds", [{1}, {0, 1}, {1, 2, 3, 4, 5, 6, 7}])
def test_round_ticks_are_whole_rounds(rounds: set[int]) -> None:
    fig, ax = plt.subplots()
    ax.plot(sorted(rounds), [0.5] * len(rounds), marker="o")
    round_axis(ax, rounds)
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)
    if len(rounds) <= 2:  # a short run is ticked at exactly its rounds
        assert ticks == sorted(rounds)
