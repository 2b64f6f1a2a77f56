"""Sequence batching: padding and back, masks, the bucketing iterator, windows of a long series, and
the errors bad input gets."""

import numpy as np
import pytest

import fusedrnn
from fusedrnn import sequences as S


def _ragged(rng, lengths, features=(3,)):
    return [rng.standard_normal((n,) + features) for n in lengths]


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_major", "batch_first"])
@pytest.mark.parametrize("features", [(), (3,), (2, 2)], ids=["scalar", "vector", "matrix"])
def test_pad_then_unpad_round_trips(rng, batch_first, features):
    seqs = _ragged(rng, [4, 1, 6, 3], features)
    padded, lengths = S.pad_sequences(seqs, batch_first=batch_first, padding_value=-7.0)
    assert lengths.dtype == np.int64 and lengths.tolist() == [4, 1, 6, 3]
    assert padded.shape == ((4, 6) if batch_first else (6, 4)) + features
    by_row = padded if batch_first else padded.swapaxes(0, 1)
    for b, s in enumerate(seqs):
        np.testing.assert_array_equal(by_row[b, :len(s)], s)
        assert np.all(by_row[b, len(s):] == -7.0)
    back = S.unpad_sequences(padded, lengths, batch_first=batch_first)
    assert len(back) == len(seqs)
    for got, want in zip(back, seqs):
        np.testing.assert_array_equal(got, want)


def test_padded_batch_runs_through_a_module_like_each_sequence_alone(rng):
    # The padded batch plus lengths gives each sequence's own output and final state.
    seqs = [rng.standard_normal((n, 3)) for n in (5, 2, 4)]
    x, lengths = S.pad_sequences(seqs)
    lstm = fusedrnn.LSTM(3, 4, dtype=np.float64, seed=0)
    y, (h_n, _) = lstm(x, lengths=lengths)
    for b, (seq, y_b) in enumerate(zip(seqs, S.unpad_sequences(y, lengths))):
        alone, (h_alone, _) = lstm(seq[:, None, :])
        np.testing.assert_allclose(y_b, alone[:, 0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h_n[0, b], h_alone[0, 0], rtol=1e-12, atol=1e-14)


def test_pad_to_fixed_steps_and_dtype():
    padded, lengths = S.pad_sequences([np.ones(2, np.int32), np.ones(3, np.int32)], steps=5, dtype=np.float32)
    assert padded.shape == (5, 2) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, 0], [1, 1, 0, 0, 0])
    # The common dtype when none is given: int and float mix to float.
    mixed, _ = S.pad_sequences([np.ones(2, np.int64), np.ones(1, np.float32)])
    assert mixed.dtype == np.float64
    # A value the padded dtype cannot hold is refused by name, never wrapped, truncated or made infinite.
    for seqs, dtype, padding_value, message in (
            ([np.array([1.7, 2.0])], np.int8, 0, r"sequences\[0\]: 1.7 is not a value of the padded dtype int8"),
            ([np.array([1.0]), np.array([300.0])], np.int8, 0, r"sequences\[1\]: 300.0 is not a value"),
            ([np.array([-1])], np.uint8, 0, r"sequences\[0\]: -1 is not a value of the padded dtype uint8"),
            ([np.array([1e10])], np.float16, 0, r"sequences\[0\]: 10000000000.0 is not a value .* float16"),
            ([np.ones(2, np.int8)], None, 1000, "padding_value: 1000 is not a value of the padded dtype int8"),
            ([np.ones(2, np.uint8)], None, -1, "padding_value: -1 is not a value of the padded dtype uint8"),
            ([np.ones(2, np.float32)], None, 1e300, "padding_value: 1e[+]300 is not a value .* float32"),
            ([np.ones(2, np.int32)], None, 0.5, "padding_value: 0.5 is not a value of the padded dtype int32"),
            ([np.ones(2, np.int64)], None, 2**70, f"padding_value: {2**70} is not a value of the padded dtype int64"),
            ([np.ones(2, np.float32)], None, 10**400, "padding_value: 1000+ is not a value .* float32")):
        with pytest.raises(ValueError, match=message):
            S.pad_sequences(seqs, steps=3, dtype=dtype, padding_value=padding_value)
    # Rounding is not refused, and an infinite or NaN padding stays what it was asked to be.
    rounded, _ = S.pad_sequences([np.array([0.1])], steps=2, dtype=np.float32, padding_value=np.inf)
    assert rounded[0, 0] == np.float32(0.1) and rounded[1, 0] == np.inf
    big, _ = S.pad_sequences([np.ones(1, np.float32)], steps=2, padding_value=2**70)
    assert big[1] == np.float32(2.0**70)


