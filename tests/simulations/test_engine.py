"""simulate's fixes to Flower's simulation engine are in place while it runs, and only then."""

import importlib

from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid
from flwr.supercore.object_store import ObjectStoreFactory

from fedseg.simulations.engine import POLL_S, PromptGrid, add_messages_to_queue, prompt_engine

flower_simulation = importlib.import_module("flwr.simulation.run_simulation")


def _state_factory():
    """What Flower's run_simulation builds its grid on."""
    return flower_simulation.LinkStateFactory(flower_simulation.FLWR_IN_MEMORY_DB_NAME,
                                              flower_simulation.NoOpFederationManager(), ObjectStoreFactory())


def test_the_grid_and_the_pump_poll_promptly_only_inside_simulate():
    assert flower_simulation.InMemoryGrid is InMemoryGrid
    with prompt_engine():
        grid = flower_simulation.InMemoryGrid(state_factory=_state_factory())
        assert isinstance(grid, PromptGrid) and grid.pull_interval == POLL_S < 0.1
        assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert flower_simulation.InMemoryGrid is InMemoryGrid
    assert vce_api.add_messages_to_queue is not add_messages_to_queue
    assert InMemoryGrid(state_factory=_state_factory()).pull_interval == 0.1  # Flower's own, untouched


def test_polls_wait_longer_where_a_poll_itself_is_slow():
    from fedseg.simulations.engine import POLL_SHARE, _wait_after

    assert _wait_after(0.0001) == POLL_S  # a few sites: prompt
    assert _wait_after(0.05) == 0.05 / POLL_SHARE > 0.1  # thousands of messages a poll: polling stays a share
