"""Block kernels: the scalar kernels' algorithm, a block of voxels at a time.

The scalar kernel (:mod:`fastivim.kernels.driver`) fits one voxel after another; its inner
loops run over ~10 b-values and call libm's ``exp``, so the CPU's vector units stay idle. Here
a block of up to :data:`BLOCK` voxels is stored lane-wise (``(n_u, BLOCK)`` arrays, one column
per voxel): every stage loops over b-values (or grid points) outside and over the voxels of the
block inside, and LLVM vectorises that inner loop (8 float64 lanes with AVX-512). Three things
make it vectorise and keep it exact:

* :func:`fastivim.kernels.vmath.vexp`, a branch-free exp within ~2 ulp of libm's;
* :data:`fastivim.kernels._jit.jit_block` marks array arguments ``noalias`` (otherwise LLVM
  must assume that the output columns may overlap the inputs, and vectorises nothing);
* per-voxel decisions are written as selects with both operands computed first, never as a
  branch on data inside a lane loop.

Each voxel makes the same decisions as in the scalar kernel, in the same floating-point order;
only ``exp`` differs (by an ulp or two), so sums of squares agree to ~1e-12 except where two
starting points tie to within rounding (tests/test_block.py measures the agreement).

Iterative work differs in length from voxel to voxel, so it runs on lanes fed from the block
(a task list), and a lane whose run has ended takes the next one: a slow voxel never holds the
others. The ``full`` method's Levenberg–Marquardt runs go to :data:`LANES` lanes: each round
evaluates the model, gradient and Hessian of every lane at once, then takes every lane's step
and accept/reject lane-wise (:mod:`fastivim.kernels.lm_lanes`); a lane whose run has ended
takes the voxel's next start, or the block's next voxel. The ``segmented`` method's profile
Newton runs on :data:`NEWTON_LANES` lanes, and its bounded 2-parameter LM (voxels whose optimum
is on a bound) on :data:`PERFUSION_LANES`. Both methods finish voxels lane-wise
(:func:`block_finish`).

Two more things keep the lane loops vectorised. A numba call that passes arrays pays atomic
reference counting on entry and exit (~100 ns with a dozen arrays, even when numba inlines
it), so per-lane work is written out in the loops, not in helpers. And a loop that stores to
several rows of one 2-D array gets run-time overlap checks from LLVM that fail, so the scalar
copy of the loop runs: lane state is kept in separate arrays, or flat with the compile-time
lane count as row length (tests/test_block.py checks the IR for such checks).
"""

import math
from collections import namedtuple

import numpy as np
from numba import njit, prange

from . import status as st
from ._jit import FASTMATH_FLAGS, jit_block, jit_parallel, jit_voxel
from .full import (
    MAX_RESTARTS,
    RESTART_NEIGHBOURHOOD,
    RESTART_SLACK,
    SEPARATION,
    mark_restarts,
    pop_best_restart,
)
from .lm_lanes import (
    CONVERGED,
    HELD,
    IDLE,
    INIT,
    RETRY,
    RUNNING,
    TRIAL,
    lanes_accept,
    lanes_step,
)
from .segmented import DSTAR_MARGIN, PROFILE_MAXIT, PROFILE_XTOL
from .tables import METHOD_FULL, METHOD_SEGMENTED
from .vmath import vexp, vmax, vmin
from .voxel import (
    FLOAT32_MAX,
    LM_FTOL,
    LM_LAMBDA0,
    LM_LAMBDA_MAX,
    LM_XTOL,
    PIN_TOL,
)

#: Voxels per block (the width of every lane-wise array) of the full method, and of the
#: segmented method. Both feed their lanes (LM runs, profile-Newton iterations, bounded LM runs)
#: from the whole block, so larger blocks leave fewer lanes idle at the block's end (a voxel
#: can need 30 Newton iterations where most need 4). Segmented, 1 thread, 2·10⁵ voxels at SNR 30
#: (CPU ns per voxel): blocks of 512 322, 256 333, 128 355 (16 Newton lanes; 8 lanes at 128:
#: 431 before the bounded LM went lane-wise, 32 lanes 462); lock-step Newton over blocks of 32
#: (no lanes) 570. Full (a voxel's LM runs are sequential), 1 thread, 4·10⁴ voxels at SNR 30:
#: blocks of 128 2070, 512 1930; 1024 1880 against 512's 1830 in the same run. Since its LM
#: runs go in two passes (the restarts after the block's profiles, :func:`full_block`), each
#: block has two tails; same phantom, TSC ticks per voxel, two runs each: blocks of 1024 5100,
#: 5220; 512 6060, 5840; 2048 5790, 5460.
BLOCK = 1024
SEGMENTED_BLOCK = 512
#: Lanes of the lock-step Levenberg–Marquardt engine of the ``full`` method.
LANES = 16
#: A lane that must damp harder and solve again without an evaluation (``RETRY``, about 2.3
#: times per voxel of the full method, 2·10⁵ voxels at SNR 30) either waits for the next
#: round's :func:`fastivim.kernels.lm_lanes.lanes_step`, costing it one evaluation slot (~1/16
#: of a round's evaluation), or the step runs again at once over all lanes (~1/3 of a round's
#: evaluation). From this many waiting lanes on, the pass at once is the cheaper. Either way
#: each lane takes the same decisions: the answers are the same bits.
RETRY_PASS_MIN = 4
#: Lanes of the segmented method's profile-Newton engine.
NEWTON_LANES = 16
#: Lanes of the segmented method's bounded 2-parameter LM (a fifth of the voxels need it).
PERFUSION_LANES = 8


#: Pending failure code of a segmented voxel that has none (any value that is no status code).
GO = 255

Scratch = namedtuple(
    "Scratch",
    [
        # per voxel of the block, (.., BLOCK)
        "YB", "SC", "LO", "HI", "CODE", "A", "D", "R", "Q", "BLO", "BHI", "DSLO", "ACC", "NUSED",
        "BFIRST", "DIST", "BEST", "WK", "PFOK", "NEWT",
        "PS", "PD", "PSEP", "PCLOSE", "RSEP", "RCLOSE", "TT", "GR", "GS", "GN", "GD", "GK",
        "PB", "MB", "SSRB", "FOUND",
        "STAGE", "RS", "NR", "KG", "K0", "K1", "K2",
        # per lane of the LM engine, (.., LANES)
        "EP", "YL", "MT", "GT", "HT", "ST", "LP", "LG", "LH", "LMOD", "LPT", "LLO", "LHI",
        "LSSR", "LTT", "LLAM", "LNUF", "LPRED", "LIT", "LPH", "LEND", "LSTEP", "LTAKE", "LACC",
        "LSLOT",
        # the restart points of one voxel; exp(-b D) of every voxel
        "prof", "e2",
        # the segmented method's lane-wise finish: raw samples (n_b, BLOCK), pending status
        "YR", "FC", "RL", "NL", "NA", "PL", "TL", "MC", "MTL",
    ],
)
Scratch.__doc__ = """Scratch of one chunk of voxels, allocated once per chunk.

Lane-wise arrays put the voxel (or lane) last so that the inner loops are unit-stride (BLOCK
stands for the block width, :data:`BLOCK` or :data:`SEGMENTED_BLOCK`):
``YB`` (n_u, BLOCK) scaled group means; ``SC`` scale; ``LO``/``HI`` (4, BLOCK) internal
bounds; ``CODE`` status of the segmented start, ``A``/``D`` its intercept and D, ``R``
(n_u, BLOCK) tissue residual ``ybar - A exp(-b D)``, ``Q`` (2, BLOCK) perfusion start (B,
D_star), ``BLO``/``BHI`` bounds of B, ``DSLO`` lower bound of D_star; ``ACC`` (6, BLOCK)
accumulators; ``NUSED``/``BFIRST``/``DIST`` the log-linear fit's sample bookkeeping; ``BEST``
best grid reduction; ``WK`` (n_u, BLOCK) perfusion term; ``PFOK`` profile-Newton success;
``NEWT`` (6, BLOCK) Newton state (x, bracket, state, first bracket). Full method: ``PS``
(n_k, BLOCK), ``PD`` (n_j, BLOCK) grid projections, ``PSEP``/``PCLOSE`` (4, BLOCK) grid starts and
``RSEP``/``RCLOSE`` their reductions, ``TT`` ``sum w ybar**2``, ``GR``/``GS``/``GN``/``GD``/``GK``
(2, BLOCK) the grid search's bests (see :func:`block_grid_start`), ``PB`` (4, BLOCK) and ``MB``
(n_u, BLOCK) best estimate and model, ``SSRB`` its sum of squares, ``FOUND``, ``STAGE`` next
start to consider, ``RS`` (3, 4, BLOCK) restart points, ``NR`` their count; ``K0``/``K1``/``K2``
(n_k, BLOCK) every voxel's D_star profile, ``KG`` (BLOCK,) scratch, ``e2`` (n_u, BLOCK) every
voxel's ``exp(-b D)`` and ``prof`` (4, n_k) one voxel's profile for the restart choice (see
:func:`block_restarts`).
LM lanes (every array lane-last, see :mod:`fastivim.kernels.lm_lanes`): ``EP`` (4, LANES)
evaluation points, ``YL`` (n_u, LANES) targets, ``MT``/``GT``/``HT`` (n_u/4/10, LANES) model,
gradient and Hessian (upper triangle, row-major) there, ``ST`` its sum of squares; ``LP``,
``LG`` (4, LANES), ``LH`` (10, LANES), ``LMOD`` (n_u, LANES) the same at the current point,
``LPT`` (4, LANES) scratch for a step's end point, ``LLO``/``LHI`` (4, LANES) the lane's
bounds; per lane (LANES,): ``LSSR`` sum of squares, ``LTT`` ``sum w t**2``, ``LLAM``/``LNUF``
damping and Nielsen factor, ``LPRED`` predicted decrease, ``LIT`` iterations used, ``LPH`` phase,
``LEND`` end code, ``LSTEP``/``LTAKE``/``LACC`` flags (all float64), ``LSLOT`` the voxel's
slot (int64).
"""


