"""The model module: the IVIM equation, parameter names and bound resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import B_SCHEMES, ivim_params

import fastivim
from fastivim import DEFAULT_BOUNDS, PARAM_NAMES, ivim_signal, resolve_bounds


def test_param_names_and_default_bounds():
    assert PARAM_NAMES == ("S0", "f", "D_star", "D")
    assert set(DEFAULT_BOUNDS) == set(PARAM_NAMES)
    assert DEFAULT_BOUNDS["D"] == pytest.approx((0.1e-3, 5e-3))
    assert DEFAULT_BOUNDS["D_star"] == pytest.approx((2e-3, 100e-3))
    assert DEFAULT_BOUNDS["f"] == pytest.approx((0.0, 0.7))
    assert DEFAULT_BOUNDS["S0"][0] == 0.0 and DEFAULT_BOUNDS["S0"][1] == math.inf


@given(p=ivim_params(), scheme=st.sampled_from(sorted(B_SCHEMES)))
@example(p={"S0": 1.0, "f": 0.0, "D_star": 0.05, "D": 1e-3}, scheme="default10")
def test_ivim_signal_matches_written_out_equation(p, scheme):
    b = B_SCHEMES[scheme]
    got = ivim_signal(b, p["S0"], p["f"], p["D_star"], p["D"])
    for k, bk in enumerate(b):
        want = p["S0"] * (p["f"] * math.exp(-bk * p["D_star"])
                          + (1 - p["f"]) * math.exp(-bk * p["D"]))
        assert got[k] == pytest.approx(want, rel=1e-14, abs=0)
    assert got.dtype == np.float64
    # b = 0 gives S0; the signal decays monotonically with b
    order = np.argsort(b, kind="stable")
    assert np.all(np.diff(got[order]) <= 0)
    if 0 in b:
        np.testing.assert_allclose(got[b == 0], p["S0"], rtol=1e-15)


def test_ivim_signal_broadcasting():
    b = np.array([0.0, 100.0, 500.0, 1000.0])
    S0 = np.array([[1.0], [2.0]])  # (2, 1)
    f = np.array([0.1, 0.2, 0.3])  # (3,)
    out = ivim_signal(b, S0, f, 0.05, 1e-3)
    assert out.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j], ivim_signal(b, S0[i, 0], f[j], 0.05, 1e-3),
                                       rtol=1e-15)
    # scalars in, (n_b,) out; integer inputs become float64
    scalar = ivim_signal([0, 100, 200, 300], 1000, 0, 0.01, 0.001)
    assert scalar.shape == (4,) and scalar.dtype == np.float64
    np.testing.assert_allclose(scalar, 1000 * np.exp(-np.array([0, 100, 200, 300]) * 1e-3))
    # a parameter map of any spatial shape gets a trailing b axis
    maps = ivim_signal(b, np.ones((2, 3, 5)), 0.1, 0.02, 1e-3)
    assert maps.shape == (2, 3, 5, 4)


def test_resolve_bounds_defaults_and_merge():
    assert resolve_bounds(None) == DEFAULT_BOUNDS
    merged = resolve_bounds({"f": (0.0, 1.0), "D": [0, 0.005]})
    assert merged["f"] == (0.0, 1.0)
    assert merged["D"] == (0.0, 0.005)
    assert merged["S0"] == DEFAULT_BOUNDS["S0"] and merged["D_star"] == DEFAULT_BOUNDS["D_star"]
    assert all(isinstance(v, float) for pair in merged.values() for v in pair)
    # the defaults are not mutated by a merge
    assert DEFAULT_BOUNDS["f"] == (0.0, 0.7)


@pytest.mark.parametrize(
    "bounds, key",
    [
        ({"Dstar": (2e-3, 0.1)}, "Dstar"),
        ({"d": (1e-4, 5e-3)}, "d"),
        ({"f": (0.5, 0.2)}, "f"),
        ({"D": (4e-3, 1e-3)}, "D"),
        ({"S0": (-math.inf, 10.0)}, "S0"),
        ({"D_star": (math.nan, 0.1)}, "D_star"),
        ({"D_star": (1e-3,)}, "D_star"),
        ({"S0": ("a", "b")}, "S0"),
    ],
)
def test_resolve_bounds_rejects_with_key_in_message(bounds, key):
    with pytest.raises(ValueError, match=repr(key)):
        resolve_bounds(bounds)


@pytest.mark.parametrize("bounds", [{"Dstar": (2e-3, 0.1)}, {"f": (0.5, 0.2)},
                                    {"D": (-math.inf, 1e-3)}])
def test_fit_rejects_bad_bounds(bounds):
    """The fitting API validates bounds before doing any work."""
    ph = fastivim.simulate.phantom((2,), snr=None, seed=0)
    for fit in (fastivim.fit_ivim, fastivim.fit_voxels):
        with pytest.raises(ValueError, match=repr(next(iter(bounds)))):
            fit(ph.signal, ph.b_values, bounds=bounds)
