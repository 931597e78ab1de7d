"""Lane-wise Levenberg–Marquardt control for the ``full`` block kernel.

:func:`fastivim.kernels.voxel.levenberg_marquardt` decides, after each model evaluation,
whether to accept the trial point, how to damp, which parameters are free, and where to
evaluate next. Run one lane at a time, that logic is branchy scalar code and cost about 60 %
of a ``full`` voxel in the block kernel. Here the same decisions are taken for all
:data:`LANES` lanes of the lock-step engine (:func:`fastivim.kernels.block.full_block`) at once:
every per-lane quantity is stored lane-last (``(k, LANES)`` arrays), each stage is one
``for lane in range(LANES)`` loop whose body computes every outcome and keeps one by selects,
so LLVM vectorises it (8 float64 lanes per AVX-512 instruction).

Each lane makes exactly the decisions of the scalar loop, on the same floating-point
operations in the same order. Only the scheduling differs: where the scalar loop "retries
without evaluating" (damped matrix not positive definite, a non-positive predicted decrease,
a step crossing D_star = D: damp harder and solve again), the lane waits in phase ``RETRY``
and solves again in the next round's :func:`lanes_step`, with the other lanes, instead of
evaluating; only when many lanes wait (:data:`fastivim.kernels.block.RETRY_PASS_MIN`) is
``lanes_step`` run again at once. Running it again for every retry cost a whole pass over all
lanes each time (two extra passes per round on average), where a wait costs the retrying lane
one evaluation slot.

Lane flags and phases are float64 (exact small integers), so that selects between them and the
float state need no integer/float mixing in a vector loop.
"""

import math

from ._jit import jit_block
from .vmath import vmax, vmin
from .voxel import LM_FTOL, LM_LAMBDA_MAX, LM_XTOL

#: Lane phases (stored as float64 in ``PH``).
IDLE = 0.0  #: no voxel (none left in the block, or the last one was just written)
INIT = 1.0  #: a run just started: the next evaluation is at its start point
TRIAL = 2.0  #: the next evaluation is at a trial point
HELD = 3.0  #: holds a voxel between runs: its next start is chosen before the next round
RETRY = 4.0  #: damped harder without an evaluation: solves again in the next round's step

#: End codes of a run (``END``): still running, converged, stopped without convergence.
RUNNING = 0.0
CONVERGED = 1.0
FAILED = 2.0


@jit_block
def lanes_accept(MT, GT, HT, ST, PH, EP, PRED, P, G, H, MOD, SSR, LAM, NUF, END, STEP, TAKE,
                 ACC):
    """Take the evaluation just made by :func:`fastivim.kernels.block.lanes_evaluate`.

    A lane in phase ``INIT`` evaluated its start point, which becomes the current point. A lane
    in ``TRIAL`` evaluated the trial point ``EP`` (4, L) of predicted decrease ``PRED`` (L,):
    it is accepted when the gain ratio exceeds 1e-4 (then Nielsen's rule relaxes the damping
    ``LAM``/``NUF`` (L,)), otherwise the damping grows. An accepted point's model ``MT`` (n_u,
    L), gradient half ``GT`` (4, L), Hessian half ``HT`` (10, L) and sum of squares ``ST`` (L,)
    become the current ``MOD``, ``G``, ``H``, ``SSR``, and ``EP`` becomes ``P``.

    Sets ``END`` (L,) to ``CONVERGED`` where the run has converged (the gain is negligible, or
    no damped direction descends), else ``RUNNING``; ``STEP`` (L,) to 1.0 on running lanes that
    must now take a step (:func:`lanes_step`): those just evaluated and those in ``RETRY``
    (their evaluation is ignored), 0.0 elsewhere; ``TAKE``/``ACC`` (L,) are scratch (whether
    the evaluation becomes current; whether a trial was accepted). Lanes in other phases are
    left as they are (``END`` 0, ``STEP`` 0).
    """
    L = PH.shape[0]
    for lane in range(L):
        ph = PH[lane]
        init = ph == INIT
        trial = ph == TRIAL
        ssr = SSR[lane]
        ssr_try = ST[lane]
        rho = (ssr - ssr_try) / PRED[lane]
        accept = trial & (rho > 1e-4)
        reject = trial & (not rho > 1e-4)
        take = init | accept
        decrease = ssr - ssr_try
        # Nielsen (1999): relax damping when the quadratic model predicted well
        q = 2.0 * rho - 1.0
        lam = LAM[lane]
        nuf = NUF[lane]
        lam_acc = lam * vmax(1.0 / 3.0, 1.0 - q * q * q)
        lam_rej = lam * nuf
        nuf_rej = nuf * 2.0
        new_lam = lam_acc if accept else lam
        LAM[lane] = lam_rej if reject else new_lam
        new_nuf = 2.0 if accept else nuf
        NUF[lane] = nuf_rej if reject else new_nuf
        # converged: a negligible gain, or no descent along any damped direction (stationary)
        done = (accept & (decrease <= LM_FTOL * ssr_try)) | (reject & (lam_rej > LM_LAMBDA_MAX))
        END[lane] = CONVERGED if done else RUNNING
        retry = ph == RETRY
        STEP[lane] = 1.0 if (((init | trial) & (not done)) | retry) else 0.0
        TAKE[lane] = 1.0 if take else 0.0
        ACC[lane] = 1.0 if accept else 0.0
        SSR[lane] = ssr_try if take else ssr
    # Rows are copied one at a time (see _take_rows), never several rows of one array in one
    # lane loop: LLVM then guards the vector loop with overlap checks between the rows that
    # fail at run time, and the scalar loop runs (measured: lanes_step 6x slower).
    _take_rows(ACC, EP, P)
    _take_rows(TAKE, GT, G)
    _take_rows(TAKE, HT, H)
    _take_rows(TAKE, MT, MOD)


