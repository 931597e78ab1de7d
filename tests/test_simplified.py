"""The simplified model (S0, D, f): noise-free accuracy, a SciPy reference on noisy voxels,
no D_star map, status semantics, refusals, and calibrated uncertainty."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import curve_fit

import fastivim
import fastivim.kernels.status as status
from fastivim import ivim_signal

B5 = np.array([0.0, 50.0, 400.0, 600.0, 800.0])


@given(f=st.floats(0.02, 0.4), D=st.floats(0.3e-3, 3e-3), D_star=st.floats(0.04, 0.1),
       S0=st.floats(1.0, 5000.0), method=st.sampled_from(["segmented", "full"]))
def test_noise_free_biexponential_voxels_recover_f_and_D(f, D, D_star, S0, method):
    # the requirement: D_star >= 0.04 mm²/s, b = 0, 50, 400, 600, 800
    y = ivim_signal(B5, S0, f, D_star, D)[None, :]
    res = fastivim.fit_voxels(y, B5, method=method, model="simplified")
    assert res.status[0] == status.OK
    assert abs(res.f[0] - f) <= 0.02
    assert abs(res.D[0] / D - 1) <= 0.03
    assert res.S0[0] == pytest.approx(S0, rel=1e-5)


def test_noisy_voxels_match_a_scipy_reference():
    b = np.array([0.0, 0.0, 50.0, 200.0, 400.0, 800.0, 800.0])
    ph = fastivim.simulate.phantom((60,), b_values=b, snr=30, seed=2,
                                   ranges={"D_star": (0.04, 0.08)})
    res = fastivim.fit_voxels(ph.signal, b, model="simplified")
    high = b >= 200
    for v in range(60):
        y = ph.signal[v].astype(np.float64)
        (A, D), _ = curve_fit(lambda x, A, D: A * np.exp(-x * D), b[high], y[high],
                              p0=(y[0], 1e-3), xtol=1e-14, ftol=1e-14)
        S0 = y[b == 0].mean()
        assert res.D[v] == pytest.approx(D, rel=1e-5)
        assert res.S0[v] == pytest.approx(S0, rel=1e-6)
        assert res.f[v] == pytest.approx(np.clip(1 - A / S0, 0.0, 0.7), abs=1e-6)  # f bounds


def test_no_d_star_map_and_status_semantics():
    ph = fastivim.simulate.phantom((6, 7), b_values=B5, snr=40, seed=3)
    sig = ph.signal.copy()
    sig[0, 0, 1] = np.nan
    res = fastivim.fit_ivim(sig, B5, model="simplified", uncertainty=True)
    assert res.model == "simplified"
    assert res.D_star is None and res.D_star_sd is None
    assert "D_star" not in res.maps() and set(res.maps()) == {"D", "f", "S0", "r_squared",
                                                             "rmse"}
    for name in ("D", "f", "S0", "r_squared", "rmse", "D_sd", "f_sd", "S0_sd"):
        assert getattr(res, name).shape == (6, 7) and getattr(res, name).dtype == np.float32
    assert res.status[0, 0] == status.BAD_INPUT and np.isnan(res.D[0, 0])
    np.testing.assert_array_equal(res.quality_mask, res.status == status.OK)
    assert res.quality_mask[ph.mask].mean() > 0.8
    # a voxel whose decay is slower than the D bound allows is pinned there
    y = ivim_signal(B5, 1000.0, 0.1, 0.05, 0.05e-3)[None, :]
    pinned = fastivim.fit_voxels(y, B5, model="simplified")
    assert pinned.status[0] == status.AT_BOUND
    assert pinned.D[0] == pytest.approx(fastivim.DEFAULT_BOUNDS["D"][0], rel=1e-6)
    assert fastivim.fit_ivim(sig, B5).model == "ivim"


def test_refusals_and_small_protocols():
    y = ivim_signal(B5, 1000.0, 0.1, 0.05, 1e-3)[None, :]
    with pytest.raises(ValueError, match="bayesian method fits the ivim model"):
        fastivim.fit_voxels(y, B5, method="bayesian", model="simplified")
    with pytest.raises(ValueError, match="'model' must be 'ivim' or 'simplified'"):
        fastivim.fit_voxels(y, B5, model="mono")
    with pytest.raises(ValueError, match="needs b = 0"):
        fastivim.fit_voxels(y[:, 1:], B5[1:], model="simplified")
    with pytest.raises(ValueError, match="at least 2 distinct b-values >= b_threshold"):
        fastivim.fit_voxels(y, B5, model="simplified", b_threshold=700)
    b3 = np.array([0.0, 400.0, 800.0])  # three b-values are enough for this model
    res = fastivim.fit_voxels(ivim_signal(b3, 900.0, 0.2, 0.05, 1.1e-3)[None, :], b3,
                              model="simplified")
    assert res.f[0] == pytest.approx(0.2, abs=1e-4) and res.D[0] == pytest.approx(1.1e-3)
    with pytest.raises(ValueError, match="at least 4 distinct"):
        fastivim.fit_voxels(ivim_signal(b3, 900.0, 0.2, 0.05, 1.1e-3)[None, :], b3)


def test_simplified_uncertainty_is_calibrated():
    from scipy.stats import t as student_t

    b = np.array([0.0, 0.0, 50.0, 400.0, 600.0, 800.0, 800.0])
    ph = fastivim.simulate.phantom((4000,), b_values=b, snr=30, seed=9,
                                   ranges={"D_star": (0.04, 0.1)})
    res = fastivim.fit_voxels(ph.signal, b, model="simplified", uncertainty=True)
    q = res.quality_mask
    assert q.mean() > 0.85  # the rest: f pinned at 0 by noise on the low-f voxels
    # sigma comes from each voxel's own residuals with 6 - 3 = 3 degrees of freedom, so
    # estimate / SD follows Student's t with 3 degrees of freedom: mean +- 1.96 SD covers
    # the truth 85.5% of the time, not 95%
    expected = 2 * student_t.cdf(1.96, 3) - 1
    for p in ("S0", "f", "D"):
        sd = getattr(res, p + "_sd")[q]
        cover = np.mean(np.abs(getattr(res, p)[q] - ph.truth()[p][q]) <= 1.96 * sd)
        assert abs(cover - expected) <= 0.03, (p, cover, expected)
