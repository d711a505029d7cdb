"""Claim statistics: the bootstrap interval covers a known difference at its stated rate, agrees with the normal
interval where that is exact enough, and the verdicts (held / reversed / undecided / undertrained) follow it."""
import numpy as np
import pytest

from diffsr_kit.stats import bootstrap_interval, decide, ideal_bound, paired_differences


def simulate(rng, delta, seeds=3, images=20, image_sd=0.5, seed_sd=0.15):
    "Paired differences of one simulated claim: per-image effects around `delta` plus training-seed noise."
    eff = delta + image_sd * rng.standard_normal(images)
    return eff[None, :] + seed_sd * rng.standard_normal((seeds, images)) + seed_sd * rng.standard_normal((seeds, 1))


def test_interval_covers_a_known_difference_at_the_stated_rate():
    rng = np.random.default_rng(0)
    covered = sum(lo <= 0.2 <= hi for lo, hi in
                  (bootstrap_interval(simulate(rng, 0.2, images=40), n_boot=1000, seed=k)[1:] for k in range(100)))
    assert covered >= 90, covered  # 95 % intervals: at least 90 of 100 simulated claims


def test_one_seed_matches_the_normal_interval():
    "With one training seed and many images the percentile bootstrap is the textbook mean +- 1.96 sd / sqrt(n)."
    d = np.random.default_rng(1).normal(0.3, 0.8, size=(1, 400))
    mean, lo, hi = bootstrap_interval(d, n_boot=20000, seed=2)
    half = 1.959964 * d.std() / np.sqrt(d.size)
    assert abs(mean - d.mean()) < 1e-12
    assert abs(lo - (mean - half)) < 0.01 and abs(hi - (mean + half)) < 0.01, (lo, hi, mean - half, mean + half)


def test_verdicts():
    rng = np.random.default_rng(3)
    d = simulate(rng, 1.0)
    assert decide(d).verdict == 'held'
    assert decide(-d).verdict == 'reversed'
    same = np.full((3, 20, 4), 25.3) + rng.normal(size=(3, 20, 4))  # one model evaluated as both arms
    v = decide(paired_differences(same, same))
    assert v.verdict == 'undecided' and v.low == v.high == 0.0
    assert decide(simulate(rng, 0.0, image_sd=1.0)).verdict in ('undecided',)  # no effect, wide spread
    bound = ideal_bound('sample', regression=26.5, bicubic=25.6)
    assert bound == 23.5 and ideal_bound('regressor', 26.5, 25.6) == 25.6 and ideal_bound('mean', 26.5, 25.6) == 26.5
    v = decide(d, baseline=22.0, bound=bound)
    assert v.verdict == 'undertrained' and '1.50 below' in v.why
    assert decide(d, baseline=22.6, bound=bound).verdict == 'held'  # within the 1 dB margin


def test_shapes_and_errors():
    with pytest.raises(ValueError, match='same seeds and images'):
        paired_differences(np.zeros((3, 5)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match='training seeds, images'):
        bootstrap_interval(np.zeros(5))
    with pytest.raises(ValueError, match='coverage'):
        bootstrap_interval(np.zeros((2, 5)), level=95)