@jit_voxel
def alloc_scratch(nu, nk, nj, nb, width):
    """Allocate one chunk's :class:`Scratch` (sizes: unique b-values, D_star and D grids,
    samples per voxel, voxels per block)."""
    B = width
    L = LANES
    return Scratch(
        np.empty((nu, B)), np.empty(B), np.empty((4, B)), np.empty((4, B)),
        np.empty(B, dtype=np.int64), np.empty(B), np.empty(B), np.empty((nu, B)),
        np.empty((2, B)), np.empty(B), np.empty(B), np.empty(B), np.empty((6, B)),
        np.empty(B, dtype=np.int64), np.empty(B), np.empty(B, dtype=np.bool_), np.empty(B),
        np.empty((nu, B)), np.empty(B, dtype=np.bool_), np.empty((6, B)),
        np.empty((nk, B)), np.empty((nj, B)), np.empty((4, B)), np.empty((4, B)), np.empty(B),
        np.empty(B), np.empty(B), np.empty((2, B)), np.empty((2, B)), np.empty((2, B)),
        np.empty((2, B)), np.empty((2, B)), np.empty((4, B)), np.empty((nu, B)), np.empty(B),
        np.empty(B, dtype=np.bool_), np.empty(B, dtype=np.int64), np.empty((3, 4, B)),
        np.empty(B, dtype=np.int64), np.empty(B), np.empty((nk, B)), np.empty((nk, B)),
        np.empty((nk, B)),
        np.empty((4, L)), np.empty((nu, L)), np.empty((nu, L)), np.empty((4, L)),
        np.empty((10, L)), np.empty(L), np.empty((4, L)), np.empty((4, L)),
        np.empty((10, L)), np.empty((nu, L)), np.empty((4, L)), np.empty((4, L)),
        np.empty((4, L)), np.empty(L), np.empty(L), np.empty(L), np.empty(L), np.empty(L),
        np.empty(L), np.empty(L), np.empty(L), np.empty(L), np.empty(L), np.empty(L),
        np.empty(L, dtype=np.int64),
        np.empty((4, nk)), np.empty((nu, B)),
        np.empty((nb, B)), np.empty(B, dtype=np.int64), np.empty((nu, NEWTON_LANES)),
        np.empty(6 * NEWTON_LANES), np.empty(6 * NEWTON_LANES), np.empty(PL_ROWS * PERFUSION_LANES),
        np.empty((nu, PERFUSION_LANES)), np.empty((nu, PERFUSION_LANES)),
        np.empty((nu, PERFUSION_LANES)),
    )


#: The fields of :class:`Scratch` the segmented method uses: its own, smaller scratch tuple
#: (:class:`SegmentedScratch`), so that its kernel neither allocates nor passes the full
#: method's ~50 other arrays (each array of a tuple argument is code to compile at every call).
SEGMENTED_FIELDS = ("YB", "SC", "LO", "HI", "CODE", "A", "D", "R", "Q", "BLO", "BHI", "DSLO",
                    "ACC", "NUSED", "BFIRST", "DIST", "BEST", "WK", "PFOK", "NEWT", "PB", "MB",
                    "YR", "FC", "RL", "NL", "NA", "PL", "TL", "MC", "MTL")
SegmentedScratch = namedtuple("SegmentedScratch", SEGMENTED_FIELDS)
SegmentedScratch.__doc__ = """The :class:`Scratch` fields of the segmented method (same
meanings and shapes), allocated once per chunk by :func:`alloc_segmented_scratch`."""


@jit_voxel
def alloc_segmented_scratch(nu, nb, width):
    """Allocate one chunk's :class:`SegmentedScratch` (unique b-values, samples per voxel,
    voxels per block)."""
    B = width
    return SegmentedScratch(
        np.empty((nu, B)), np.empty(B), np.empty((4, B)), np.empty((4, B)),
        np.empty(B, dtype=np.int64), np.empty(B), np.empty(B), np.empty((nu, B)),
        np.empty((2, B)), np.empty(B), np.empty(B), np.empty(B), np.empty((6, B)),
        np.empty(B, dtype=np.int64), np.empty(B), np.empty(B, dtype=np.bool_), np.empty(B),
        np.empty((nu, B)), np.empty(B, dtype=np.bool_), np.empty((6, B)), np.empty((4, B)),
        np.empty((nu, B)), np.empty((nb, B)), np.empty(B, dtype=np.int64),
        np.empty((nu, NEWTON_LANES)), np.empty(6 * NEWTON_LANES), np.empty(6 * NEWTON_LANES),
        np.empty(PL_ROWS * PERFUSION_LANES), np.empty((nu, PERFUSION_LANES)),
        np.empty((nu, PERFUSION_LANES)), np.empty((nu, PERFUSION_LANES)),
    )


# ------------------------------------------------------------------- lane-wise stages
@jit_block
def block_group_means(Y, v0, nl, groups, w, YR, YB, SC, DIST):
    """Group means of voxels ``v0 .. v0 + nl`` of ``Y`` into ``YB`` (n_u, nl), divided by the
    scale ``SC`` (nl,): as :func:`fastivim.kernels.voxel.group_means`, NaN scale when unusable.
    ``YR`` (n_b, nl) receives the raw samples lane-wise (for :func:`block_finish`); ``DIST``
    (nl,) bool is scratch (non-finite sample seen)."""
    nu = YB.shape[0]
    for u in range(nu):
        for lane in range(nl):
            YB[u, lane] = 0.0
    for lane in range(nl):
        DIST[lane] = False
    for i in range(Y.shape[1]):
        g = groups[i]
        for lane in range(nl):
            yi = np.float64(Y[v0 + lane, i])
            YR[i, lane] = yi
            DIST[lane] = DIST[lane] | (not math.isfinite(yi))
            YB[g, lane] += yi
    for lane in range(nl):
        SC[lane] = -math.inf
    for u in range(nu):
        wu = w[u]
        for lane in range(nl):
            m = YB[u, lane] / wu
            YB[u, lane] = m
            s = SC[lane]
            SC[lane] = m if m > s else s
    for lane in range(nl):
        s = SC[lane]
        SC[lane] = s if (s > 0.0 and not DIST[lane]) else math.nan
    for u in range(nu):
        for lane in range(nl):
            YB[u, lane] /= SC[lane]


@jit_block
def block_bounds(bounds, SC, nl, LO, HI):
    """Internal bounds per voxel (:func:`fastivim.kernels.voxel.internal_bounds`)."""
    for lane in range(nl):
        LO[0, lane] = bounds[0, 0] / SC[lane]
        HI[0, lane] = bounds[0, 1] / SC[lane]
        LO[1, lane] = bounds[1, 0]
        HI[1, lane] = bounds[1, 1]
        LO[2, lane] = bounds[2, 0] * 1e3
        HI[2, lane] = bounds[2, 1] * 1e3
        LO[3, lane] = bounds[3, 0] * 1e3
        HI[3, lane] = bounds[3, 1] * 1e3


@jit_block
def block_loglinear(bu, w, YB, b_min, nl, S0, SX, SY, SXX, SXY, NUSED, BFIRST, DIST, A, D, CODE):
    """:func:`fastivim.kernels.voxel.loglinear_fit` for every voxel: ``A``, ``D`` and
    ``CODE`` (``st.OK`` or ``st.NUMERICAL_FAILURE``). ``S0``, ``SX``, ``SY``, ``SXX``, ``SXY``
    (nl,) hold the weighted sums: separate arrays, because LLVM guards a loop that stores to
    several rows of one 2-D array with overlap checks that fail at run time (scalar loop)."""
    for lane in range(nl):
        S0[lane] = 0.0
        SX[lane] = 0.0
        SY[lane] = 0.0
        SXX[lane] = 0.0
        SXY[lane] = 0.0
    for lane in range(nl):
        NUSED[lane] = 0
        BFIRST[lane] = -1.0
        DIST[lane] = False
    for u in range(bu.shape[0]):
        if not bu[u] >= b_min:
            continue
        x = bu[u]
        wu = w[u]
        for lane in range(nl):
            y = YB[u, lane]
            use = y > 0.0
            om = wu * y * y
            ly = math.log(y if use else 1.0)
            s0 = S0[lane] + om
            sx = SX[lane] + om * x
            sy = SY[lane] + om * ly
            sxx = SXX[lane] + om * x * x
            sxy = SXY[lane] + om * x * ly
            S0[lane] = s0 if use else S0[lane]
            SX[lane] = sx if use else SX[lane]
            SY[lane] = sy if use else SY[lane]
            SXX[lane] = sxx if use else SXX[lane]
            SXY[lane] = sxy if use else SXY[lane]
            n = NUSED[lane]
            first = BFIRST[lane]
            DIST[lane] = DIST[lane] | (use & (n > 0) & (x != first))
            BFIRST[lane] = x if (use & (n == 0)) else first
            NUSED[lane] = n + 1 if use else n
    for lane in range(nl):
        s0 = S0[lane]
        xm = SX[lane] / s0
        ym = SY[lane] / s0
        cxx = SXX[lane] / s0 - xm * xm
        cxy = SXY[lane] / s0 - xm * ym
        slope = cxy / cxx
        z = ym - slope * xm
        a = vexp(z) if z <= 708.0 else math.inf  # vexp clamps; libm would overflow to inf
        ok = DIST[lane] & (cxx > 0.0) & math.isfinite(a) & math.isfinite(slope)
        A[lane] = a
        D[lane] = -slope
        CODE[lane] = st.OK if ok else st.NUMERICAL_FAILURE