@jit_block
def _take_rows(TAKE, SRC, DST):
    """``DST[k, lane] = SRC[k, lane]`` where ``TAKE[lane]`` is 1.0 (both (n, L))."""
    for k in range(SRC.shape[0]):
        for lane in range(TAKE.shape[0]):
            src = SRC[k, lane]
            dst = DST[k, lane]
            DST[k, lane] = src if TAKE[lane] > 0.0 else dst


@jit_block
def lanes_step(maxit, P, G, H, LO, HI, SSR, TT, LAM, NUF, IT, STEP, END, PRED, PH, EP, V, TRY):
    """One pass of the scalar LM loop body, up to the next evaluation, on every lane with
    ``STEP`` (L,) = 1.0; returns how many lanes must run it again (a retry without evaluation:
    those lanes are left in phase ``RETRY`` with ``STEP`` 1.0, and solve again in the next
    round).

    Per lane, in :func:`fastivim.kernels.voxel.levenberg_marquardt`'s order: the iteration
    limit ``maxit`` (``IT`` (L,) counts), the exact-fit test (``SSR`` against ``1e-28 TT``), the
    active set (a parameter on a bound of ``LO``/``HI`` (4, L) with its gradient ``G`` (4, L)
    pointing outward is frozen), the damped solve ``(H + LAM |diag H|) d = g`` (``H`` (10, L)
    the Hessian half's upper triangle, row-major) by a 4×4 Cholesky written out in scalars,
    the step clipped to the box, the small-step test, the predicted decrease, the convergence
    test and the D_star > D constraint. Outcomes:

    * a trial point: ``EP`` (4, L) (where to evaluate next), ``PRED`` (L,) and ``PH`` =
      ``TRIAL``;
    * the run ends: ``END`` = ``CONVERGED`` or ``FAILED``;
    * damp harder (``LAM`` and ``NUF`` (L,), Nielsen) and solve again: ``STEP`` stays 1.0
      and ``PH`` = ``RETRY``.

    A lane whose Cholesky fails goes on with a unit pivot (its results are then discarded),
    so that no lane branches. Lanes with ``STEP`` 0.0 are left as they are. ``V`` (4, L) and
    ``TRY`` (L,) are scratch (the clipped step's end point, and whether it is a trial).
    """
    L = STEP.shape[0]
    fmaxit = float(maxit)
    again = 0  # an integer count: a float sum would not vectorise without reassociation
    for lane in range(L):
        s = STEP[lane] > 0.0
        it = IT[lane]
        ssr = SSR[lane]
        lam = LAM[lane]
        nuf = NUF[lane]
        p0 = P[0, lane]
        p1 = P[1, lane]
        p2 = P[2, lane]
        p3 = P[3, lane]
        g0 = G[0, lane]
        g1 = G[1, lane]
        g2 = G[2, lane]
        g3 = G[3, lane]
        lo0 = LO[0, lane]
        lo1 = LO[1, lane]
        lo2 = LO[2, lane]
        lo3 = LO[3, lane]
        hi0 = HI[0, lane]
        hi1 = HI[1, lane]
        hi2 = HI[2, lane]
        hi3 = HI[3, lane]
        h00 = H[0, lane]
        h01 = H[1, lane]
        h02 = H[2, lane]
        h03 = H[3, lane]
        h11 = H[4, lane]
        h12 = H[5, lane]
        h13 = H[6, lane]
        h22 = H[7, lane]
        h23 = H[8, lane]
        h33 = H[9, lane]
        # the active set: frozen where on a bound with the gradient pointing outward
        f0 = not (((p0 <= lo0) & (g0 < 0.0)) | ((p0 >= hi0) & (g0 > 0.0)))
        f1 = not (((p1 <= lo1) & (g1 < 0.0)) | ((p1 >= hi1) & (g1 > 0.0)))
        f2 = not (((p2 <= lo2) & (g2 < 0.0)) | ((p2 >= hi2) & (g2 > 0.0)))
        f3 = not (((p3 <= lo3) & (g3 < 0.0)) | ((p3 >= hi3) & (g3 > 0.0)))
        # the damped matrix of solve_damped: free block of H, identity elsewhere, plus
        # lam * max(|H_ii|, floor) on the free diagonal
        dmax = 0.0
        dmax = vmax(dmax, abs(h00))
        dmax = vmax(dmax, abs(h11))
        dmax = vmax(dmax, abs(h22))
        dmax = vmax(dmax, abs(h33))
        floor = 1e-12 * dmax + 1e-300
        d00 = h00 + lam * vmax(abs(h00), floor)
        d11 = h11 + lam * vmax(abs(h11), floor)
        d22 = h22 + lam * vmax(abs(h22), floor)
        d33 = h33 + lam * vmax(abs(h33), floor)
        m00 = d00 if f0 else 1.0
        m11 = d11 if f1 else 1.0
        m22 = d22 if f2 else 1.0
        m33 = d33 if f3 else 1.0
        m10 = h01 if (f1 & f0) else 0.0
        m20 = h02 if (f2 & f0) else 0.0
        m30 = h03 if (f3 & f0) else 0.0
        m21 = h12 if (f2 & f1) else 0.0
        m31 = h13 if (f3 & f1) else 0.0
        m32 = h23 if (f3 & f2) else 0.0
        b0 = g0 if f0 else 0.0
        b1 = g1 if f1 else 0.0
        b2 = g2 if f2 else 0.0
        b3 = g3 if f3 else 0.0
        # in-place Cholesky L L^T, in solve_damped's order of operations
        s0 = m00
        ok0 = s0 > 0.0
        l00 = math.sqrt(s0 if ok0 else 1.0)
        inv = 1.0 / l00
        l10 = m10 * inv
        l20 = m20 * inv
        l30 = m30 * inv
        s1 = m11
        s1 -= l10 * l10
        ok1 = s1 > 0.0
        l11 = math.sqrt(s1 if ok1 else 1.0)
        inv = 1.0 / l11
        si = m21
        si -= l20 * l10
        l21 = si * inv
        si = m31
        si -= l30 * l10
        l31 = si * inv
        s2 = m22
        s2 -= l20 * l20
        s2 -= l21 * l21
        ok2 = s2 > 0.0
        l22 = math.sqrt(s2 if ok2 else 1.0)
        inv = 1.0 / l22
        si = m32
        si -= l30 * l20
        si -= l31 * l21
        l32 = si * inv
        s3 = m33
        s3 -= l30 * l30
        s3 -= l31 * l31
        s3 -= l32 * l32
        ok3 = s3 > 0.0
        l33 = math.sqrt(s3 if ok3 else 1.0)
        solved = ok0 & ok1 & ok2 & ok3
        # forward substitution
        y0 = b0 / l00
        si = b1
        si -= l10 * y0
        y1 = si / l11
        si = b2
        si -= l20 * y0
        si -= l21 * y1
        y2 = si / l22
        si = b3
        si -= l30 * y0
        si -= l31 * y1
        si -= l32 * y2
        y3 = si / l33
        # back substitution
        x3 = y3 / l33
        si = y2
        si -= l32 * x3
        x2 = si / l22
        si = y1
        si -= l21 * x2
        si -= l31 * x3
        x1 = si / l11
        si = y0
        si -= l10 * x1
        si -= l20 * x2
        si -= l30 * x3
        x0 = si / l00
        x0 = x0 if f0 else 0.0
        x1 = x1 if f1 else 0.0
        x2 = x2 if f2 else 0.0
        x3 = x3 if f3 else 0.0
        # the step clipped to the box, and the step actually taken
        v0 = vmin(vmax(p0 + x0, lo0), hi0)
        v1 = vmin(vmax(p1 + x1, lo1), hi1)
        v2 = vmin(vmax(p2 + x2, lo2), hi2)
        v3 = vmin(vmax(p3 + x3, lo3), hi3)
        e0 = v0 - p0
        e1 = v1 - p1
        e2 = v2 - p2
        e3 = v3 - p3
        big = ((abs(e0) > LM_XTOL * (abs(p0) + LM_XTOL))
               | (abs(e1) > LM_XTOL * (abs(p1) + LM_XTOL))
               | (abs(e2) > LM_XTOL * (abs(p2) + LM_XTOL))
               | (abs(e3) > LM_XTOL * (abs(p3) + LM_XTOL)))
        # predicted decrease 2 d.g - d.H.d (the undamped, full Hessian)
        pred = 0.0
        q = 0.0
        q += h00 * e0
        q += h01 * e1
        q += h02 * e2
        q += h03 * e3
        pred += e0 * (2.0 * g0 - q)
        q = 0.0
        q += h01 * e0
        q += h11 * e1
        q += h12 * e2
        q += h13 * e3
        pred += e1 * (2.0 * g1 - q)
        q = 0.0
        q += h02 * e0
        q += h12 * e1
        q += h22 * e2
        q += h23 * e3
        pred += e2 * (2.0 * g2 - q)
        q = 0.0
        q += h03 * e0
        q += h13 * e1
        q += h23 * e2
        q += h33 * e3
        pred += e3 * (2.0 * g3 - q)
        # the scalar loop's decisions, in its order
        go = it < fmaxit
        exact = ssr <= 1e-28 * TT[lane]
        a2 = go & (not exact)
        none_free = not (f0 | f1 | f2 | f3)
        a3 = a2 & (not none_free)
        damp_chol = a3 & (not solved)
        a4 = a3 & solved
        a5 = a4 & big
        pos = pred > 0.0
        damp_pred = a5 & (not pos)
        a6 = a5 & pos
        small_pred = (pred <= LM_FTOL * ssr) & (lam <= 1.0)
        a7 = a6 & (not small_pred)
        ordered = v2 > v3
        damp_cross = a7 & (not ordered)
        trial = s & a7 & ordered
        damp = damp_chol | damp_pred | damp_cross
        lam_d = lam * nuf
        over = lam_d > LM_LAMBDA_MAX
        # the D_star = D case counts as converged, as in the scalar LM
        conv = ((go & exact) | (a2 & none_free) | (a4 & (not big)) | (a6 & small_pred)
                | (damp_cross & over))
        fail = (not go) | ((damp_chol | damp_pred) & over)
        retry = s & damp & (not over)
        IT[lane] = it + 1.0 if (s & go) else it
        LAM[lane] = lam_d if (s & damp) else lam
        NUF[lane] = nuf * 2.0 if (s & damp) else nuf
        end = END[lane]
        end = CONVERGED if (s & conv) else end
        END[lane] = FAILED if (s & fail) else end
        STEP[lane] = 1.0 if retry else 0.0
        again += 1 if retry else 0
        pr = PRED[lane]
        PRED[lane] = pred if trial else pr
        ph = PH[lane]
        ph = RETRY if retry else ph
        PH[lane] = TRIAL if trial else ph
        TRY[lane] = 1.0 if trial else 0.0
        V[0, lane] = v0  # store-only rows: no overlap check needed (see lanes_accept)
        V[1, lane] = v1
        V[2, lane] = v2
        V[3, lane] = v3
    _take_rows(TRY, V, EP)
    return again