def test_length_mask():
    mask = S.length_mask([3, 1, 2])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(S.length_mask([3, 1, 2], 4, batch_first=True),
                                  [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


# ---- errors name the offending sequence -------------------------------------------------------------


@pytest.mark.parametrize("seqs, message", [
    ([np.zeros((3, 2)), np.zeros((2, 3))], r"sequences\[1\]: feature shape \(3,\) differs"),
    ([np.zeros((3, 2)), np.zeros((0, 2))], r"sequences\[1\]: empty sequence"),
    ([np.zeros(2), np.array([1.0, np.nan]), np.zeros(1)], r"sequences\[1\]: contains NaN"),
    ([np.zeros(2), np.zeros(2), np.array([np.inf])], r"sequences\[2\]: contains NaN or infinite"),
    ([np.float64(3.0)], r"sequences\[0\]: expected an array of shape \(length, ...\), got a scalar"),
    ([], r"sequences: expected at least one sequence"),
])
def test_pad_rejects_bad_sequences(seqs, message):
    with pytest.raises(ValueError, match=message):
        S.pad_sequences(seqs)


def test_pad_rejects_wrong_types_and_lengths_that_do_not_fit():
    with pytest.raises(TypeError, match=r"sequences\[0\]: expected a numeric array"):
        S.pad_sequences([np.array(["a", "b"])])
    with pytest.raises(TypeError, match="sequences: expected a list of arrays"):
        S.pad_sequences(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"sequences\[1\]: length 4 does not fit in steps=3"):
        S.pad_sequences([np.zeros(2), np.zeros(4)], steps=3)
    with pytest.raises(ValueError, match=r"lengths: each length must be in \[1, 3\] \(T\), got 5 at index 1"):
        S.unpad_sequences(np.zeros((3, 2)), [2, 5])
    with pytest.raises(ValueError, match="lengths: contains NaN"):
        S.length_mask([2.0, np.nan])
    with pytest.raises(ValueError, match="lengths: each length must be in"):
        S.length_mask([2, 0])


# ---- the bucketing iterator ------------------------------------------------------------------------


def test_buckets_cover_every_sequence_once_with_little_padding(rng):
    lengths = rng.integers(1, 60, 200)
    seqs = [np.full((n, 2), i, np.float64) for i, n in enumerate(lengths)]
    labels = np.arange(200) * 10
    it = S.BucketBatches(seqs, 16, targets=labels, seed=3, pool_batches=8)
    seen, batches = [], []
    for batch in it:
        assert batch.x.shape == (batch.lengths.max(), len(batch.indices), 2)
        np.testing.assert_array_equal(batch.lengths, lengths[batch.indices])
        np.testing.assert_array_equal(batch.targets, labels[batch.indices])
        # Each column is its own sequence (filled with its index), padded with zeros.
        for col, i in enumerate(batch.indices):
            np.testing.assert_array_equal(batch.x[:lengths[i], col], i)
            assert not np.any(batch.x[lengths[i]:, col])
        seen += batch.indices.tolist()
        batches.append(batch.indices)
    assert sorted(seen) == list(range(200)) and len(it) == 13
    # The achieved padding is what the batches show, and far below random batching's (about half).
    assert it.padding_fraction == pytest.approx(1 - lengths.sum() / sum(lengths[b].max() * len(b) for b in batches))
    random_batches = np.array_split(rng.permutation(200), 13)
    random_padding = 1 - lengths.sum() / sum(lengths[b].max() * len(b) for b in random_batches)
    assert it.padding_fraction < 0.2 < 0.4 < random_padding


def test_bucket_order_is_reproducible_and_changes_per_pass(rng):
    seqs = [np.zeros((n, 1)) for n in rng.integers(1, 30, 50)]
    a = S.BucketBatches(seqs, 8, seed=7)
    b = S.BucketBatches(seqs, 8, seed=7)
    first_a = [batch.indices.tolist() for batch in a]
    assert first_a == [batch.indices.tolist() for batch in b]
    second_a = [batch.indices.tolist() for batch in a]
    assert second_a != first_a and sorted(sum(second_a, [])) == list(range(50))
    assert [x.tolist() for x in S.BucketBatches(seqs, 8, seed=8).batch_indices(0)] != first_a


def test_buckets_without_shuffle_sort_by_length_and_drop_last(rng):
    lengths = [5, 1, 3, 2, 4]
    it = S.BucketBatches([np.zeros(n) for n in lengths], 2, shuffle=False, drop_last=True, batch_first=True)
    batches = list(it)
    assert [b.indices.tolist() for b in batches] == [[1, 3], [2, 4]] and len(it) == 2
    assert batches[1].x.shape == (2, 4)
    assert it.padding_fraction == pytest.approx(1 - (1 + 2 + 3 + 4) / (2 * 2 + 2 * 4))


def test_bucket_step_targets_are_padded_with_their_sequences(rng):
    seqs = _ragged(rng, [3, 1, 2])
    step_targets = [np.arange(len(s)) + 100 * i for i, s in enumerate(seqs)]
    batch = next(iter(S.BucketBatches(seqs, 3, step_targets=step_targets, shuffle=False)))
    for col, i in enumerate(batch.indices):
        np.testing.assert_array_equal(batch.step_targets[:len(seqs[i]), col], step_targets[i])


def test_bucket_errors_name_the_argument():
    seqs = [np.zeros(3), np.zeros(2)]
    with pytest.raises(ValueError, match=r"targets: expected one target per sequence \(2\)"):
        S.BucketBatches(seqs, 2, targets=[1, 2, 3])
    with pytest.raises(ValueError, match=r"step_targets\[1\]: length 3 differs from sequences\[1\]'s 2"):
        S.BucketBatches(seqs, 2, step_targets=[np.zeros(3), np.zeros(3)])
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        S.BucketBatches(seqs, 0)
    with pytest.raises(ValueError, match=r"sequences\[0\]: contains NaN"):
        S.BucketBatches([np.array([np.nan])], 1)


# ---- windows of one series ---------------------------------------------------------------------------


def test_sliding_windows_hold_the_right_steps():
    series = np.arange(10.0)
    x, y = S.sliding_windows(series, 4, horizon=2, stride=3)
    # Windows start at 0 and 3 (a third at 6 would need steps up to 11).
    assert x.shape == (4, 2, 1) and y.shape == (2, 2, 1)
    np.testing.assert_array_equal(x[:, :, 0].T, [[0, 1, 2, 3], [3, 4, 5, 6]])
    np.testing.assert_array_equal(y[:, :, 0].T, [[4, 5], [7, 8]])
    xb, yb = S.sliding_windows(np.stack([series, -series], 1), 3, batch_first=True)
    assert xb.shape == (7, 3, 2) and yb.shape == (7, 1, 2)
    np.testing.assert_array_equal(yb[-1, 0], [9, -9])


def test_next_step_chunks_shift_targets_by_one():
    x, y = S.next_step_chunks(np.arange(11.0), 4)
    np.testing.assert_array_equal(x[:, :, 0].T, [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(y[:, :, 0].T, [[1, 2, 3, 4], [5, 6, 7, 8]])
    x, y = S.next_step_chunks(np.arange(6.0), 3, stride=1, batch_first=True)
    assert x.shape == (3, 3, 1)
    np.testing.assert_array_equal(y[2, :, 0], [3, 4, 5])


def test_window_errors():
    with pytest.raises(ValueError, match=r"window: window \+ horizon = 6 steps do not fit in a series of 5"):
        S.sliding_windows(np.zeros(5), 5)
    with pytest.raises(ValueError, match="series: NaN or infinite value at step 2"):
        S.sliding_windows(np.array([1.0, 2.0, np.nan, 4.0]), 1)
    with pytest.raises(ValueError, match=r"series: expected shape \(length,\) or \(length, features\)"):
        S.next_step_chunks(np.zeros((3, 2, 2)), 1)
    with pytest.raises(ValueError, match="steps: a chunk needs steps"):
        S.next_step_chunks(np.zeros(4), 4)
    with pytest.raises(TypeError, match="stride: expected an int"):
        S.sliding_windows(np.zeros(5), 2, stride=1.5)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_major", "batch_first"])
def test_windows_are_new_arrays_of_their_own(batch_first):
    # One window, windows back to back and overlapping ones alike: never the caller's series, never
    # inputs and targets in one buffer.
    for make in (lambda s: S.next_step_chunks(s, 10, batch_first=batch_first),
                 lambda s: S.next_step_chunks(s, 4, batch_first=batch_first),
                 lambda s: S.sliding_windows(s, 3, 1, stride=4, batch_first=batch_first),
                 lambda s: S.sliding_windows(s, 3, 2, stride=1, batch_first=batch_first)):
        series = np.arange(11.0)
        x, y = make(series)
        want_x, want_y = x.copy(), y.copy()
        assert x.flags.writeable and y.flags.writeable and x.flags.c_contiguous and y.flags.c_contiguous
        series -= 100.0
        x += 1000.0
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x, want_x + 1000.0)


def test_padding_and_bucket_options_are_checked_where_they_are_given():
    seqs = [np.ones((3, 2), np.float32), np.ones((1, 2), np.float32)]
    cases = [(lambda: S.BucketBatches(seqs, 2, seed=-1), ValueError, r"^seed: expected an int >= 0"),
             (lambda: S.BucketBatches(seqs, 2, seed=1.5), TypeError, r"^seed: expected an int"),
             (lambda: S.BucketBatches(seqs, 2, seed=np.random.default_rng(0)), TypeError, r"^seed: expected an int"),
             (lambda: S.BucketBatches(seqs, 2, dtype="foo"), TypeError, r"^dtype: expected a numeric dtype"),
             (lambda: S.pad_sequences(seqs, dtype=str), TypeError, r"^dtype: expected a numeric dtype"),
             (lambda: S.pad_sequences(seqs, padding_value=None), TypeError, r"^padding_value: expected a number"),
             (lambda: S.pad_sequences(seqs, padding_value="x"), TypeError, r"^padding_value: expected a number"),
             (lambda: S.pad_sequences([np.ones(3, int), np.ones(1, int)], padding_value=0.5), ValueError,
              r"^padding_value: 0.5 is not a value of the padded dtype"),
             (lambda: S.length_mask([1e300]), ValueError, r"^lengths: each length must be in \[1, 2147483647\]")]
    for make, exc, match in cases:
        with pytest.raises(exc, match=match):
            make()
    padded, _ = S.pad_sequences(seqs, padding_value=np.nan)  # NaN padding, asked for, is the caller's choice
    assert np.isnan(padded[1:, 1]).all() and not np.isnan(padded[:, 0]).any()
    assert S.pad_sequences([np.ones(3, int), np.ones(1, int)], padding_value=-1.0)[0][2, 1] == -1
    assert next(iter(S.BucketBatches(seqs, 2, seed=None, dtype=np.float64))).x.dtype == np.float64
    fractions = [np.array([1.0, 2.0]), np.array([3.0]), np.array([4.5, 5.0, 6.0])]
    with pytest.raises(ValueError, match=r"^sequences\[2\]: 4.5 is not a value of the padded dtype int64"):
        S.BucketBatches(fractions, 1, shuffle=False, dtype=np.int64)  # when made, by its own index
    batches = S.BucketBatches(seqs, 1)
    for epoch, exc in ((-1, ValueError), (1.5, TypeError), ("a", TypeError)):
        with pytest.raises(exc, match="^epoch: expected an int"):
            batches.batch_indices(epoch)
    with pytest.raises(ValueError, match=r"^padded: no time steps, got shape \(0, 2\)$"):  # as given, (T, B)
        S.unpad_sequences(np.zeros((0, 2)), [1, 1])