@jit_block
def block_perfusion_start(bu, w, YB, ES, GSS, dstar_grid, nl, LO, HI, A, D, CODE, R, Q, BLO,
                          BHI, DSLO, BEST, PP):
    """:func:`fastivim.kernels.segmented.perfusion_start` after the log-linear step.

    Clamps ``D``, sets ``CODE`` to ``st.DSTAR_NOT_ABOVE_D`` where D_star has no room, moves
    ``A`` into the range the S0 and f bounds allow (``feasible_intercept``), writes
    the tissue residual ``R`` (n_u, nl), the bounds of B (``BLO``, ``BHI``) and of D_star
    (``DSLO`` and ``HI[2]``), and the best grid start ``Q`` (2, nl) = (B, D_star). ``PP``
    (nl,) is scratch.
    """
    nu = bu.shape[0]
    for lane in range(nl):
        d = vmin(vmax(D[lane], LO[3, lane]), HI[3, lane])
        D[lane] = d
        ds_lo = vmax(LO[2, lane], d * (1.0 + DSTAR_MARGIN))
        DSLO[lane] = ds_lo
        c = CODE[lane]
        CODE[lane] = st.DSTAR_NOT_ABOVE_D if ((c == st.OK) & (not ds_lo < HI[2, lane])) else c
    for lane in range(nl):  # feasible_intercept
        a_lo = LO[0, lane] * (1.0 - HI[1, lane])
        a_hi = HI[0, lane] * (1.0 - LO[1, lane]) if math.isfinite(HI[0, lane]) else math.inf
        A[lane] = vmin(vmax(A[lane], a_lo), a_hi)
    for u in range(nu):
        bb = bu[u]
        for lane in range(nl):
            R[u, lane] = YB[u, lane] - A[lane] * vexp(-bb * D[lane])
    for lane in range(nl):  # perfusion_range
        a = A[lane]
        f_lo = LO[1, lane]
        f_hi = HI[1, lane]
        b_lo = vmax(a * f_lo / (1.0 - f_lo) if f_lo < 1.0 else 0.0, LO[0, lane] - a)
        b_hi = a * f_hi / (1.0 - f_hi) if f_hi < 1.0 else math.inf
        b_hi = vmin(b_hi, HI[0, lane] - a)
        BLO[lane] = b_lo
        BHI[lane] = b_hi if b_lo <= b_hi else b_lo
        BEST[lane] = -math.inf
        Q[0, lane] = b_lo
        Q[1, lane] = DSLO[lane]
    for k in range(dstar_grid.shape[0]):
        g = dstar_grid[k]
        gss = GSS[k]
        # P = sum_u w ES R, accumulated b-value by b-value (the lane loop innermost, so that
        # it vectorises; each lane's sum keeps the scalar kernel's order)
        for lane in range(nl):
            PP[lane] = 0.0
        for u in range(nu):
            c = w[u] * ES[k, u]
            for lane in range(nl):
                PP[lane] += c * R[u, lane]
        for lane in range(nl):
            P = PP[lane]
            B = vmin(vmax(P / gss, BLO[lane]), BHI[lane])
            reduction = 2.0 * B * P - B * B * gss
            take = (not ((g < DSLO[lane]) | (g > HI[2, lane]))) & (reduction > BEST[lane])
            BEST[lane] = reduction if take else BEST[lane]
            Q[0, lane] = B if take else Q[0, lane]
            Q[1, lane] = g if take else Q[1, lane]


@jit_voxel
def block_profile_newton(bu, w, dstar_grid, nl, R, Q, BLO, BHI, DSLO, HI, CODE, NEWT, ACC,
                         WK, PFOK, RL, NL, NA):
    """:func:`fastivim.kernels.segmented.profile_newton` for every voxel with ``CODE == OK``.

    The iterations run on :data:`NEWTON_LANES` lanes fed from the block (:func:`_newton_lanes`);
    ``PFOK`` gets the success flag; where true, ``Q`` holds the polished (B, D_star) and ``WK``
    (n_u, nl) the perfusion term ``B exp(-b D_star)``. ``NEWT`` (6, nl) holds each voxel's
    x, bracket (a, b), state (0 running, 1 converged, 2 failed) and first bracket; ``ACC``,
    ``RL``, ``NL``, ``NA`` are scratch. The lane-wise stages take rows as separate arrays (see
    :func:`block_loglinear`).
    """
    _newton_brackets(dstar_grid, nl, Q[1], DSLO, HI[2], CODE, NEWT[0], NEWT[1], NEWT[2],
                     NEWT[3], NEWT[4], NEWT[5])
    _newton_lanes(bu, w, nl, R, NEWT, NA, RL, NL)
    _newton_finish(bu, w, nl, R, NEWT[0], NEWT[3], NEWT[4], NEWT[5], BLO, BHI, Q[0], Q[1], PFOK,
                   WK, ACC[0], ACC[1], ACC[2])


@jit_block
def _newton_brackets(dstar_grid, nl, QD, DSLO, HID, CODE, X, A, B, S, A0, B0):
    """Each voxel's Newton start: x at the grid start ``QD``, the bracket (``A``, ``B``, and
    its copy ``A0``, ``B0`` for the edge test at the end) between the grid neighbours of x
    inside ``[DSLO, HID]``, the state ``S`` 0 (running) where ``CODE`` is OK, else 2."""
    nk = dstar_grid.shape[0]
    for lane in range(nl):
        x = QD[lane]
        a = DSLO[lane]
        b = HID[lane]
        for k in range(nk):  # bracket: the grid neighbours of the start
            g = dstar_grid[k]
            a = g if ((g < x) & (g > a)) else a
            b = g if ((g > x) & (g < b)) else b
        X[lane] = x
        A[lane] = a
        B[lane] = b
        S[lane] = 0.0 if CODE[lane] == st.OK else 2.0
        A0[lane] = a
        B0[lane] = b


@jit_block
def _newton_finish(bu, w, nl, R, X, S, A0, B0, BLO, BHI, QB, QD, PFOK, WK, P, G, BB):
    """The end of :func:`segmented.profile_newton` for every voxel: success (converged, x
    inside its first bracket, B inside its bounds) into ``PFOK``; where true, (B, x) into
    ``QB``, ``QD``; ``WK`` (n_u, nl) the perfusion term at x. ``P``, ``G``, ``BB`` scratch."""
    nu = bu.shape[0]
    for lane in range(nl):
        P[lane] = 0.0
        G[lane] = 0.0
    for u in range(nu):
        bb = bu[u]
        wu = w[u]
        for lane in range(nl):
            e = vexp(-bb * X[lane])
            WK[u, lane] = e
            P[lane] += wu * e * R[u, lane]
            G[lane] += wu * e * e
    for lane in range(nl):
        x = X[lane]
        brlo = A0[lane]
        brhi = B0[lane]
        span = brhi - brlo
        inside = not ((x - brlo <= 1e-6 * span) | (brhi - x <= 1e-6 * span))
        B = P[lane] / G[lane]
        ok = (S[lane] == 1.0) & inside & (BLO[lane] < B) & (B < BHI[lane])
        PFOK[lane] = ok
        BB[lane] = B
        qb = QB[lane]
        qd = QD[lane]
        QB[lane] = B if ok else qb
        QD[lane] = x if ok else qd
    for u in range(nu):
        for lane in range(nl):
            WK[u, lane] *= BB[lane]


@jit_block
def _newton_lanes(bu, w, nl, R, NEWT, NA, RL, NL):
    """The profile-Newton iterations of :func:`block_profile_newton` on lanes fed from a task
    list.

    Each lane iterates one voxel (slot) at a time: x, bracket and state in ``NL`` (6 rows of
    :data:`NEWTON_LANES`, flat: x, a, b, state, iterations, slot), its sums in ``NA`` (6 rows,
    flat) and its tissue residual copied into ``RL`` (n_u, lanes). The state is flat, row ``k``
    at ``k * NEWTON_LANES``, with the lane count a compile-time constant: LLVM then sees that
    the rows do not overlap, where for rows of a 2-D array (a run-time row length) it adds
    overlap checks that fail at run time and runs the scalar copy of the loop.
    A lane whose voxel has converged, failed or used its ``PROFILE_MAXIT`` iterations writes
    the voxel's x, bracket and state back to ``NEWT`` (6, nl) and takes the block's next
    running voxel. In lock-step over the whole block, every voxel waited for the block's
    slowest (9.0 iterations a block against 4.2 a voxel on average, 2·10⁵ voxels at SNR 30);
    each voxel's own iterations, and their arithmetic, are those of the scalar kernel.
    """
    nu = bu.shape[0]
    W = NEWTON_LANES
    nxt = 0
    for lane in range(W):  # every lane starts empty: the refill below gives it a voxel
        NL[3 * W + lane] = 1.0
        NL[4 * W + lane] = 0.0
        NL[5 * W + lane] = -1.0
    while True:
        # lanes whose voxel ended write it back and take the block's next running voxel;
        # written here, not in a helper: a call that passes arrays costs atomic reference
        # counting (~100 ns a call with these arguments, even when numba inlines it)
        for lane in range(W):
            state = NL[3 * W + lane]
            if state == 3.0 or (state == 0.0 and NL[4 * W + lane] < PROFILE_MAXIT):
                continue  # idle, or still iterating
            slot = int(NL[5 * W + lane])
            if slot >= 0:
                for k in range(4):
                    NEWT[k, slot] = NL[k * W + lane]
            while nxt < nl and NEWT[3, nxt] != 0.0:
                nxt += 1
            if nxt >= nl:  # none left: idle, computing on harmless values never written back
                NL[0 * W + lane] = 1.0
                NL[3 * W + lane] = 3.0
                NL[5 * W + lane] = -1.0
                for u in range(nu):
                    RL[u, lane] = 0.0
            else:
                for k in range(3):
                    NL[k * W + lane] = NEWT[k, nxt]
                NL[3 * W + lane] = 0.0
                NL[4 * W + lane] = 0.0
                NL[5 * W + lane] = nxt
                for u in range(nu):
                    RL[u, lane] = R[u, nxt]
                nxt += 1
        active = 0
        for lane in range(W):
            active += NL[3 * W + lane] == 0.0
        if active == 0:
            break
        for k in range(6):
            for lane in range(W):
                NA[k * W + lane] = 0.0
        for u in range(nu):
            bb = bu[u]
            wu = w[u]
            for lane in range(W):
                e = vexp(-bb * NL[0 * W + lane])
                we = wu * e
                ru = RL[u, lane]
                NA[0 * W + lane] += we * ru
                NA[1 * W + lane] += we * e
                NA[2 * W + lane] -= we * bb * ru
                NA[3 * W + lane] -= 2.0 * we * bb * e
                NA[4 * W + lane] += we * bb * bb * ru
                NA[5 * W + lane] += 4.0 * we * bb * bb * e
        for lane in range(W):
            P = NA[0 * W + lane]
            G = NA[1 * W + lane]
            P1 = NA[2 * W + lane]
            G1 = NA[3 * W + lane]
            P2 = NA[4 * W + lane]
            G2 = NA[5 * W + lane]
            x = NL[0 * W + lane]
            a = NL[1 * W + lane]
            b = NL[2 * W + lane]
            state = NL[3 * W + lane]
            num = 2.0 * P * P1 * G - P * P * G1
            dh = num / (G * G)
            d2h = ((2.0 * P1 * P1 * G + 2.0 * P * P2 * G - P * P * G2) * G - 2.0 * G1 * num) / (
                G * G * G)
            a2 = vmax(a, x) if dh > 0.0 else a
            b2 = b if dh > 0.0 else vmin(b, x)
            xn = x - dh / d2h if d2h < 0.0 else (b2 if dh > 0.0 else a2)
            xn = xn if ((a2 < xn) & (xn < b2)) else 0.5 * (a2 + b2)
            live = state == 0.0
            bad = not ((G > 0.0) & (P > 0.0))
            conv = abs(xn - x) <= PROFILE_XTOL * x
            step = live & (not bad)
            NL[3 * W + lane] = (2.0 if bad else (1.0 if conv else 0.0)) if live else state
            NL[0 * W + lane] = xn if step else x
            NL[1 * W + lane] = a2 if step else a
            NL[2 * W + lane] = b2 if step else b
            NL[4 * W + lane] += 1.0


