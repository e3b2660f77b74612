"""top_b / TopB: exact (score desc, id asc) selection, ties at the boundary, streaming, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from ray_dal.topk import NonFiniteScoreError, TopB, top_b


def brute_force(ids, scores, b):
    """Obvious oracle: a full sort of (-score, id) pairs."""
    pairs = sorted(zip((-np.asarray(scores, np.float64)).tolist(), np.asarray(ids).tolist()))[:b]
    return np.array([i for _, i in pairs], np.int64), np.array([-s for s, _ in pairs], np.float64)


def tied_pool(rng, n, levels):
    """Unique ids (not 0..n-1, not sorted) and scores drawn from few levels: ties everywhere."""
    ids = rng.choice(10 * n, size=n, replace=False).astype(np.int64)
    scores = rng.choice(rng.normal(size=levels), size=n)
    return ids, scores


def assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("b", [1, 3, 17, 99, 100])
def test_ties_at_boundary_are_broken_by_smaller_id_whatever_the_order(b):
    rng = np.random.default_rng(b)
    ids, scores = tied_pool(rng, 100, levels=5)
    want = brute_force(ids, scores, b)
    # The boundary really is a tie that some members of lose.
    boundary = want[1][-1]
    assert (scores == boundary).sum() > (want[1] == boundary).sum() or b == 100
    for _ in range(5):
        perm = rng.permutation(ids.size)
        assert_same(top_b(ids[perm], scores[perm], b), want)


def test_all_scores_equal_keeps_the_smallest_ids():
    ids = np.array([9, 3, 7, 1, 5, 8], np.int64)
    got_ids, got_scores = top_b(ids, np.zeros(6), 3)
    np.testing.assert_array_equal(got_ids, [1, 3, 5])
    np.testing.assert_array_equal(got_scores, [0.0, 0.0, 0.0])


def test_signed_zeros_tie():
    got_ids, _ = top_b(np.array([4, 2, 3]), np.array([0.0, -0.0, 1.0]), 2)
    np.testing.assert_array_equal(got_ids, [3, 2])


@pytest.mark.parametrize("extra", [0, 1, 50])
def test_b_at_least_n_returns_everything_sorted(extra):
    rng = np.random.default_rng(extra)
    ids, scores = tied_pool(rng, 40, levels=7)
    got = top_b(ids, scores, ids.size + extra)
    assert got[0].size == ids.size
    assert_same(got, brute_force(ids, scores, ids.size))


def test_b_zero_and_empty_input():
    ids, scores = top_b(np.arange(5), np.arange(5.0), 0)
    assert ids.shape == scores.shape == (0,) and ids.dtype == np.int64 and scores.dtype == np.float64
    ids, scores = top_b(np.empty(0, np.int64), np.empty(0), 3)
    assert ids.shape == scores.shape == (0,) and ids.dtype == np.int64 and scores.dtype == np.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise_with_their_ids(bad):
    ids = np.array([10, 11, 12, 13, 14], np.int64)
    scores = np.array([0.5, bad, 0.1, bad, 0.9])
    with pytest.raises(NonFiniteScoreError) as info:
        top_b(ids, scores, 2)
    assert isinstance(info.value, ValueError)
    np.testing.assert_array_equal(info.value.ids, [11, 13])
    assert "11" in str(info.value) and "13" in str(info.value)
    # The ids survive pickling (the error crosses process boundaries in Ray).
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is NonFiniteScoreError
    np.testing.assert_array_equal(again.ids, [11, 13])
    assert str(again) == str(info.value)


def test_dtype_and_shape_contracts():
    ids = np.array([5, 1, 3, 2], np.int32)
    scores = np.array([0.25, 0.75, 0.5, 0.75], np.float32)
    scores.flags.writeable = False  # Ray Data batches are read-only
    got_ids, got_scores = top_b(ids, scores, 3)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float64
    assert got_ids.shape == got_scores.shape == (3,)
    np.testing.assert_array_equal(got_ids, [1, 2, 3])
    np.testing.assert_array_equal(got_scores, [0.75, 0.75, 0.5])  # float32 values widened exactly
    got_ids[:] = -1  # results are new arrays, never views of the input
    assert ids.tolist() == [5, 1, 3, 2]
    # Integer scores are accepted and widened.
    assert top_b([1, 2, 3], [3, 1, 2], 2)[0].tolist() == [1, 3]


@pytest.mark.parametrize(
    "ids, scores, b, error, words",
    [
        (np.arange(3), np.zeros(4), 1, ValueError, "one length"),
        (np.arange(4).reshape(2, 2), np.zeros((2, 2)), 1, ValueError, "1-D"),
        (np.arange(3.0), np.zeros(3), 1, TypeError, "ids must be integers"),
        (np.arange(3), np.array(["a", "b", "c"]), 1, TypeError, "scores must be real"),
        (np.arange(3), np.zeros(3), -1, ValueError, "non-negative integer"),
        (np.arange(3), np.zeros(3), 1.5, ValueError, "non-negative integer"),
    ],
)
def test_bad_input_is_a_clear_error(ids, scores, b, error, words):
    with pytest.raises(error, match=words):
        top_b(ids, scores, b)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_equals_top_b_over_random_chunkings(seed):
    rng = np.random.default_rng(seed)
    n, b = 6000, int(rng.integers(1, 300))
    ids, scores = tied_pool(rng, n, levels=int(rng.integers(3, 2000)))
    want = top_b(ids, scores, b)
    perm = rng.permutation(n)
    ids, scores = ids[perm], scores[perm]
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(1, 60))))
    stream = TopB(b)
    for chunk_ids, chunk_scores in zip(np.split(ids, cuts), np.split(scores, cuts)):  # empty chunks too
        stream.add(chunk_ids, chunk_scores)
    assert stream.num_added == n
    assert_same(stream.result(), want)
    assert_same(stream.result(), want)  # result() does not consume the state
    # Memory stays bounded: after a merge the buffer holds at most b pairs.
    assert stream.buffered <= max(4 * b, 1024)


def test_streaming_rejects_non_finite_scores_on_add():
    stream = TopB(2)
    stream.add([1, 2], [0.1, 0.2])
    with pytest.raises(NonFiniteScoreError) as info:
        stream.add([3, 4, 5], [0.3, np.nan, 0.5])
    np.testing.assert_array_equal(info.value.ids, [4])


def test_streaming_with_b_larger_than_everything_returns_all_sorted():
    stream = TopB(10)
    stream.add([4, 2], [1.0, 2.0])
    stream.add([3], [2.0])
    assert_same(stream.result(), (np.array([2, 3, 4]), np.array([2.0, 2.0, 1.0])))
