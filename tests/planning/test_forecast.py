import numpy as np
import pytest

from megatron_microep.planning.forecast import forecast_samples, planner_input


def _seed():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={seed}")
    return seed


def _reference(history, recent, count, seed, burst=0.0):
    """Slow loop version of the documented formula, before rounding: float [count, E]."""
    h = np.asarray(history, dtype=np.float64)
    num_samples, num_experts = h.shape
    level = h[-recent:].mean(axis=0)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, num_samples, size=(count, num_experts))
    permutation = rng.permutation(num_experts) if burst > 1 else []
    burst_sample = {int(e): position % count for position, e in enumerate(permutation)}
    largest = max(
        [
            (h[s, e] + 1) / (h[max(0, s - recent) : s, e].mean() + 1)
            for s in range(1, num_samples)
            for e in range(num_experts)
        ],
        default=1.0,
    )
    out = np.empty((count, num_experts))
    for k in range(count):
        for e in range(num_experts):
            s = rows[k, e]
            local = h[max(0, s - 2) : min(num_samples, s + 3), e].mean()
            noise = (h[s, e] + 1) / (local + 1)
            if burst_sample.get(e) == k:
                noise = max(noise, min(burst, largest))
            out[k, e] = level[e] * noise
    return out


def _assert_rounded(got, exact):
    """``got`` is ``exact`` rounded; where ``exact`` is a half-way tie up to float error, either side."""
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-9
    np.testing.assert_array_equal(got[~tie], np.rint(exact[~tie]))
    assert np.all(np.abs(got[tie] - exact[tie]) <= 0.5 + 1e-9)


@pytest.mark.parametrize(
    "num_samples,recent,count,burst",
    [
        (1, 4, 20, 0.0),
        (3, 2, 20, 0.0),
        (16, 4, 20, 0.0),
        (16, 16, 20, 0.0),
        (16, 4, 5, 3.0),
        (16, 4, 20, 2.0),
        (3, 2, 1, 1.5),
    ],
)
def test_matches_the_documented_formula(num_samples, recent, count, burst):
    seed = _seed()
    rng = np.random.default_rng(seed)
    history = rng.poisson(rng.lognormal(3.0, 1.0, 12), size=(num_samples, 12)).astype(np.int64)
    got = forecast_samples(history, recent, count, seed, burst)
    assert got.dtype == np.int64 and got.shape == (count, 12)
    _assert_rounded(got, _reference(history, recent, count, seed, burst))
    np.testing.assert_array_equal(got, forecast_samples(history, recent, count, seed, burst))  # same on every rank


def test_every_expert_bursts_once_by_the_level_rules_largest_error_capped():
    seed = _seed()
    history = np.full((16, 40), 100, dtype=np.int64)  # flat: the level rule never errs, so no bursts
    np.testing.assert_array_equal(forecast_samples(history, 4, 8, seed, burst=3.0), np.full((8, 40), 100))
    history[7, 5] = 1100  # the level rule (mean of the 4 before) predicted 100: error 1101/101 = 10.9
    samples = forecast_samples(history, 4, 8, seed, burst=3.0)
    level = history[-4:].mean(axis=0)
    flat = np.arange(40) != 5  # expert 5's own draws may hit its spike; the others only burst
    bursts = samples[:, flat] >= np.rint(level[flat] * 3.0)
    np.testing.assert_array_equal(bursts.sum(axis=0), np.ones(39))  # each expert once, at the cap 3
    assert set(bursts.sum(axis=1)) <= {4, 5}  # dealt evenly over the samples (40 experts, 8 samples)
    uncapped = forecast_samples(history, 4, 8, seed, burst=20.0)[:, flat]
    np.testing.assert_array_equal(uncapped[bursts], np.rint(level[flat] * 1101 / 101)[np.nonzero(bursts)[1]])


def test_level_follows_the_latest_micro_batches_and_noise_comes_from_the_window():
    # Expert 0 ramps up, expert 1 ramps down, expert 2 is flat: the forecast's level is the recent one.
    steps = np.arange(16)
    history = np.stack([100 + 20 * steps, 500 - 20 * steps, np.full(16, 300)], axis=1).astype(np.int64)
    samples = forecast_samples(history, 4, 64)
    recent = history[-4:].mean(axis=0)
    window = history.mean(axis=0)
    assert np.all(np.abs(samples.mean(axis=0) - recent) < np.abs(samples.mean(axis=0) - window)[:2].min())
    np.testing.assert_array_equal(samples[:, 2], 300)  # no noise in the history, none in the forecast


def test_samples_combine_fluctuations_the_window_never_had():
    # Two experts that always fluctuate in opposite directions; independent draws also pair their highs.
    history = np.array([[100, 300], [300, 100]] * 8, dtype=np.int64)
    samples = forecast_samples(history, 16, 200)
    totals = samples.sum(axis=1)
    assert totals.max() > history.sum(axis=1).max()


@pytest.mark.parametrize(
    "history,recent,count,message",
    [
        (np.zeros((0, 3), dtype=np.int64), 1, 1, "non-empty"),
        (np.array([[1, -1]]), 1, 1, "non-negative integer"),
        (np.array([[1.5, 2.0]]), 1, 1, "non-negative integer"),
        (np.array([[1, 2]]), 0, 1, "recent must be >= 1"),
        (np.array([[1, 2]]), 1, 0, "count must be >= 1"),
    ],
)
def test_bad_inputs_are_named(history, recent, count, message):
    with pytest.raises(ValueError, match=message):
        forecast_samples(history, recent, count)


@pytest.mark.parametrize("burst", [0.5, -1.0, float("nan")])
def test_bad_burst_is_named(burst):
    with pytest.raises(ValueError, match="burst must be 0 \\(off\\) or >= 1"):
        forecast_samples(np.array([[1, 2]]), 1, 1, burst=burst)


def test_planner_input_is_the_history_then_the_forecast():
    seed = _seed()
    history = np.random.default_rng(seed).integers(0, 50, size=(6, 5))
    np.testing.assert_array_equal(planner_input(history, 0, 4), history)
    both = planner_input(history, 7, 2, 3.0)
    np.testing.assert_array_equal(both[:6], history)
    np.testing.assert_array_equal(both[6:], forecast_samples(history, 2, 7, burst=3.0))
