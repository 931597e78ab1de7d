"""Noise-free analytic signals: the kernels must recover the parameters that made them.

Signals come from :func:`fastivim.ivim_signal` in float64 for parameters drawn by
``strategies.ivim_params`` (f in [0.02, 0.4], D in [0.3e-3, 3e-3] mm²/s, D_star in
[max(5 D, 2e-3), 0.1] mm²/s) on several b-value schemes (``strategies.B_SCHEMES``: the default
10-b scheme, OSIPI's 18-b scheme, a clinical scheme with repeated b-values in shuffled order, and
one without b = 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from reference import loglinear_D, segmented_D_bound, ssr
from strategies import B_SCHEMES, DSTAR_MAX, DSTAR_MIN, ivim_params, params_tuple

import fastivim
import fastivim.kernels.status as status

#: Relative tolerance of the full fit on noise-free float64 signals (per parameter).
FULL_RTOL = {"S0": 1e-4, "f": 1e-4, "D_star": 1e-4, "D": 1e-4}

#: The returned maps are float32: agreement with a float64 reference is limited to a few ulp.
FLOAT32_RTOL = 4 * float(np.finfo(np.float32).eps)

scheme_names = st.sampled_from(sorted(B_SCHEMES))


def _fit(p, scheme, method, **kw):
    b = B_SCHEMES[scheme]
    y = ivim_signal_row(b, p)
    res = fastivim.fit_voxels(y[None, :], b, method=method, **kw)
    return b, y, res


def ivim_signal_row(b, p):
    return fastivim.ivim_signal(b, *params_tuple(p))


@given(p=ivim_params(), scheme=scheme_names)
@example(p={"S0": 1.0, "f": 0.02, "D_star": 1.5e-3 * 5, "D": 1.5e-3}, scheme="no_b0")
@example(p={"S0": 1000.0, "f": 0.4, "D_star": 0.1, "D": 3e-3}, scheme="clinical_shuffled")
@example(p={"S0": 1000.0, "f": 0.02, "D_star": 2e-3, "D": 0.3e-3}, scheme="default10")
@example(p={"S0": 1.0, "f": 0.1, "D_star": 0.02, "D": 1e-3}, scheme="osipi18")
def test_full_recovers_parameters(p, scheme):
    """``full`` recovers S0, f, D_star and D to rtol 1e-4 on exact float64 signals."""
    b, y, res = _fit(p, scheme, "full")
    got = {name: float(getattr(res, name)[0]) for name in FULL_RTOL}
    for name, rtol in FULL_RTOL.items():
        assert got[name] == pytest.approx(p[name], rel=rtol), (
            f"{name}: got {got[name]!r}, true {p[name]!r} (scheme {scheme}, status "
            f"{res.status[0]}, fit {got})"
        )
    # a D_star drawn at one of its bounds is (correctly) reported as pinned there
    at_bound = p["D_star"] >= DSTAR_MAX * (1 - 1e-6) or p["D_star"] <= DSTAR_MIN * (1 + 1e-6)
    assert res.status[0] in ((status.OK, status.AT_BOUND) if at_bound else (status.OK,))
    assert bool(res.quality_mask[0]) == (res.status[0] == status.OK)
    # exact data: the residual is at the float32 rounding level of the returned parameters
    assert res.rmse[0] <= 1e-5 * p["S0"]
    assert res.r_squared[0] == pytest.approx(1.0, abs=1e-6)


@given(p=ivim_params(), scheme=scheme_names, b_threshold=st.sampled_from([150.0, 200.0, 250.0]))
@example(p={"S0": 1000.0, "f": 0.4, "D_star": 2e-3, "D": 0.3e-3}, scheme="default10",
         b_threshold=200.0)
@example(p={"S0": 1.0, "f": 0.02, "D_star": 0.1, "D": 3e-3}, scheme="clinical_shuffled",
         b_threshold=200.0)
def test_segmented_D_is_the_weighted_loglinear_fit(p, scheme, b_threshold):
    """``segmented`` D equals the slow NumPy log-linear reference (weights w·S², b ≥ b_thr).

    The reference (``reference.loglinear_D``) averages repeated b-values, keeps the means at
    b ≥ b_threshold and fits ln S = ln A − b·D with weights (count · mean²). Both sides see the
    same float64 signal, so they may differ only by the float32 rounding of the output (after
    clipping to the D bounds, as the kernel does).
    """
    b, y, res = _fit(p, scheme, "segmented", b_threshold=b_threshold)
    _, D_ref = loglinear_D(b, y, b_threshold)
    lo, hi = res.bounds["D"]
    D_ref = min(max(D_ref, lo), hi)
    assert float(res.D[0]) == pytest.approx(D_ref, rel=FLOAT32_RTOL), (scheme, b_threshold)


@given(p=ivim_params(), scheme=scheme_names, b_threshold=st.sampled_from([150.0, 200.0, 250.0]))
@example(p={"S0": 1000.0, "f": 0.4, "D_star": 2e-3, "D": 0.3e-3}, scheme="default10",
         b_threshold=200.0)
@example(p={"S0": 500.0, "f": 0.3, "D_star": 0.015, "D": 3e-3}, scheme="osipi18",
         b_threshold=200.0)
def test_segmented_D_within_high_b_approximation(p, scheme, b_threshold):
    """``segmented`` recovers the true D as closely as the high-b approximation allows.

    Derivation (see ``reference.segmented_D_bound``): on exact data
    ``ln S(b) = ln(S0 (1 − f)) − b·D + ε(b)`` with ``ε(b) = ln(1 + u(b))`` and
    ``u(b) = f/(1 − f) · exp(−b (D_star − D))``. ε is decreasing and convex; a positively
    weighted least-squares slope is a positively weighted mean of secant slopes, each in
    ``[ε'(b₁), 0]`` where b₁ is the smallest b-value ≥ b_threshold. Hence, for any weights::

        0 ≤ D_seg − D ≤ (D_star − D) · u₁ / (1 + u₁),     u₁ = f/(1 − f) · exp(−b₁ (D_star − D))

    i.e. the segmented D is never below the truth, and its relative error is at most
    ``(D_star/D − 1) · u₁``. Example: with D_star ≥ 10·D and f·exp(−b₁·D_star) ≤ 1e-3 the
    error is below ~1.2 %; when the perfusion term is negligible at b₁ (u₁·(D_star/D − 1) ≤
    1e-3), D is within 0.1 %. The test checks the two-sided bound for every draw (plus the
    float32 rounding of the output) and, separately, the 0.1 % figure where it applies.
    """
    b, y, res = _fit(p, scheme, "segmented", b_threshold=b_threshold)
    D_seg = float(res.D[0])
    b_first = float(np.min(b[b >= b_threshold]))
    bound = segmented_D_bound(p["f"], p["D_star"], p["D"], b_first)
    slack = FLOAT32_RTOL * p["D"]
    upper = min(p["D"] + bound, res.bounds["D"][1])  # the kernel clips D to its bounds
    assert p["D"] - slack <= D_seg <= upper + slack, (D_seg, p["D"], bound)
    if bound <= 1e-3 * p["D"]:
        assert D_seg == pytest.approx(p["D"], rel=1e-3 + FLOAT32_RTOL)


@given(p=ivim_params(S0=st.just(1000.0)), scheme=scheme_names)
def test_segmented_is_a_valid_fit(p, scheme):
    """``segmented`` returns a valid, bounded model whose SSR is no better than ``full``'s.

    ``full`` minimises the SSR over all four parameters; ``segmented`` fixes D first, so on
    the same data its SSR cannot be lower (beyond float32 rounding of the returned maps).
    """
    b, y, seg = _fit(p, scheme, "segmented")
    _, _, full = _fit(p, scheme, "full")
    s_seg = ssr([seg.S0[0], seg.f[0], seg.D_star[0], seg.D[0]], b, y)
    s_full = ssr([full.S0[0], full.f[0], full.D_star[0], full.D[0]], b, y)
    assert math.isfinite(s_seg)
    assert seg.D_star[0] > seg.D[0]
    for name, (lo, hi) in seg.bounds.items():  # bounds as rounded into the float32 maps
        assert np.float32(lo) <= getattr(seg, name)[0] <= np.float32(hi), name
    # float32 rounding of exact-fit parameters leaves an SSR of order (1e-7 · S0)² · n_b
    assert s_full <= s_seg + 1e-10 * p["S0"] ** 2 * b.size


@pytest.mark.parametrize("method", ["full", "segmented"])
@pytest.mark.parametrize("scheme", sorted(B_SCHEMES))
def test_column_order_and_repeats_do_not_matter(method, scheme):
    """Permuting the b-value columns, or duplicating every column, gives the same fit."""
    rng = np.random.default_rng(5)
    b = B_SCHEMES[scheme]
    truth = np.array([[1000.0, 0.15, 0.03, 1.2e-3], [700.0, 0.3, 0.012, 0.8e-3]])
    Y = fastivim.ivim_signal(b, *truth.T)
    perm = rng.permutation(b.size)
    base = fastivim.fit_voxels(Y, b, method=method)
    shuffled = fastivim.fit_voxels(Y[:, perm], b[perm], method=method)
    doubled = fastivim.fit_voxels(np.concatenate([Y, Y], axis=1), np.concatenate([b, b]),
                                  method=method)
    for other in (shuffled, doubled):
        np.testing.assert_array_equal(other.status, base.status)
        for name in ("S0", "f", "D_star", "D"):
            np.testing.assert_allclose(getattr(other, name), getattr(base, name), rtol=1e-5,
                                       err_msg=name)
