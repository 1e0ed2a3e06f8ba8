"""The next batch prepared in a background thread: the same batches, in the same order, drawn
from the same random stream as an unthreaded loop; errors surface where the batch is consumed."""

import os
import threading

import numpy as np
import pytest
import torch

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


def test_batches_are_prepared_ahead_only_where_a_core_is_free_and_they_are_large_enough():
    from fedseg.client.prefetch import MIN_VOXELS, ahead_depth

    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # PyTorch's threads take every core: a thread more slows them
        assert ahead_depth("cpu") == 0
        assert ahead_depth("cuda:0") == 1  # the step runs on the GPU
        if cores > 1:  # e.g. a simulated site with one CPU
            torch.set_num_threads(1)
            assert ahead_depth("cpu") == ahead_depth("cpu", 8 * 32**3) == 1
            assert ahead_depth("cpu", 2 * 16**2) == ahead_depth("cuda", MIN_VOXELS - 1) == 0  # not worth a thread
    finally:
        torch.set_num_threads(before)
