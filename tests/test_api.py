"""The public API: names, shapes, dtypes, result attributes, status meanings, import hygiene."""

from __future__ import annotations

import numpy as np
import pytest

import fastivim
import fastivim.kernels.status as status
from fastivim.simulate import DEFAULT_B_VALUES

B = DEFAULT_B_VALUES
MAPS = ("D", "D_star", "f", "S0", "r_squared", "rmse")


def test_public_names():
    for name in ("fit_ivim", "fit_voxels", "ivim_signal", "simulate", "STATUS_MEANINGS",
                 "DEFAULT_BOUNDS", "PARAM_NAMES", "METHODS", "IVIMResult", "resolve_bounds"):
        assert hasattr(fastivim, name), name
    assert set(fastivim.METHODS) == {"segmented", "full", "bayesian", "spatial"}
    assert callable(fastivim.simulate.phantom)


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 2)])
@pytest.mark.parametrize("method", ["segmented", "full"])
def test_result_shapes_dtypes_and_attributes(shape, method):
    ph = fastivim.simulate.phantom(shape, snr=40, seed=1)
    res = fastivim.fit_ivim(ph.signal, ph.b_values, method=method)
    for name in MAPS:
        arr = getattr(res, name)
        assert arr.shape == shape and arr.dtype == np.float32, name
    assert res.quality_mask.shape == shape and res.quality_mask.dtype == np.bool_
    assert res.status.shape == shape and res.status.dtype == np.uint8
    assert res.shape == shape
    assert res.method == method
    assert res.bounds == fastivim.DEFAULT_BOUNDS
    np.testing.assert_array_equal(res.b_values, ph.b_values)
    assert res.b_values.dtype == np.float64
    np.testing.assert_array_equal(res.quality_mask, res.status == status.OK)
    assert set(res.maps()) == set(MAPS)
    assert sum(res.status_counts().values()) == int(np.prod(shape))


