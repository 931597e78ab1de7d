"""Bad or unusual input: a documented ValueError, or NaN maps with quality 0 — never a crash.

Per-voxel problems (NaN/inf samples, no positive signal) must not stop the run: the voxel gets
NaN parameters, ``quality_mask`` False and status BAD_INPUT, and every other voxel is fitted as
if it were alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastivim
import fastivim.kernels.status as status
from fastivim.simulate import DEFAULT_B_VALUES

B = DEFAULT_B_VALUES
MAPS = ("D", "D_star", "f", "S0", "r_squared", "rmse")
METHODS = ("segmented", "full")
TRUTH = np.array([1000.0, 0.2, 0.03, 1.2e-3])  # S0, f, D_star, D


def _good(n=3):
    return np.repeat(fastivim.ivim_signal(B, *TRUTH)[None, :], n, axis=0)


def _assert_failed(res, idx, code=status.BAD_INPUT):
    for name in MAPS:
        assert np.all(np.isnan(getattr(res, name)[idx])), name
    assert not np.any(res.quality_mask[idx])
    assert np.all(res.status[idx] == code)


def _assert_same_as_alone(res, idx, Y, method):
    alone = fastivim.fit_voxels(Y[idx], B, method=method)
    for name in MAPS:
        np.testing.assert_array_equal(getattr(res, name)[idx], getattr(alone, name), name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda y: np.where(np.arange(y.size) == 3, np.nan, y), id="one-nan"),
        pytest.param(lambda y: np.full_like(y, np.nan), id="all-nan"),
        pytest.param(lambda y: np.where(np.arange(y.size) == 0, np.inf, y), id="inf"),
        pytest.param(lambda y: np.where(np.arange(y.size) == 9, -np.inf, y), id="minus-inf"),
        pytest.param(lambda y: np.zeros_like(y), id="all-zero"),
        pytest.param(lambda y: -y, id="negative-only"),
        pytest.param(lambda y: np.where(y > 0, -1.0, 0.0), id="negative-and-zero"),
    ],
)
def test_bad_voxel_is_nan_and_others_unaffected(method, bad):
    Y = _good(4)
    Y[1] = bad(Y[1])
    res = fastivim.fit_voxels(Y, B, method=method)
    _assert_failed(res, 1)
    _assert_same_as_alone(res, [0, 2, 3], Y, method)
    assert np.all(res.quality_mask[[0, 2, 3]])


@pytest.mark.parametrize("method", METHODS)
def test_huge_and_tiny_values(method):
    """The fit is scale-free: 1e30 and 1e-30 signals give the same f, D_star, D."""
    base = fastivim.fit_voxels(_good(1), B, method=method)
    for factor in (1e30, 1e-30):
        res = fastivim.fit_voxels(_good(1) * factor, B, method=method)
        assert res.status[0] == base.status[0]
        for name in ("f", "D_star", "D"):
            np.testing.assert_allclose(getattr(res, name), getattr(base, name), rtol=1e-5)
        np.testing.assert_allclose(res.S0, base.S0 * factor, rtol=1e-5)
    # beyond float32 (the output type): no crash, status never OK with non-finite maps
    res = fastivim.fit_voxels(_good(1) * 1e300, B, method=method)
    assert res.status[0] != status.OK or np.isfinite(res.S0[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint16", "int32", ">f8",
                                   ">f4", ">i2"])
def test_dtypes_and_byte_order(method, dtype):
    """float32/64, integers and big-endian arrays give the same fit as native float64."""
    Y = np.round(_good(2))
    ref = fastivim.fit_voxels(Y.astype(np.float64), B, method=method)
    res = fastivim.fit_voxels(Y.astype(dtype), B, method=method)
    assert res.D.dtype == np.float32
    np.testing.assert_array_equal(res.status, ref.status)
    # float32 input rounds the samples (rel 6e-8), which moves the estimate slightly
    rtol = 1e-6 if np.dtype(dtype).itemsize >= 8 else 1e-3
    for name in ("S0", "f", "D_star", "D"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), rtol=rtol, err_msg=name)


def test_int16_typical_scanner_data():
    """Scanner-like int16 magnitudes with noise: runs, maps float32, mostly good quality."""
    ph = fastivim.simulate.phantom((40,), snr=50, seed=2)
    Y = np.clip(np.round(ph.signal), 0, 32767).astype(np.int16)
    for method in METHODS:
        res = fastivim.fit_ivim(Y, B, method=method)
        assert res.D.dtype == np.float32 and res.D.shape == (40,)
        assert res.quality_mask.mean() > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_input(method):
    ph = fastivim.simulate.phantom((6, 5), snr=40, seed=4)
    ref = fastivim.fit_ivim(np.ascontiguousarray(ph.signal), B, method=method)
    fortran = np.asfortranarray(ph.signal)
    strided = np.zeros(ph.signal.shape[:-1] + (2 * B.size,), np.float32)[..., ::2]
    strided[...] = ph.signal
    transposed = np.ascontiguousarray(np.swapaxes(ph.signal, 0, 1)).swapaxes(0, 1)
    for arr in (fortran, strided, transposed):
        assert not arr.flags.c_contiguous
        res = fastivim.fit_ivim(arr, B, method=method)
        for name in MAPS:
            np.testing.assert_array_equal(getattr(res, name), getattr(ref, name), name)
        np.testing.assert_array_equal(res.status, ref.status)


@pytest.mark.parametrize("method", METHODS)
def test_single_voxel_shapes(method):
    y = _good(1)[0]
    one_d = fastivim.fit_ivim(y, B, method=method)  # a signal with no spatial axes
    assert one_d.D.shape == () and one_d.status.shape == ()
    assert one_d.quality_mask.dtype == bool
    row = fastivim.fit_voxels(y[None], B, method=method)
    assert row.D.shape == (1,)
    assert float(one_d.D) == row.D[0]


@pytest.mark.parametrize("method", METHODS)
def test_mask_handling(method):
    ph = fastivim.simulate.phantom((5, 4, 3), snr=40, seed=9)
    mask = np.zeros((5, 4, 3), bool)
    mask[1:4, 1:3, :] = True
    res = fastivim.fit_ivim(ph.signal, B, mask=mask, method=method)
    full = fastivim.fit_ivim(ph.signal, B, method=method)
    for name in MAPS:
        assert np.all(np.isnan(getattr(res, name)[~mask])), name
        np.testing.assert_array_equal(getattr(res, name)[mask], getattr(full, name)[mask], name)
    assert np.all(res.status[~mask] == status.OUTSIDE_MASK)
    assert not np.any(res.quality_mask[~mask])
    # integer 0/1 masks mean the same as booleans
    res01 = fastivim.fit_ivim(ph.signal, B, mask=mask.astype(np.uint8), method=method)
    np.testing.assert_array_equal(res01.status, res.status)


@pytest.mark.parametrize("method", METHODS)
def test_empty_mask_and_empty_input(method):
    ph = fastivim.simulate.phantom((3, 4), snr=40, seed=1)
    res = fastivim.fit_ivim(ph.signal, B, mask=np.zeros((3, 4), bool), method=method)
    assert res.D.shape == (3, 4) and np.all(np.isnan(res.D))
    assert np.all(res.status == status.OUTSIDE_MASK) and not res.quality_mask.any()
    empty = fastivim.fit_voxels(np.empty((0, B.size)), B, method=method)
    assert empty.D.shape == (0,) and empty.status.shape == (0,)
    assert empty.D.dtype == np.float32 and empty.status.dtype == np.uint8


def test_mask_shape_mismatch():
    ph = fastivim.simulate.phantom((3, 4), snr=40, seed=1)
    with pytest.raises(ValueError, match="mask"):
        fastivim.fit_ivim(ph.signal, B, mask=np.ones((4, 3), bool))


@pytest.mark.parametrize(
    "b_values, match",
    [
        (np.array([0, 100, 100, 0, 100, 0, 500, 500, 500, 0.0]), "4 distinct"),  # 3 distinct
        (np.array([0, 10, 20, 30, 50, 80, 100, 200, 400]), "b-values"),  # count mismatch
        (np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, np.nan]), "NaN"),
        (np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, -800]), ">= 0"),
        (np.zeros((2, 5)), "one-dimensional"),
    ],
)
def test_bad_b_values(b_values, match):
    for method in METHODS:
        with pytest.raises(ValueError, match=match):
            fastivim.fit_voxels(_good(1), b_values, method=method)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        fastivim.fit_ivim(_good(1), B, method="bayes")
    for name in fastivim.METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("b_threshold", [np.nan, -1.0, np.inf])
def test_bad_b_threshold(b_threshold):
    with pytest.raises(ValueError, match="b_threshold"):
        fastivim.fit_voxels(_good(1), B, method="segmented", b_threshold=b_threshold)


def test_segmented_needs_two_high_b_values():
    with pytest.raises(ValueError, match="b_threshold"):
        fastivim.fit_voxels(_good(1), B, method="segmented", b_threshold=500.0)


def test_complex_or_object_signal_rejected():
    with pytest.raises(ValueError):
        fastivim.fit_voxels(_good(1).astype(complex), B)
    with pytest.raises(ValueError):
        fastivim.fit_voxels(np.array([["a"] * B.size]), B)


@given(Y=hnp.arrays(np.float64, (3, B.size),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=64)),
       method=st.sampled_from(METHODS))
def test_arbitrary_values_never_crash(Y, method):
    """Any float64 values: the run completes and every voxel is consistent with its status."""
    res = fastivim.fit_voxels(Y, B, method=method)
    assert set(np.unique(res.status)) <= set(fastivim.STATUS_MEANINGS)
    nan_codes = (status.NO_CONVERGENCE, status.BAD_INPUT, status.NUMERICAL_FAILURE)
    for i in range(3):
        params = np.array([res.S0[i], res.f[i], res.D_star[i], res.D[i]])
        if res.status[i] in nan_codes:
            assert np.all(np.isnan(params))
        if not np.all(np.isfinite(Y[i])) or not np.any(Y[i] > 0):
            assert res.status[i] == status.BAD_INPUT
        if res.quality_mask[i]:
            assert np.all(np.isfinite(params)) and res.D_star[i] > res.D[i]
