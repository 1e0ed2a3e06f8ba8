"""The next batch prepared in a background thread: the same batches, in the same order, drawn
from the same random stream as an unthreaded loop; errors surface where the batch is consumed."""

import threading

import numpy as np
import pytest

from fedseg.client.prefetch import prefetched


def _random_patches(seed: int):
    rng = np.random.RandomState(seed)  # one stream, as a seeded transform's
    return lambda indices: [rng.rand() + i for i in indices]


def test_prefetched_batches_are_those_of_an_unthreaded_loop():
    batches = [[i, i + 1] for i in range(50)]
    unthreaded = list(prefetched(batches, _random_patches(0), depth=0))
    assert list(prefetched(batches, _random_patches(0), depth=1)) == unthreaded
    assert list(prefetched(iter(batches), _random_patches(0), depth=3)) == unthreaded
    assert unthreaded != list(prefetched(batches, _random_patches(1), depth=1))


def test_an_error_preparing_a_batch_is_raised_to_the_loop_after_the_batches_before_it():
    def prepare(batch):
        if batch == 3:
            raise ValueError("case 3: image is NaN")
        return batch

    seen = []
    with pytest.raises(ValueError, match="case 3"):
        for item in prefetched(range(10), prepare):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_a_loop_that_stops_early_stops_the_thread():
    before = threading.active_count()
    for item in prefetched(range(10_000), lambda b: b, depth=2):
        if item == 5:
            break
    assert threading.active_count() == before