def test_one_default_method_for_both_entry_points():
    """fit_ivim and fit_voxels default to the CLI's method and give the same maps for the same
    voxels; both docstrings say which."""
    from fastivim.options import RunOptions

    ph = fastivim.simulate.phantom((6,), snr=40, seed=1)
    default = RunOptions().fit.method
    assert default == "segmented"
    a = fastivim.fit_ivim(ph.signal, ph.b_values)
    b = fastivim.fit_voxels(ph.signal, ph.b_values)
    assert a.method == b.method == default
    for name in ("S0", "f", "D_star", "D"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for fn in (fastivim.fit_ivim, fastivim.fit_voxels):
        assert f'default "{default}"' in fn.__doc__, fn.__name__


@pytest.mark.parametrize("method", ["segmented", "full"])
def test_fit_ivim_equals_fit_voxels(method):
    ph = fastivim.simulate.phantom((4, 6), snr=30, seed=8)
    vol = fastivim.fit_ivim(ph.signal, ph.b_values, method=method)
    vox = fastivim.fit_voxels(ph.signal.reshape(-1, B.size), ph.b_values, method=method)
    for name in MAPS:
        np.testing.assert_array_equal(getattr(vol, name).ravel(), getattr(vox, name), name)
    np.testing.assert_array_equal(vol.status.ravel(), vox.status)


def test_fit_voxels_requires_2d():
    with pytest.raises(ValueError, match="2-D"):
        fastivim.fit_voxels(np.ones((2, 3, B.size)), B)


def test_status_meanings_documented_for_every_code():
    codes = {v for k, v in vars(status).items() if k.isupper() and isinstance(v, int)}
    assert codes == set(fastivim.STATUS_MEANINGS)
    assert status.OK == 0
    for code, text in fastivim.STATUS_MEANINGS.items():
        assert 0 <= code <= 255 and isinstance(text, str) and len(text) > 5
    assert len(set(fastivim.STATUS_MEANINGS.values())) == len(fastivim.STATUS_MEANINGS)


@pytest.mark.parametrize("method", ["segmented", "full"])
def test_quality_and_status_consistency_on_noisy_data(method):
    """Every quality voxel is finite, interior and has D_star > D; NaN codes carry NaN maps."""
    ph = fastivim.simulate.phantom((16, 16), snr=25, seed=12)  # includes noise-only background
    res = fastivim.fit_ivim(ph.signal, ph.b_values, method=method)
    q = res.quality_mask
    assert q.any()
    assert set(np.unique(res.status)) <= set(fastivim.STATUS_MEANINGS)
    for name in MAPS:
        assert np.all(np.isfinite(getattr(res, name)[q])), name
    assert np.all(res.D_star[q] > res.D[q])
    for name, (lo, hi) in res.bounds.items():
        v = getattr(res, name)[q]
        assert np.all((v > np.float32(lo)) & (v < np.float32(hi))), name
    finite = np.isfinite(res.D)
    assert np.all(res.D_star[finite] > res.D[finite]) or np.all(
        res.status[finite & ~(res.D_star > res.D)] == status.DSTAR_NOT_ABOVE_D)
    nan_codes = [status.NO_CONVERGENCE, status.BAD_INPUT, status.NUMERICAL_FAILURE]
    assert np.all(np.isnan(res.D[np.isin(res.status, nan_codes)]))
    assert np.all(np.isfinite(res.D[np.isin(res.status, [status.OK, status.AT_BOUND])]))


@pytest.mark.parametrize("method", ["segmented", "full"])
def test_custom_bounds_are_respected(method):
    bounds = {"f": (0.05, 0.3), "D_star": (0.01, 0.05), "D": (0.5e-3, 2e-3), "S0": (500, 2000)}
    ph = fastivim.simulate.phantom((200,), snr=30, seed=5)
    res = fastivim.fit_voxels(ph.signal, ph.b_values, method=method, bounds=bounds)
    assert res.bounds == {k: (float(a), float(b)) for k, (a, b) in bounds.items()}
    for name, (lo, hi) in bounds.items():
        v = getattr(res, name)
        v = v[np.isfinite(v)]
        assert v.size > 0
        assert np.all((v >= np.float32(lo)) & (v <= np.float32(hi))), name


@pytest.mark.parametrize("method", ["segmented", "full"])
def test_zero_lower_bounds_accepted(method):
    """Lower bounds of 0 pass validation (OSIPI uses D >= 0), so the fit must run with them."""
    ph = fastivim.simulate.phantom((20,), snr=50, seed=5)
    res = fastivim.fit_voxels(ph.signal, ph.b_values, method=method,
                              bounds={"D": (0.0, 5e-3), "f": (0.0, 1.0)})
    assert np.isfinite(res.D).mean() > 0.8
    assert np.all(res.D[np.isfinite(res.D)] >= 0)


def test_ivim_signal_roundtrip_through_fit():
    b = np.array([0, 10, 20, 50, 100, 200, 400, 600, 800, 1000.0])
    S0 = np.array([[800.0, 1200.0]])
    sig = fastivim.ivim_signal(b, S0, 0.2, 0.04, 1.1e-3)
    assert sig.shape == (1, 2, b.size)
    res = fastivim.fit_ivim(sig, b, method="full")
    np.testing.assert_allclose(res.S0, S0, rtol=1e-4)
    np.testing.assert_allclose(res.D, 1.1e-3, rtol=1e-4)


def test_phantom_reproducible_by_seed():
    a = fastivim.simulate.phantom((8, 9), snr=30, seed=42)
    b = fastivim.simulate.phantom((8, 9), snr=30, seed=42)
    c = fastivim.simulate.phantom((8, 9), snr=30, seed=43)
    for name in ("signal", "S0", "f", "D_star", "D", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)
    assert not np.array_equal(a.signal, c.signal)
    assert a.signal.shape == (8, 9, B.size) and a.signal.dtype == np.float32
    assert a.mask.any() and not a.mask.all()
    clean = fastivim.simulate.phantom((8, 9), snr=None, seed=42)
    np.testing.assert_allclose(
        clean.signal, fastivim.ivim_signal(clean.b_values, clean.S0, clean.f, clean.D_star,
                                           clean.D), rtol=1e-6)
    truth = a.truth()
    assert set(truth) == {"S0", "f", "D_star", "D"}
    inside = a.mask
    assert np.all(truth["D_star"][inside] > truth["D"][inside])
    assert np.all(truth["S0"][~inside] == 0)


def test_progress_bar_gives_same_result(capsys):
    ph = fastivim.simulate.phantom((50,), snr=30, seed=3)
    quiet = fastivim.fit_ivim(ph.signal, ph.b_values, method="full")
    loud = fastivim.fit_ivim(ph.signal, ph.b_values, method="full", progress=True)
    for name in MAPS:
        np.testing.assert_array_equal(getattr(quiet, name), getattr(loud, name), name)


def test_mask_auto_is_the_command_lines_mask():
    """fit_ivim(signal, b, mask="auto") fits the voxels fastivim run fits (io.auto_mask), not
    the background; the docstring says what None does."""
    from fastivim.masking import auto_mask

    ph = fastivim.simulate.phantom((12, 10, 2), snr=30, seed=6)
    want, _ = auto_mask(ph.signal, ph.b_values)
    assert 0 < want.sum() < want.size  # the phantom has background
    res = fastivim.fit_ivim(ph.signal, ph.b_values, mask="auto")
    assert np.array_equal(res.status != status.OUTSIDE_MASK, want)
    every = fastivim.fit_ivim(ph.signal, ph.b_values)
    assert (every.status != status.OUTSIDE_MASK).all()
    with pytest.raises(ValueError, match="mask must be an array, None or 'auto'"):
        fastivim.fit_ivim(ph.signal, ph.b_values, mask="otsu")
    doc = " ".join(fastivim.fit_ivim.__doc__.split())
    assert "None (the default) fits every voxel, background included" in doc
    assert '"auto"' in doc


def test_ivim_result_docstring_lists_every_method():
    doc = fastivim.IVIMResult.__doc__
    for name in fastivim.METHODS:
        assert f'``"{name}"``' in doc, name