@jit_block
def block_grid_start(YB, w, nl, LO, HI, ES, ED, PAIR, dstar_grid, d_grid, PS, PD, PSEP,
                     PCLOSE, RSEP, RCLOSE, TT, GR, GS, GN, GD, GK):
    """:func:`fastivim.kernels.full.grid_start` for every voxel, and ``TT = sum w ybar**2``.

    The best pair of each kind (row 0 separated, row 1 close) is tracked in ``GR`` (2, BLOCK)
    (reduction), ``GS`` (S0), ``GN``/``GD`` (f as a quotient, divided once at the end rather
    than for every pair) and ``GK`` (the pair's index ``j * n_k + k``), then written into
    ``PSEP``/``PCLOSE`` (4, BLOCK) and ``RSEP``/``RCLOSE``. Each pair's lane loop touches one
    row of each array: a loop that loads and stores several rows of one array is guarded by
    overlap checks that LLVM cannot resolve, and then runs scalar.
    """
    nu = YB.shape[0]
    nk = dstar_grid.shape[0]
    nj = d_grid.shape[0]
    for k in range(nk):
        for lane in range(nl):
            PS[k, lane] = 0.0
        for u in range(nu):
            c = w[u] * ES[k, u]
            for lane in range(nl):
                PS[k, lane] += c * YB[u, lane]
    for j in range(nj):
        for lane in range(nl):
            PD[j, lane] = 0.0
        for u in range(nu):
            c = w[u] * ED[j, u]
            for lane in range(nl):
                PD[j, lane] += c * YB[u, lane]
    for lane in range(nl):
        TT[lane] = 0.0
    for u in range(nu):
        for lane in range(nl):
            TT[lane] += w[u] * YB[u, lane] * YB[u, lane]
    for c in range(2):
        for lane in range(nl):
            GR[c, lane] = -math.inf
            GK[c, lane] = 0.0
            GS[c, lane] = 0.0
            GN[c, lane] = 0.0
            GD[c, lane] = 1.0
    f_lo = LO[1, 0]  # the f bounds are the same for every voxel (not scaled)
    f_hi = HI[1, 0]
    for j in range(nj):
        for k in range(nk):
            if not dstar_grid[k] > d_grid[j]:
                continue
            g0 = PAIR[j, k, 0]
            g1 = PAIR[j, k, 1]
            g2 = PAIR[j, k, 2]
            g3 = PAIR[j, k, 3]
            g4 = PAIR[j, k, 4]
            g5 = PAIR[j, k, 5]
            g6 = PAIR[j, k, 6]
            c = 0 if dstar_grid[k] >= SEPARATION * d_grid[j] else 1
            pair = float(j * nk + k)
            for lane in range(nl):
                ps = PS[k, lane]
                pd = PD[j, lane]
                S0_lo = LO[0, lane]
                S0_hi = HI[0, lane]
                c1 = g0 * ps - g1 * pd
                c2 = g2 * pd - g1 * ps
                S0 = c1 + c2
                feasible = (S0 > 0.0) & (c1 >= f_lo * S0) & (c1 <= f_hi * S0) & (
                    S0 >= S0_lo) & (S0 <= S0_hi)
                red_free = c1 * ps + c2 * pd
                # otherwise the optimum lies on an f edge, with S0 solved (and clipped) along it
                pv_lo = f_lo * ps + (1.0 - f_lo) * pd
                s_lo = vmin(vmax(pv_lo * g3, S0_lo), S0_hi)
                red_lo = 2.0 * s_lo * pv_lo - s_lo * s_lo * g5
                pv_hi = f_hi * ps + (1.0 - f_hi) * pd
                s_hi = vmin(vmax(pv_hi * g4, S0_lo), S0_hi)
                red_hi = 2.0 * s_hi * pv_hi - s_hi * s_hi * g6
                red_edge = vmax(red_lo, red_hi)
                reduction = red_free if feasible else red_edge
                best = GR[c, lane]
                take = reduction > best
                lo_edge = red_lo >= red_hi
                s0 = S0 if feasible else (s_lo if lo_edge else s_hi)
                num = c1 if feasible else (f_lo if lo_edge else f_hi)
                den = S0 if feasible else 1.0
                gs = GS[c, lane]
                gn = GN[c, lane]
                gd = GD[c, lane]
                gk = GK[c, lane]
                GR[c, lane] = reduction if take else best
                GS[c, lane] = s0 if take else gs
                GN[c, lane] = num if take else gn
                GD[c, lane] = den if take else gd
                GK[c, lane] = pair if take else gk
    _grid_best(0, GR, GS, GN, GD, GK, dstar_grid, d_grid, nl, RSEP, PSEP)
    _grid_best(1, GR, GS, GN, GD, GK, dstar_grid, d_grid, nl, RCLOSE, PCLOSE)


