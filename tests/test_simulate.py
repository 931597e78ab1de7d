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


def test_lesion_phantom_has_varying_organs_lesions_and_rings():
    from fastivim.simulate import LESION_VALUES, OSIPI_TISSUES, lesion_contrast, lesion_phantom

    ph = lesion_phantom((64, 64, 3), snr=None, seed=1, voxel_size=(1.5, 1.5, 4.0))
    assert ph.voxel_size == (1.5, 1.5, 4.0) and ph.lesions.max() >= 5
    names = list(OSIPI_TISSUES)
    for k in range(1, ph.lesions.max() + 1):
        les, ring = ph.lesions == k, ph.rings == k
        organ = ph.labels[les]
        assert np.all(organ == organ[0]) and np.all(ph.labels[ring] == organ[0])
        assert not np.any(les & ring)
        across = np.ptp(np.argwhere(les)[:, :2], axis=0).max() + 1
        assert 2 <= across <= 5
        for p, v in zip(("f", "D_star", "D"), LESION_VALUES, strict=True):
            assert np.all(np.abs(ph.truth()[p][les] / v - 1) <= 0.12 + 1e-9), p
    # organs vary smoothly (±10%) plus jitter, and are not uniform blocks
    liver = (ph.labels == names.index("liver") + 1) & (ph.lesions == 0)
    rel = ph.D[liver] / OSIPI_TISSUES["liver"][2] - 1
    assert 0.03 < rel.std() < 0.1 and np.abs(rel).max() < 0.1 + 3 * 0.04 * 1.1 + 0.02
    # noise-free: a map equal to the truth keeps every lesion's contrast exactly
    np.testing.assert_allclose(lesion_contrast(ph.f, ph.f, ph), 1.0)
    again = lesion_phantom((64, 64, 3), snr=None, seed=1, voxel_size=(1.5, 1.5, 4.0))
    np.testing.assert_array_equal(again.D, ph.D)
