"""The tissue phantom: known truth per organ, deterministic, Rician noise of the stated level."""

from __future__ import annotations

import numpy as np
import pytest

from fastivim import DEFAULT_BOUNDS, ivim_signal
from fastivim.simulate import B_SCHEMES, OSIPI_TISSUES, TISSUE_VARIATION, tissue_phantom


def test_tissue_phantom_is_deterministic_for_a_seed():
    a = tissue_phantom((30, 28, 2), snr=20, seed=3)
    b = tissue_phantom((30, 28, 2), snr=20, seed=3)
    c = tissue_phantom((30, 28, 2), snr=20, seed=4)
    for name in ("signal", "S0", "f", "D_star", "D", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
    assert not np.array_equal(a.signal, c.signal)
    np.testing.assert_array_equal(a.labels, c.labels)  # the layout does not depend on the seed


def test_tissue_values_and_variation_follow_the_osipi_table():
    ph = tissue_phantom((144, 144), snr=None, seed=0)
    assert ph.tissues == tuple(OSIPI_TISSUES)
    assert set(np.unique(ph.labels)) == set(range(len(OSIPI_TISSUES) + 1))  # every organ shows
    np.testing.assert_array_equal(ph.mask, ph.labels > 0)
    for k, name in enumerate(ph.tissues, start=1):
        m = ph.labels == k
        for p, value in zip(("f", "D_star", "D"), OSIPI_TISSUES[name], strict=True):
            x = ph.truth()[p][m]
            lo, hi = DEFAULT_BOUNDS[p]
            assert np.all((x >= lo) & (x <= hi)), (name, p)
            if value * (1 + 3 * TISSUE_VARIATION) < hi and m.sum() >= 200:  # not clipped
                assert np.mean(x) == pytest.approx(value, rel=0.03), (name, p)
                assert np.std(x) / value == pytest.approx(TISSUE_VARIATION, rel=0.2), (name, p)
    for p in ("S0", "f", "D_star", "D"):
        assert np.all(ph.truth()[p][~ph.mask] == 0)


def test_noise_free_signal_is_the_model_and_noise_is_rician():
    b = B_SCHEMES["clinical11"]
    clean = tissue_phantom((40, 40), b_values=b, snr=None, seed=2)
    t = clean.truth()
    np.testing.assert_allclose(clean.signal, ivim_signal(b, t["S0"], t["f"], t["D_star"], t["D"]),
                               rtol=1e-6)
    noisy = tissue_phantom((40, 40), b_values=b, snr=20, seed=2)
    np.testing.assert_array_equal(noisy.labels, clean.labels)
    assert noisy.sigma == 50.0
    # background: magnitude of pure complex noise, a Rayleigh variable of mean sigma*sqrt(pi/2)
    bg = noisy.signal[~noisy.mask].astype(np.float64)
    assert bg.mean() == pytest.approx(noisy.sigma * np.sqrt(np.pi / 2), rel=0.03)