@jit_block
def _grid_best(c, GR, GS, GN, GD, GK, dstar_grid, d_grid, nl, RB, PBEST):
    """Write row ``c`` of :func:`block_grid_start`'s bests as a start ``PBEST`` (4, nl)
    = (S0, f, D_star, D) and its reduction ``RB`` (nl,), one row per loop."""
    nk = dstar_grid.shape[0]
    for lane in range(nl):
        RB[lane] = GR[c, lane]
    for lane in range(nl):
        PBEST[0, lane] = GS[c, lane]
    for lane in range(nl):
        PBEST[1, lane] = GN[c, lane] / GD[c, lane]  # c1 / S0, or the f edge divided by 1
    for lane in range(nl):  # grid values by index: rare, scalar
        pair = int(GK[c, lane])
        PBEST[2, lane] = dstar_grid[pair % nk]
        PBEST[3, lane] = d_grid[pair // nk]


@jit_block
def lanes_evaluate(bu, w, EP, YL, MT, GT, HT, ST):
    """Full-model :func:`fastivim.kernels.voxel.evaluate` at the points ``EP`` (4, LANES) for
    the targets ``YL`` (n_u, LANES): model ``MT``, gradient half ``GT`` (4, LANES), Hessian half
    ``HT`` (10, LANES; a00 a01 a02 a03 a11 a12 a13 a22 a23 a33) and sum of squares ``ST``."""
    nl = EP.shape[1]
    for k in range(10):
        for lane in range(nl):
            HT[k, lane] = 0.0
    for k in range(4):
        for lane in range(nl):
            GT[k, lane] = 0.0
    for lane in range(nl):
        ST[lane] = 0.0
    for u in range(bu.shape[0]):
        b = bu[u]
        wu = w[u]
        for lane in range(nl):
            S0 = EP[0, lane]
            f = EP[1, lane]
            Ds = EP[2, lane]
            D = EP[3, lane]
            e1 = vexp(-b * Ds)
            e2 = vexp(-b * D)
            mix = f * e1 + (1.0 - f) * e2
            mu = S0 * mix
            MT[u, lane] = mu
            r = YL[u, lane] - mu
            ST[lane] += wu * r * r
            j0 = mix
            j1 = S0 * (e1 - e2)
            be1 = b * e1
            be2 = b * e2
            j2 = -S0 * f * be1
            j3 = -S0 * (1.0 - f) * be2
            wr = wu * r
            GT[0, lane] += j0 * wr
            GT[1, lane] += j1 * wr
            GT[2, lane] += j2 * wr
            GT[3, lane] += j3 * wr
            w0 = wu * j0
            w1 = wu * j1
            w2 = wu * j2
            HT[0, lane] += w0 * j0
            HT[1, lane] += w0 * j1 - wr * (e1 - e2)
            HT[2, lane] += w0 * j2 + wr * f * be1
            HT[3, lane] += w0 * j3 + wr * (1.0 - f) * be2
            HT[4, lane] += w1 * j1
            HT[5, lane] += w1 * j2 + wr * S0 * be1
            HT[6, lane] += w1 * j3 - wr * S0 * be2
            HT[7, lane] += w2 * j2 - wr * S0 * f * b * be1
            HT[8, lane] += w2 * j3
            HT[9, lane] += wu * j3 * j3 - wr * S0 * (1.0 - f) * b * be2


# ---------------------------------------------------------------- the segmented method
@jit_voxel
def segmented_block(Y, v0, nl, t, settings, s, out, status):
    """Fit voxels ``v0 .. v0 + nl`` (nl <= SEGMENTED_BLOCK) with the segmented method."""
    _front(Y, v0, nl, t, settings, s)
    block_profile_newton(t.bu, t.w, t.dstar_grid, nl, s.R, s.Q, s.BLO, s.BHI, s.DSLO, s.HI,
                         s.CODE, s.NEWT, s.ACC, s.WK, s.PFOK, s.RL, s.NL, s.NA)
    block_pending_codes(nl, s.SC, s.CODE, s.FC)
    block_bounded_perfusion(t.bu, t.w, settings.maxit, nl, s.R, s.Q, s.BLO, s.BHI, s.DSLO, s.HI,
                            s.PFOK, s.WK, s.FC, s.PL, s.TL, s.MC, s.MTL)
    block_segmented_estimate(nl, s.A, s.D, s.Q, s.YB, s.R, s.WK, s.FC, s.PB, s.MB)
    block_finish(s.YR, v0, nl, t.groups, s.MB, s.PB, s.SC, s.LO, s.HI, s.FC, s.ACC[0], s.ACC[1],
                 s.ACC[2], out, status)


@jit_block
def block_pending_codes(nl, SC, CODE, FC):
    """``FC`` (nl,): ``BAD_INPUT`` where the scale is unusable, else the segmented start's
    failure code, else :data:`GO` (no failure so far)."""
    for lane in range(nl):
        c = CODE[lane]
        FC[lane] = st.BAD_INPUT if not SC[lane] > 0.0 else (c if c != st.OK else GO)


# Rows of the perfusion-LM lanes' state ``PL`` (see block_bounded_perfusion).
_B, _DS, _LOB, _HIB, _LOD, _HID = 0, 1, 2, 3, 4, 5  # current point and its box
_SSR, _G0, _G1, _H00, _H01, _H11 = 6, 7, 8, 9, 10, 11  # sum of squares, gradient, Hessian
_LAM, _NUUP, _IT, _TT = 12, 13, 14, 15  # damping, its growth factor, iterations, sum w t²
_PTB, _PTD, _PRED = 16, 17, 18  # trial (or start) point and its predicted decrease
_STATE, _SLOT, _ACC = 19, 20, 21  # lane phase, voxel slot, trial accepted
_ESSR, _EG0, _EG1, _EH00, _EH01, _EH11 = 22, 23, 24, 25, 26, 27  # evaluation at the trial
PL_ROWS = 28
#: Phases of a perfusion-LM lane.
P_RUN, P_TRIAL, P_INIT, P_CONV, P_FAIL, P_IDLE, P_EMPTY = 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0


@jit_voxel
def block_bounded_perfusion(bu, w, maxit, nl, R, Q, BLO, BHI, DSLO, HI, PFOK, WK, FC, PL, TL,
                            MC, MTL):
    """The scalar kernel's bounded 2-parameter Levenberg–Marquardt (B, D_star on the tissue
    residual ``R``) for every voxel of the block whose profile Newton gave no interior optimum
    (``FC == GO`` and not ``PFOK``: B or D_star on a bound, or a misbehaving profile).

    The runs go to :data:`PERFUSION_LANES` lanes fed from the block, one iteration of
    :func:`fastivim.kernels.voxel.levenberg_marquardt` per lane and round, with its decisions
    in its order, written lane-wise: :func:`_perfusion_step` (active set, damped 2x2 Cholesky
    solve, clipped step, predicted decrease, the stopping tests), :func:`_perfusion_evaluate`
    (model, gradient and exact Hessian at the trial point) and :func:`_perfusion_accept` (gain
    ratio, Nielsen damping). A voxel's run that converges leaves (B, D_star) in ``Q`` and its
    perfusion term in ``WK``; one that does not sets ``FC`` to ``NO_CONVERGENCE``.
    ``PL`` (PL_ROWS rows of PERFUSION_LANES, flat: row ``k`` at ``k * PERFUSION_LANES``, so
    that LLVM sees its rows do not overlap, as in :func:`_newton_lanes`), ``TL``, ``MC``,
    ``MTL`` (n_u, lanes) are the lanes' scratch.
    """
    W = PERFUSION_LANES
    nu = TL.shape[0]
    nxt = 0
    for lane in range(W):  # every lane starts empty: the refill below gives it a voxel
        PL[_STATE * W + lane] = P_EMPTY
    while True:
        # lanes whose run ended leave its answer and take the block's next voxel that needs
        # the bounded fit (written here, not in a helper: see _newton_lanes)
        for lane in range(W):
            state = PL[_STATE * W + lane]
            if state != P_CONV and state != P_FAIL and state != P_EMPTY:
                continue
            if state != P_EMPTY:
                slot = int(PL[_SLOT * W + lane])
                if state == P_CONV:
                    Q[0, slot] = PL[_B * W + lane]
                    Q[1, slot] = PL[_DS * W + lane]
                    for u in range(nu):
                        WK[u, slot] = MC[u, lane]
                else:
                    FC[slot] = st.NO_CONVERGENCE
            while nxt < nl and not (FC[nxt] == GO and not PFOK[nxt]):
                nxt += 1
            if nxt >= nl:  # none left: idle, evaluating harmless values
                PL[_STATE * W + lane] = P_IDLE
                PL[_PTB * W + lane] = 0.0
                PL[_PTD * W + lane] = 1.0
                for u in range(nu):
                    TL[u, lane] = 0.0
                continue
            lob = BLO[nxt]
            hib = BHI[nxt]
            lod = DSLO[nxt]
            hid = HI[2, nxt]
            PL[_LOB * W + lane] = lob
            PL[_HIB * W + lane] = hib
            PL[_LOD * W + lane] = lod
            PL[_HID * W + lane] = hid
            # a start outside the box would freeze there (levenberg_marquardt moves it in)
            PL[_PTB * W + lane] = vmin(vmax(Q[0, nxt], lob), hib)
            PL[_PTD * W + lane] = vmin(vmax(Q[1, nxt], lod), hid)
            tt = 0.0
            for u in range(nu):
                t = R[u, nxt]
                TL[u, lane] = t
                tt += w[u] * t * t
            PL[_TT * W + lane] = tt
            PL[_LAM * W + lane] = LM_LAMBDA0
            PL[_NUUP * W + lane] = 2.0
            PL[_IT * W + lane] = 0.0
            PL[_STATE * W + lane] = P_INIT
            PL[_SLOT * W + lane] = nxt
            nxt += 1
        active = 0
        for lane in range(W):
            active += PL[_STATE * W + lane] < P_CONV
        if active == 0:
            break
        _perfusion_step(PL, maxit)
        _perfusion_evaluate(bu, w, TL, PL, MTL)
        _perfusion_accept(PL, MTL, MC)


@jit_block
def _perfusion_step(PL, maxit):
    """One loop iteration of the bounded LM up to its trial evaluation, for every lane in
    ``P_RUN`` (others keep their state): the next phase is ``P_TRIAL`` (trial point in
    ``_PTB``/``_PTD``), ``P_RUN`` again (damped harder, no evaluation), ``P_CONV`` or
    ``P_FAIL``, decided as in :func:`fastivim.kernels.voxel.levenberg_marquardt`."""
    W = PERFUSION_LANES
    for lane in range(W):
        run = PL[_STATE * W + lane] == P_RUN
        it = PL[_IT * W + lane]
        ssr = PL[_SSR * W + lane]
        lam = PL[_LAM * W + lane]
        nuup = PL[_NUUP * W + lane]
        p0 = PL[_B * W + lane]
        p1 = PL[_DS * W + lane]
        lo0 = PL[_LOB * W + lane]
        hi0 = PL[_HIB * W + lane]
        lo1 = PL[_LOD * W + lane]
        hi1 = PL[_HID * W + lane]
        g0 = PL[_G0 * W + lane]
        g1 = PL[_G1 * W + lane]
        h00 = PL[_H00 * W + lane]
        h01 = PL[_H01 * W + lane]
        h11 = PL[_H11 * W + lane]
        exhausted = it >= maxit
        exact = ssr <= 1e-28 * PL[_TT * W + lane]
        free0 = not (((p0 <= lo0) & (g0 < 0.0)) | ((p0 >= hi0) & (g0 > 0.0)))
        free1 = not (((p1 <= lo1) & (g1 < 0.0)) | ((p1 >= hi1) & (g1 > 0.0)))
        pinned = not (free0 | free1)
        # solve_damped for n = 2, written out
        dmax = vmax(vmax(0.0, abs(h00)), abs(h11))
        floor = 1e-12 * dmax + 1e-300
        m00 = h00 + lam * vmax(abs(h00), floor) if free0 else 1.0
        m01 = h01 if (free0 & free1) else 0.0
        m11 = h11 + lam * vmax(abs(h11), floor) if free1 else 1.0
        d0 = g0 if free0 else 0.0
        d1 = g1 if free1 else 0.0
        ok0 = m00 > 0.0
        l00 = math.sqrt(m00 if ok0 else 1.0)
        l10 = m01 * (1.0 / l00)
        s11 = m11 - l10 * l10
        solved = ok0 & (s11 > 0.0)
        l11 = math.sqrt(s11 if s11 > 0.0 else 1.0)
        y0 = d0 / l00
        y1 = (d1 - l10 * y0) / l11
        x1 = y1 / l11
        x0 = (y0 - l10 * x1) / l00
        x0 = x0 if free0 else 0.0
        x1 = x1 if free1 else 0.0
        v0 = vmin(vmax(p0 + x0, lo0), hi0)
        v1 = vmin(vmax(p1 + x1, lo1), hi1)
        s0 = v0 - p0  # the step taken, after clipping to the box
        s1 = v1 - p1
        small = ((not abs(v0 - p0) > LM_XTOL * (abs(p0) + LM_XTOL))
                 & (not abs(v1 - p1) > LM_XTOL * (abs(p1) + LM_XTOL)))
        q0 = 0.0 + h00 * s0 + h01 * s1
        q1 = 0.0 + h01 * s0 + h11 * s1
        pred = 0.0 + s0 * (2.0 * g0 - q0) + s1 * (2.0 * g1 - q1)
        damp = (not solved) | ((not small) & (not pred > 0.0))
        damp = damp & (not exact) & (not pinned)  # those tests come first
        lam2 = lam * nuup
        # (when damping is due, neither a small step nor a small prediction was reached)
        conv = exact | pinned | (solved & small) | (
            (not damp) & (pred <= LM_FTOL * ssr) & (lam <= 1.0))
        # the tests in the scalar loop's order: the first that holds decides
        state = P_TRIAL
        state = P_RUN if damp else state
        state = P_FAIL if (damp & (lam2 > LM_LAMBDA_MAX)) else state
        state = P_CONV if conv else state
        state = P_FAIL if exhausted else state
        lam_new = lam2 if damp else lam
        nu_new = nuup * 2.0 if damp else nuup
        go = run & (not exhausted)
        old_state = PL[_STATE * W + lane]
        old_ptb = PL[_PTB * W + lane]
        old_ptd = PL[_PTD * W + lane]
        old_pred = PL[_PRED * W + lane]
        PL[_STATE * W + lane] = state if run else old_state
        PL[_IT * W + lane] = it + 1.0 if go else it
        PL[_LAM * W + lane] = lam_new if go else lam
        PL[_NUUP * W + lane] = nu_new if go else nuup
        PL[_PTB * W + lane] = v0 if run else old_ptb
        PL[_PTD * W + lane] = v1 if run else old_ptd
        PL[_PRED * W + lane] = pred if run else old_pred


@jit_block
def _perfusion_evaluate(bu, w, TL, PL, MTL):
    """The perfusion model ``B exp(-b D_star)`` of :func:`fastivim.kernels.voxel.evaluate` at
    every lane's trial point: model into ``MTL`` (n_u, lanes), sum of squares, gradient half
    and exact Hessian half into ``PL``'s evaluation rows."""
    W = PERFUSION_LANES
    for k in range(_ESSR, _EH11 + 1):
        for lane in range(W):
            PL[k * W + lane] = 0.0
    for u in range(bu.shape[0]):
        b = bu[u]
        wu = w[u]
        for lane in range(W):
            B = PL[_PTB * W + lane]
            e1 = vexp(-b * PL[_PTD * W + lane])
            mu = B * e1
            MTL[u, lane] = mu
            r = TL[u, lane] - mu
            be1 = b * e1
            j1 = -B * be1
            wr = wu * r
            PL[_ESSR * W + lane] += wu * r * r
            PL[_EG0 * W + lane] += e1 * wr
            PL[_EG1 * W + lane] += j1 * wr
            PL[_EH00 * W + lane] += wu * e1 * e1
            PL[_EH01 * W + lane] += wu * e1 * j1 + wr * be1
            PL[_EH11 * W + lane] += wu * j1 * j1 - wr * B * b * be1


@jit_block
def _perfusion_accept(PL, MTL, MC):
    """The end of a bounded-LM iteration for every lane just evaluated: a started lane takes
    its start as the current point; a trial is accepted when the gain ratio exceeds 1e-4
    (damping relaxed by Nielsen's rule) or rejected (damped harder), with the scalar loop's
    convergence tests. Accepted lanes copy the trial's model into ``MC``.

    Every operand is loaded before its select (``x = a if c else b`` on two loaded values): a
    select between array elements stays a branch, and the loop is not vectorised."""
    W = PERFUSION_LANES
    for lane in range(W):
        state = PL[_STATE * W + lane]
        init = state == P_INIT
        trial = state == P_TRIAL
        ssr = PL[_SSR * W + lane]
        ssr_try = PL[_ESSR * W + lane]
        lam = PL[_LAM * W + lane]
        nuup = PL[_NUUP * W + lane]
        rho = (ssr - ssr_try) / PL[_PRED * W + lane]
        good = rho > 1e-4
        decrease = ssr - ssr_try
        q = 2.0 * rho - 1.0
        lam_good = lam * vmax(1.0 / 3.0, 1.0 - q * q * q)
        lam_bad = lam * nuup
        take = init | (trial & good)
        conv = trial & ((good & (decrease <= LM_FTOL * ssr_try))
                        | ((not good) & (lam_bad > LM_LAMBDA_MAX)))
        b_cur, b_new = PL[_B * W + lane], PL[_PTB * W + lane]
        d_cur, d_new = PL[_DS * W + lane], PL[_PTD * W + lane]
        g0_cur, g0_new = PL[_G0 * W + lane], PL[_EG0 * W + lane]
        g1_cur, g1_new = PL[_G1 * W + lane], PL[_EG1 * W + lane]
        h00_cur, h00_new = PL[_H00 * W + lane], PL[_EH00 * W + lane]
        h01_cur, h01_new = PL[_H01 * W + lane], PL[_EH01 * W + lane]
        h11_cur, h11_new = PL[_H11 * W + lane], PL[_EH11 * W + lane]
        PL[_B * W + lane] = b_new if take else b_cur
        PL[_DS * W + lane] = d_new if take else d_cur
        PL[_G0 * W + lane] = g0_new if take else g0_cur
        PL[_G1 * W + lane] = g1_new if take else g1_cur
        PL[_H00 * W + lane] = h00_new if take else h00_cur
        PL[_H01 * W + lane] = h01_new if take else h01_cur
        PL[_H11 * W + lane] = h11_new if take else h11_cur
        PL[_ACC * W + lane] = 1.0 if take else 0.0
        PL[_SSR * W + lane] = ssr_try if take else ssr
        lam_trial = lam_good if good else lam_bad
        PL[_LAM * W + lane] = lam_trial if trial else lam
        nu_trial = 2.0 if good else nuup * 2.0
        PL[_NUUP * W + lane] = nu_trial if trial else nuup
        next_state = P_RUN if (init | trial) else state
        PL[_STATE * W + lane] = P_CONV if conv else next_state
    for u in range(MTL.shape[0]):
        for lane in range(W):
            new = MTL[u, lane]
            cur = MC[u, lane]
            MC[u, lane] = new if PL[_ACC * W + lane] != 0.0 else cur


@jit_block
def block_segmented_estimate(nl, A, D, Q, YB, R, WK, FC, PB, MB):
    """The segmented estimate of every voxel: ``PB`` (4, nl) = (S0, f, D_star, D) from the
    intercept ``A``, B and D_star in ``Q`` and ``D``; ``MB`` (n_u, nl) its model
    ``ybar - R + B exp(-b D_star)``; ``FC`` gets ``NUMERICAL_FAILURE`` where S0 is not
    positive."""
    for lane in range(nl):
        B = Q[0, lane]
        S0 = A[lane] + B
        fc = FC[lane]
        FC[lane] = st.NUMERICAL_FAILURE if ((fc == GO) & (not S0 > 0.0)) else fc
        PB[0, lane] = S0
        PB[1, lane] = B / S0
        PB[2, lane] = Q[1, lane]
        PB[3, lane] = D[lane]
    for u in range(YB.shape[0]):
        for lane in range(nl):
            MB[u, lane] = YB[u, lane] - R[u, lane] + WK[u, lane]


@jit_block
def block_finish(YR, v0, nl, groups, MB, PB, SC, LO, HI, FC, MEAN, SSR, SST, out, status):
    """:func:`fastivim.kernels.voxel.finish_voxel` for every voxel of the block at once.

    ``PB`` (4, nl) holds (S0, f, D_star, D) in internal units, ``MB`` (n_u, nl) the fitted
    scaled model, ``YR`` (n_b, nl) the raw samples, ``FC`` (nl,) each voxel's failure code or
    :data:`GO`. Writes rows ``v0 .. v0 + nl`` of ``out`` (NaN for a failed voxel) and of
    ``status``, with the scalar function's arithmetic in the same order (bit-identical
    values); ``MEAN``, ``SSR``, ``SST`` (nl,) are scratch (three arrays, not rows of one: LLVM
    guards a loop that stores to two rows of one array with overlap checks that fail).
    """
    nb = YR.shape[0]
    for i in range(4):
        for lane in range(nl):
            p = PB[i, lane]
            fc = FC[lane]
            FC[lane] = st.NUMERICAL_FAILURE if ((fc == GO) & (not math.isfinite(p))) else fc
            PB[i, lane] = vmin(vmax(p, LO[i, lane]), HI[i, lane])
    for lane in range(nl):
        fc = FC[lane]
        big = not abs(PB[0, lane] * SC[lane]) < FLOAT32_MAX  # S0 would be inf in a float32 map
        FC[lane] = st.NUMERICAL_FAILURE if ((fc == GO) & big) else fc
        MEAN[lane] = 0.0
        SSR[lane] = 0.0
        SST[lane] = 0.0
    for i in range(nb):
        for lane in range(nl):
            MEAN[lane] += YR[i, lane]
    for lane in range(nl):
        MEAN[lane] /= nb
    for i in range(nb):
        g = groups[i]
        for lane in range(nl):
            yi = YR[i, lane]
            r = yi - SC[lane] * MB[g, lane]
            SSR[lane] += r * r
            d = yi - MEAN[lane]
            SST[lane] += d * d
    for lane in range(nl):
        v = v0 + lane
        ok = FC[lane] == GO
        sc = SC[lane]
        ssr = SSR[lane]
        sst = SST[lane]
        p0 = PB[0, lane]
        p1 = PB[1, lane]
        p2 = PB[2, lane]
        p3 = PB[3, lane]
        r2 = 1.0 - ssr / sst if sst > 0.0 else math.nan
        rmse = math.sqrt(ssr / nb)
        out[v, 0] = p0 * sc if ok else math.nan
        out[v, 1] = p1 if ok else math.nan
        out[v, 2] = p2 * 1e-3 if ok else math.nan
        out[v, 3] = p3 * 1e-3 if ok else math.nan
        out[v, 4] = r2 if ok else math.nan
        out[v, 5] = rmse if ok else math.nan
        lo0 = LO[0, lane]
        hi0 = HI[0, lane]
        lo1 = LO[1, lane]
        hi1 = HI[1, lane]
        lo2 = LO[2, lane]
        hi2 = HI[2, lane]
        lo3 = LO[3, lane]
        hi3 = HI[3, lane]
        s0_span = hi0 - lo0 if math.isfinite(hi0) else 1.0
        pin = (_pinned(p0, lo0, hi0, s0_span) | _pinned(p1, lo1, hi1, hi1 - lo1)
               | _pinned(p2, lo2, hi2, hi2 - lo2) | _pinned(p3, lo3, hi3, hi3 - lo3))
        code = st.AT_BOUND if pin else st.OK
        code = st.DSTAR_NOT_ABOVE_D if not p2 - p3 > PIN_TOL * (hi2 - lo2) else code
        status[v] = code if ok else FC[lane]


@njit(fastmath=FASTMATH_FLAGS, error_model="numpy", inline="always")
def _pinned(v, lo, hi, span):
    """:func:`fastivim.kernels.voxel.pinned` without branches (always inlined)."""
    return (v - lo <= PIN_TOL * span) | (math.isfinite(hi) & (hi - v <= PIN_TOL * span))


@jit_voxel
def _front(Y, v0, nl, t, settings, s):
    """Stages shared by both methods: group means, bounds, log-linear step, perfusion start."""
    block_group_means(Y, v0, nl, t.groups, t.w, s.YR, s.YB, s.SC, s.DIST)
    block_bounds(t.bounds, s.SC, nl, s.LO, s.HI)
    block_loglinear(t.bu, t.w, s.YB, settings.b_min, nl, s.ACC[0], s.ACC[1], s.ACC[2], s.ACC[3],
                    s.ACC[4], s.NUSED, s.BFIRST, s.DIST, s.A, s.D, s.CODE)
    block_perfusion_start(t.bu, t.w, s.YB, t.ES, t.GSS, t.dstar_grid, nl, s.LO, s.HI, s.A, s.D,
                          s.CODE, s.R, s.Q, s.BLO, s.BHI, s.DSLO, s.BEST, s.ACC[5])


# -------------------------------------------------------------------- the full method
# Per-voxel helpers below take plain arrays, never the Scratch tuple: a call passes every
# field of a tuple argument (~60 arrays, several hundred machine words) and numba adds
# reference-count updates for array arguments on entry and exit.
@jit_block
def block_restarts(nl, bu, w, ES, GSS, dstar_grid, YB, PS, LO, HI, PB, SSRB, TT, FOUND, FC, RS,
                   NR, prof, E2, GE, PE, KG, K0, K1, K2):
    """Step 4 of :func:`fastivim.kernels.full.fit_full_voxel` for every voxel of the block that
    has a fit (``FOUND``, ``FC`` still :data:`GO`): the D_star profile at the fitted D and the
    (up to ``MAX_RESTARTS``) restart points, most promising first, into ``RS`` (3, 4, BLOCK)
    and their count into ``NR`` (0 for the other voxels).

    The profile is :func:`fastivim.kernels.full.dstar_profile`'s, for the whole block at once
    with the voxels as vector lanes (:func:`_profile_point`): one voxel at a time, with the 12
    grid points as lanes, a third of the vector loop was its scalar remainder, and the profile
    was 17 % of a voxel's time. ``E2`` (n_u, BLOCK) gets ``exp(-b D)`` (libm, as the scalar
    kernel), ``GE``/``PE``/``KG`` (BLOCK,) and ``K0``/``K1``/``K2`` (n_k, BLOCK) the profile's
    sums and points; ``prof`` (4, n_k) one voxel's profile for the restart choice.
    """
    nu = YB.shape[0]
    nk = dstar_grid.shape[0]
    for lane in range(nl):
        d = PB[3, lane]
        for u in range(nu):
            E2[u, lane] = math.exp(-bu[u] * d)  # not vexp: the scalar kernel's bits
    for lane in range(nl):
        GE[lane] = 0.0
        PE[lane] = 0.0
    for u in range(nu):
        wu = w[u]
        for lane in range(nl):
            e = E2[u, lane]
            GE[lane] += wu * e * e
            PE[lane] += wu * e * YB[u, lane]
    for k in range(nk):
        for lane in range(nl):
            KG[lane] = 0.0
        for u in range(nu):
            c = w[u] * ES[k, u]
            for lane in range(nl):
                KG[lane] += c * E2[u, lane]
        gk = GSS[k]
        dstar = dstar_grid[k]
        for lane in range(nl):
            ssr, s0, f = _profile_point(KG[lane], gk, PS[k, lane], dstar, LO[0, lane],
                                        HI[0, lane], LO[1, lane], HI[1, lane], TT[lane],
                                        PB[3, lane], GE[lane], PE[lane])
            K0[k, lane] = ssr
            K1[k, lane] = s0
            K2[k, lane] = f
    for lane in range(nl):  # the restart choice, one voxel at a time (rare, branchy)
        NR[lane] = 0
        if not (FOUND[lane] and FC[lane] == GO):
            continue
        for k in range(nk):
            prof[0, k] = K0[k, lane]
            prof[1, k] = K1[k, lane]
            prof[2, k] = K2[k, lane]
        D_fit = PB[3, lane]
        mark_restarts(prof, dstar_grid, SSRB[lane], PB[2, lane])
        n = 0
        for _ in range(MAX_RESTARTS):
            kbest = pop_best_restart(prof)
            if kbest < 0:
                break
            RS[n, 0, lane] = prof[1, kbest]
            RS[n, 1, lane] = prof[2, kbest]
            RS[n, 2, lane] = dstar_grid[kbest]
            RS[n, 3, lane] = D_fit
            n += 1
        NR[lane] = n


@njit(fastmath=FASTMATH_FLAGS, error_model="numpy", inline="always")
def _profile_point(gke, gk, ps, dstar, s0_lo, s0_hi, f_lo, f_hi, tt, D, ge, pe):
    """One D_star grid point of :func:`fastivim.kernels.full.dstar_profile` (always inlined):
    its weighted sum of squares (``inf`` where D_star <= D), S0 and f, with the scalar
    function's arithmetic and the f-edge loop written as selects. ``gke`` = ``sum w ES e2``,
    ``gk`` the point's ``GSS``, ``ps`` its grid projection; ``ge``/``pe`` as in the scalar
    function."""
    det = gk * ge - gke * gke
    c1 = (ge * ps - gke * pe) / det
    c2 = (gk * pe - gke * ps) / det
    S0 = c1 + c2
    feasible = (S0 > 0.0) & (f_lo * S0 <= c1) & (c1 <= f_hi * S0) & (s0_lo <= S0) & (
        S0 <= s0_hi)
    red_free = c1 * ps + c2 * pe
    f_free = c1 / S0
    # the f edges, low then high, each kept where it beats the best so far
    fb = f_lo
    gv = fb * fb * gk + 2.0 * fb * (1.0 - fb) * gke + (1.0 - fb) * (1.0 - fb) * ge
    pv = fb * ps + (1.0 - fb) * pe
    s_lo = vmin(vmax(pv / gv, s0_lo), s0_hi)
    red_lo = 2.0 * s_lo * pv - s_lo * s_lo * gv
    fb = f_hi
    gv = fb * fb * gk + 2.0 * fb * (1.0 - fb) * gke + (1.0 - fb) * (1.0 - fb) * ge
    pv = fb * ps + (1.0 - fb) * pe
    s_hi = vmin(vmax(pv / gv, s0_lo), s0_hi)
    red_hi = 2.0 * s_hi * pv - s_hi * s_hi * gv
    take_lo = red_lo > -math.inf
    red_e = red_lo if take_lo else -math.inf
    s_e = s_lo if take_lo else S0
    f_e = f_lo if take_lo else math.nan
    take_hi = red_hi > red_e
    red_e = red_hi if take_hi else red_e
    s_e = s_hi if take_hi else s_e
    f_e = f_hi if take_hi else f_e
    reduction = red_free if feasible else red_e
    ssr = tt - reduction if dstar > D else math.inf
    return ssr, (S0 if feasible else s_e), (f_free if feasible else f_e)


@jit_voxel
def full_block(Y, v0, nl, t, settings, s, out, status):
    """Fit voxels ``v0 .. v0 + nl`` (nl <= BLOCK) with the full method.

    Starts, in the order of :func:`fastivim.kernels.full.fit_full_voxel` (``STAGE``): 0 the
    segmented start, 1 the separated grid pair, 2 the close pair, 3 the D_star profile, 4–6
    its restarts, 7 done. Each start runs on a lane of the lock-step LM engine, in two passes:
    starts 0–2 of every voxel, then (after the profiles of the whole block,
    :func:`block_restarts`) the restarts of the voxels that have any. A voxel's runs keep their
    order, and each run is independent of the lane it runs on, so the passes change no result.
    The block's voxels are written together at the end (:func:`block_finish`).
    """
    _front(Y, v0, nl, t, settings, s)
    block_grid_start(s.YB, t.w, nl, s.LO, s.HI, t.ES, t.ED, t.PAIR, t.dstar_grid, t.d_grid,
                     s.PS, s.PD, s.PSEP, s.PCLOSE, s.RSEP, s.RCLOSE, s.TT, s.GR, s.GS, s.GN,
                     s.GD, s.GK)
    for restarts in (False, True):
        if restarts:
            block_restarts(nl, t.bu, t.w, t.ES, t.GSS, t.dstar_grid, s.YB, s.PS, s.LO, s.HI,
                           s.PB, s.SSRB, s.TT, s.FOUND, s.FC, s.RS, s.NR, s.prof, s.e2, s.ACC[3],
                           s.ACC[4], s.KG, s.K0, s.K1, s.K2)
        _lm_engine(nl, restarts, t, settings, s.FC, s.YB, s.SC, s.LO, s.HI, s.CODE, s.A,
                   s.D, s.Q, s.PSEP, s.PCLOSE, s.RSEP, s.RCLOSE, s.TT, s.PB, s.MB, s.SSRB,
                   s.FOUND, s.STAGE, s.RS, s.NR, s.EP, s.YL, s.MT, s.GT, s.HT, s.ST, s.LP, s.LG,
                   s.LH, s.LMOD, s.LPT, s.LLO, s.LHI, s.LSSR, s.LTT, s.LLAM, s.LNUF, s.LPRED,
                   s.LIT, s.LPH, s.LEND, s.LSTEP, s.LTAKE, s.LACC, s.LSLOT)
    block_finish(s.YR, v0, nl, t.groups, s.MB, s.PB, s.SC, s.LO, s.HI, s.FC, s.ACC[0], s.ACC[1],
                 s.ACC[2], out, status)


@jit_voxel
def _lm_engine(nl, restarts, t, settings, FC, YB, SC, LO, HI, CODE, A, D, Q, PSEP, PCLOSE, RSEP,
               RCLOSE, TT, PB, MB, SSRB, FOUND, STAGE, RS, NR, EP, YL, MT, GT, HT,
               ST, LP, LG, LH, LMOD, LPT, LLO, LHI, LSSR, LTT, LLAM, LNUF, LPRED, LIT, LPH, LEND,
               LSTEP, LTAKE, LACC, LSLOT):
    """The lock-step LM engine of :func:`full_block`.

    Each round: lanes without a run get the next start (of their voxel, else of the block's
    next voxel: the task list); :func:`lanes_evaluate` evaluates every
    lane at once; :func:`fastivim.kernels.lm_lanes.lanes_accept` takes the evaluation and
    :func:`fastivim.kernels.lm_lanes.lanes_step` runs each lane's
    :func:`fastivim.kernels.voxel.levenberg_marquardt` loop body up to its next evaluation
    (a lane that must damp harder and solve again waits for the next round's step, in phase
    ``RETRY``), all lanes at once; lanes whose
    run ended keep its result if it is the voxel's best so far (the scalar ``_refine``).
    Leaves each voxel's estimate and model in ``PB``/``MB`` and its failure code, or
    :data:`GO`, in ``FC`` (nl,), for :func:`block_finish`. The first pass (``restarts``
    False) runs starts 0–2 of every voxel and leaves a voxel with a fit at stage 4; the second
    runs the restarts (``RS``, ``NR`` from :func:`block_restarts`) of the voxels that have any.

    Arrays are passed in once per pass, and the per-lane start selection is written out here:
    a numba function that takes arrays adds reference-count updates (atomic calls) on entry and
    exit, for every array of a tuple argument too (measured: the start selection as a helper
    taking the Scratch and Tables tuples made the kernel 3x slower); the lane-wise stages are
    called once per round, with only the arrays they use.
    """
    bu = t.bu
    w = t.w
    maxit = settings.maxit
    nu = YB.shape[0]
    for u in range(nu):
        for lane in range(LANES):
            YL[u, lane] = 0.0
    for lane in range(LANES):
        for i in range(4):
            EP[i, lane] = 1.0
        LPH[lane] = IDLE
        LEND[lane] = RUNNING
        LSTEP[lane] = 0.0
    nxt = 0  # the task list: the block's next voxel not yet taken by a lane
    while True:  # one pass per lock-step round
        active = 0
        for lane in range(LANES):
            if LPH[lane] == IDLE and nxt >= nl:
                continue
            # a lane without a run: its voxel's next start, or the block's next voxel (the
            # task list) when that voxel is done (written); the lane ends INIT or IDLE
            while LPH[lane] != INIT and LPH[lane] != TRIAL and LPH[lane] != RETRY:
                slot = LSLOT[lane] if LPH[lane] != IDLE else -1
                if slot < 0:
                    while restarts and nxt < nl and NR[nxt] == 0:
                        nxt += 1  # the second pass takes only voxels with restart points
                    if nxt >= nl:
                        LPH[lane] = IDLE
                        break
                    slot = nxt
                    nxt += 1
                    LSLOT[lane] = slot
                    LPH[lane] = HELD
                    if not restarts:  # a new voxel (the second pass resumes at stage 4)
                        STAGE[slot] = 0
                        FOUND[slot] = False
                        SSRB[slot] = math.inf
                        FC[slot] = GO
                        if not SC[slot] > 0.0:  # non-finite samples or no positive signal
                            FC[slot] = st.BAD_INPUT
                            LPH[lane] = IDLE
                            continue
                stage = STAGE[slot]
                STAGE[slot] = stage + 1
                found = FOUND[slot]
                best = SSRB[slot]
                tt = TT[slot]
                start = False
                p0 = p1 = p2 = p3 = 0.0
                if stage == 0:  # 1: the segmented answer before its polish
                    if CODE[slot] == st.OK and A[slot] + Q[0, slot] > 0.0:
                        p0 = A[slot] + Q[0, slot]
                        p1 = Q[0, slot] / p0
                        p2 = Q[1, slot]
                        p3 = D[slot]
                        start = True
                elif stage == 1:  # 2: the best separated grid pair, if in another basin
                    red = RSEP[slot]
                    n = RESTART_NEIGHBOURHOOD
                    same_basin = (n * PB[2, slot] > PSEP[2, slot] > PB[2, slot] / n
                                  and n * PB[3, slot] > PSEP[3, slot] > PB[3, slot] / n)
                    if red > -math.inf and (not found or (
                            tt - red < best * (1.0 + RESTART_SLACK) and not same_basin)):
                        p0 = PSEP[0, slot]
                        p1 = PSEP[1, slot]
                        p2 = PSEP[2, slot]
                        p3 = PSEP[3, slot]
                        start = True
                elif stage == 2:  # 3: the best close grid pair
                    red = RCLOSE[slot]
                    on_bound = False
                    for i in range(4):
                        if PB[i, slot] <= LO[i, slot] or PB[i, slot] >= HI[i, slot]:
                            on_bound = True
                    if red > -math.inf and (not found
                                            or tt - red < best * (1.0 + RESTART_SLACK)
                                            or on_bound):
                        p0 = PCLOSE[0, slot]
                        p1 = PCLOSE[1, slot]
                        p2 = PCLOSE[2, slot]
                        p3 = PCLOSE[3, slot]
                        start = True
                elif stage == 3:  # the profile: block_restarts, between the two passes
                    if not found:
                        FC[slot] = st.NO_CONVERGENCE
                    LPH[lane] = IDLE
                elif stage < 4 + MAX_RESTARTS:  # 4: other basins along D_star
                    i = stage - 4
                    if i < NR[slot]:
                        p0 = RS[i, 0, slot]
                        p1 = RS[i, 1, slot]
                        p2 = RS[i, 2, slot]
                        p3 = RS[i, 3, slot]
                        start = True
                else:  # done: PB/MB hold its estimate, written with the block
                    LPH[lane] = IDLE
                if start:
                    # a new run from (p0..p3), moved into the box as levenberg_marquardt does
                    LP[0, lane] = p0
                    LP[1, lane] = p1
                    LP[2, lane] = p2
                    LP[3, lane] = p3
                    for i in range(4):
                        lo = LO[i, slot]
                        hi = HI[i, slot]
                        LLO[i, lane] = lo
                        LHI[i, lane] = hi
                        LP[i, lane] = vmin(vmax(LP[i, lane], lo), hi)
                        EP[i, lane] = LP[i, lane]
                    for u in range(nu):
                        YL[u, lane] = YB[u, slot]
                    LPH[lane] = INIT
                    LIT[lane] = 0.0
                    LLAM[lane] = LM_LAMBDA0
                    LNUF[lane] = 2.0
                    LTT[lane] = tt
            if LPH[lane] != IDLE:
                active += 1
        if active == 0:
            break
        lanes_evaluate(bu, w, EP, YL, MT, GT, HT, ST)
        lanes_accept(MT, GT, HT, ST, LPH, EP, LPRED, LP, LG, LH, LMOD, LSSR, LLAM, LNUF, LEND,
                     LSTEP, LTAKE, LACC)
        # lanes that must damp harder and solve again (RETRY) do so in the next round's step,
        # unless there are enough of them to pay for a pass now (see RETRY_PASS_MIN)
        while lanes_step(maxit, LP, LG, LH, LLO, LHI, LSSR, LTT, LLAM, LNUF, LIT, LSTEP, LEND,
                         LPRED, LPH, EP, LPT, LTAKE) >= RETRY_PASS_MIN:
            pass
        for lane in range(LANES):
            if LEND[lane] == RUNNING:
                continue
            # the run ended: the scalar _refine's choice; the voxel's next start comes next round
            slot = LSLOT[lane]
            ssr = LSSR[lane]
            if LEND[lane] == CONVERGED and (ssr < SSRB[slot] or not FOUND[slot]):
                for i in range(4):
                    PB[i, slot] = LP[i, lane]
                for u in range(nu):
                    MB[u, slot] = LMOD[u, lane]
                SSRB[slot] = ssr
                FOUND[slot] = True
            LPH[lane] = HELD
            LEND[lane] = RUNNING


# --------------------------------------------------------------------------- the kernels
# One parallel kernel per method, each with its own on-disk cache: a run compiles only the
# method it uses (the shared kernel compiled both, 31 s of CPU where segmented alone is ~17 s).
@jit_voxel
def segmented_chunk(Y, start, stop, tables, settings, out, status):
    """Fit rows ``start .. stop`` of ``Y`` with the segmented method, a block at a time, with
    one scratch allocation. The parallel kernel's loop body is this one call: a scratch tuple
    handled inside a ``prange`` body costs several seconds of compile per field count."""
    s = alloc_segmented_scratch(tables.bu.shape[0], Y.shape[1], SEGMENTED_BLOCK)
    for v0 in range(start, stop, SEGMENTED_BLOCK):
        segmented_block(Y, v0, min(SEGMENTED_BLOCK, stop - v0), tables, settings, s, out,
                        status)


@jit_voxel
def full_chunk(Y, start, stop, tables, settings, out, status):
    """:func:`segmented_chunk` for the full method."""
    s = alloc_scratch(tables.bu.shape[0], tables.dstar_grid.shape[0], tables.d_grid.shape[0],
                      Y.shape[1], BLOCK)
    for v0 in range(start, stop, BLOCK):
        full_block(Y, v0, min(BLOCK, stop - v0), tables, settings, s, out, status)


@jit_parallel
def fit_segmented_blocks(Y, tables, settings, n_chunks, out, status):
    """Fit every row of ``Y`` (n_vox, n_b) float64 with the segmented method, in parallel, a
    block of voxels at a time (see :func:`fit_volume_block` for the arguments)."""
    n = Y.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        segmented_chunk(Y, c * n // n_chunks, (c + 1) * n // n_chunks, tables, settings, out,
                        status)


@jit_parallel
def fit_full_blocks(Y, tables, settings, n_chunks, out, status):
    """Fit every row of ``Y`` (n_vox, n_b) float64 with the full method, in parallel, a block
    of voxels at a time (see :func:`fit_volume_block` for the arguments)."""
    n = Y.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        full_chunk(Y, c * n // n_chunks, (c + 1) * n // n_chunks, tables, settings, out,
                   status)


#: The block kernel of each method code (:mod:`fastivim.kernels.tables`).
BLOCK_KERNELS = {METHOD_FULL: fit_full_blocks, METHOD_SEGMENTED: fit_segmented_blocks}


def fit_volume_block(Y, tables, settings, n_chunks, out, status):
    """Fit every row of ``Y`` (n_vox, n_b) in parallel, a block of voxels at a time.

    Same arguments, outputs and answers as :func:`fastivim.kernels.driver.fit_volume` (the
    scalar kernel): ``Y`` float64 C-contiguous, ``tables`` from
    :func:`fastivim.kernels.tables.make_tables`, ``settings`` a
    :class:`fastivim.kernels.tables.Settings`, ``out`` (n_vox, 6) float32 and ``status``
    (n_vox,) uint8 outputs. Scratch is allocated once per chunk. Calls the compiled kernel of
    ``settings.method`` (:data:`BLOCK_KERNELS`), so a process compiles only the methods it uses.
    """
    BLOCK_KERNELS[settings.method](Y, tables, settings, n_chunks, out, status)
