"""The batch order depends on the global batch only, and resumes exactly."""
import itertools

import pytest

from geoforge.engine.data.sampler import ResumableBatchSampler


def take(sampler, n):
    return [[i for i, _ in b] for b in itertools.islice(iter(sampler), n)]


def test_two_ranks_see_what_one_rank_sees():
    one = take(ResumableBatchSampler(40, micro_batch=4, seed=3), 25)
    r0 = take(ResumableBatchSampler(40, micro_batch=2, world_size=2, rank=0, seed=3), 25)
    r1 = take(ResumableBatchSampler(40, micro_batch=2, world_size=2, rank=1, seed=3), 25)
    assert [a + b for a, b in zip(r0, r1)] == one
    accum = take(ResumableBatchSampler(40, micro_batch=2, grad_accum=2, seed=3), 50)
    assert [accum[2 * i] + accum[2 * i + 1] for i in range(25)] == one


def test_each_epoch_is_a_permutation_and_epochs_differ():
    s = ResumableBatchSampler(12, micro_batch=3, seed=0)
    batches = list(itertools.islice(iter(s), 8))
    first = sorted(i for b in batches[:4] for i, _ in b)
    assert first == list(range(12))
    assert {e for b in batches[:4] for _, e in b} == {0} and {e for b in batches[4:] for _, e in b} == {1}
    assert [i for b in batches[:4] for i, _ in b] != [i for b in batches[4:] for i, _ in b]


def test_resume_continues_the_same_order():
    full = take(ResumableBatchSampler(10, micro_batch=3, grad_accum=2, seed=1), 20)
    resumed = take(ResumableBatchSampler(10, micro_batch=3, grad_accum=2, seed=1, start=7), 13)
    assert resumed == full[7:]


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, micro_batch=2, world_size=2)
