"""Full (simultaneous) IVIM fit of one voxel: all four parameters by bounded Levenberg–Marquardt.

S0 and f enter the model linearly (as c1 = S0 * f and c2 = S0 * (1 - f)), so for each (D, D_star)
pair of a coarse log-spaced grid the best (S0, f) is a 2×2 least-squares solve on precomputed,
voxel-independent Gram matrices (variable projection, Golub & Pereyra 1973,
doi:10.1137/0710036). A noisy voxel's sum of squares often has two or three basins, so the
bounded LM on all four parameters is run from a few such starts (see :func:`fit_full_voxel`)
and the lowest sum of squares is kept.
"""

import math

from . import status as st
from ._jit import jit_voxel
from .segmented import perfusion_start
from .voxel import KIND_FULL, levenberg_marquardt

#: D_star / D ratio from which a grid pair counts as the separated (perfusion) basin.
SEPARATION = 4.0

#: A far D_star-profile grid point triggers a restart when its sum of squares is within this
#: relative slack of the converged fit (refinement from a grid point typically gains a few %).
RESTART_SLACK = 0.10
#: Grid points within this factor of the fitted D_star count as the same basin.
RESTART_NEIGHBOURHOOD = 1.3
#: At most this many restarts per voxel.
MAX_RESTARTS = 3


@jit_voxel
def grid_start(ybar, w, lo, hi, ES, ED, PAIR, dstar_grid, d_grid, PS, PD, p, p_close):
    """Best (S0, f, D_star, D) over the (D, D_star) grid, with S0 and f solved exactly.

    Two bests are kept, because the bi-exponential has two kinds of basin: pairs with D_star
    at least ``SEPARATION`` times D (the perfusion reading) go to ``p``, closer pairs to
    ``p_close``. A close pair can mimic a D between two grid values and so win on the coarse
    grid although the separated basin refines to the better fit; the caller refines both
    where that matters.

    ``ES`` (n_k, n_u) and ``ED`` (n_j, n_u) hold ``exp(-b * D_star_k)`` and ``exp(-b * D_j)``.
    ``PAIR`` (n_j, n_k, 7) holds, per grid pair, the voxel-independent factors of the 2×2
    least-squares solve (inverse Gram matrix entries) and of the two f-edge solves (inverse
    and plain squared norms), from :func:`fastivim.kernels.driver.make_tables`: the search
    costs a few multiply-adds per pair, no division and no unpredictable branch.

    Returns
    -------
    (red_sep, red_close) : (float, float)
        Reduction of the weighted sum of squares (``sum w ybar**2`` minus the pair's SSR) of
        the best separated and best close pair; ``-inf`` where that kind has no pair.
    """
    nu = ybar.shape[0]
    for k in range(dstar_grid.shape[0]):
        s = 0.0
        for u in range(nu):
            s += w[u] * ES[k, u] * ybar[u]
        PS[k] = s
    for j in range(d_grid.shape[0]):
        s = 0.0
        for u in range(nu):
            s += w[u] * ED[j, u] * ybar[u]
        PD[j] = s
    f_lo = lo[1]
    f_hi = hi[1]
    S0_lo = lo[0]
    S0_hi = hi[0]
    best_sep = -math.inf
    best_close = -math.inf
    for j in range(d_grid.shape[0]):
        pd = PD[j]
        for k in range(dstar_grid.shape[0]):
            if not dstar_grid[k] > d_grid[j]:
                continue
            ps = PS[k]
            # Every candidate is computed and the best picked arithmetically: a branch on
            # "is the unconstrained optimum feasible" mispredicts about half the time, which
            # costs more than the few multiply-adds it would save.
            # Unconstrained (c1, c2) = (S0 f, S0 (1 - f)); NaN factors mark singular pairs.
            c1 = PAIR[j, k, 0] * ps - PAIR[j, k, 1] * pd
            c2 = PAIR[j, k, 2] * pd - PAIR[j, k, 1] * ps
            S0 = c1 + c2
            feasible = (S0 > 0.0) & (c1 >= f_lo * S0) & (c1 <= f_hi * S0) & (S0 >= S0_lo) & (
                S0 <= S0_hi)
            red_free = c1 * ps + c2 * pd
            # otherwise the optimum lies on an f edge, with S0 solved (and clipped) along it
            pv_lo = f_lo * ps + (1.0 - f_lo) * pd
            s_lo = min(max(pv_lo * PAIR[j, k, 3], S0_lo), S0_hi)
            red_lo = 2.0 * s_lo * pv_lo - s_lo * s_lo * PAIR[j, k, 5]
            pv_hi = f_hi * ps + (1.0 - f_hi) * pd
            s_hi = min(max(pv_hi * PAIR[j, k, 4], S0_lo), S0_hi)
            red_hi = 2.0 * s_hi * pv_hi - s_hi * s_hi * PAIR[j, k, 6]
            red_edge = max(red_lo, red_hi)
            reduction = red_free if feasible else red_edge
            separated = dstar_grid[k] >= SEPARATION * d_grid[j]
            if reduction > (best_sep if separated else best_close):  # rare: predictable
                if separated:
                    best_sep = reduction
                    q = p
                else:
                    best_close = reduction
                    q = p_close
                if feasible:
                    q[0] = S0
                    q[1] = c1 / S0
                elif red_lo >= red_hi:
                    q[0] = s_lo
                    q[1] = f_lo
                else:
                    q[0] = s_hi
                    q[1] = f_hi
                q[2] = dstar_grid[k]
                q[3] = d_grid[j]
    return best_sep, best_close


@jit_voxel
def dstar_profile(ybar, bu, w, lo, hi, ES, GSS, dstar_grid, PS, tt, D, prof, e2):
    """Fit over the D_star grid with D held at ``D``: S0 and f solved exactly per point.

    Noisy voxels often have two or three basins along D_star, with bumps finer than any
    affordable grid; the profile shows where they are. ``PS`` must hold ``ES @ (w * ybar)``
    (from :func:`grid_start`) and ``tt`` the voxel's ``sum w ybar**2``. Fills ``prof[:3]``
    (of shape (4, n_k)) with each grid point's weighted sum of squares (``inf`` where
    D_star <= D), S0 and f; ``prof[3]`` is scratch for the caller; ``e2`` (n_u,) is scratch
    for ``exp(-b * D)``, computed once.
    """
    nu = ybar.shape[0]
    ge = 0.0
    pe = 0.0
    for u in range(nu):
        e2[u] = math.exp(-bu[u] * D)
        ge += w[u] * e2[u] * e2[u]
        pe += w[u] * e2[u] * ybar[u]
    f_lo = lo[1]
    f_hi = hi[1]
    for k in range(dstar_grid.shape[0]):
        prof[0, k] = math.inf
        if not dstar_grid[k] > D:
            continue
        gke = 0.0
        for u in range(nu):
            gke += w[u] * ES[k, u] * e2[u]
        gk = GSS[k]
        ps = PS[k]
        det = gk * ge - gke * gke
        c1 = (ge * ps - gke * pe) / det
        c2 = (gk * pe - gke * ps) / det
        S0 = c1 + c2
        if S0 > 0.0 and f_lo * S0 <= c1 <= f_hi * S0 and lo[0] <= S0 <= hi[0]:
            reduction = c1 * ps + c2 * pe
            f = c1 / S0
        else:
            reduction = -math.inf
            for fb in (f_lo, f_hi):
                gv = fb * fb * gk + 2.0 * fb * (1.0 - fb) * gke + (1.0 - fb) * (1.0 - fb) * ge
                pv = fb * ps + (1.0 - fb) * pe
                s = min(max(pv / gv, lo[0]), hi[0])
                red = 2.0 * s * pv - s * s * gv
                if red > reduction:
                    reduction = red
                    S0 = s
                    f = fb
        prof[0, k] = tt - reduction
        prof[1, k] = S0
        prof[2, k] = f


@jit_voxel
def mark_restarts(prof, dstar_grid, ssr, Ds_fit):
    """Flag in ``prof[3]`` the D_star-profile grid points worth a restart: local minima of the
    profile ``prof[0]`` within ``RESTART_SLACK`` of the fit's ``ssr``, away (beyond
    ``RESTART_NEIGHBOURHOOD``) from the fitted ``Ds_fit``. Shared by the scalar and block
    kernels, so both take the same decisions."""
    nk = dstar_grid.shape[0]
    for k in range(nk):
        sk = prof[0, k]
        ratio = dstar_grid[k] / Ds_fit
        candidate = (
            sk < ssr * (1.0 + RESTART_SLACK)
            and not (k > 0 and prof[0, k - 1] < sk)
            and not (k < nk - 1 and prof[0, k + 1] < sk)
            and not RESTART_NEIGHBOURHOOD > ratio > 1.0 / RESTART_NEIGHBOURHOOD
        )
        prof[3, k] = 1.0 if candidate else 0.0


@jit_voxel
def _refine(start, p, model, best, found, lo, hi, bu, w, ybar, maxit, work, mat, free):
    """LM from ``start`` (overwritten); adopt the result into ``p``/``model`` if it is better.

    Returns the best (ssr, found) so far.
    """
    ssr, converged = levenberg_marquardt(KIND_FULL, 4, start, lo, hi, bu, w, ybar, maxit, work,
                                         mat, free)
    if converged and (ssr < best or not found):
        for i in range(4):
            p[i] = start[i]
        for u in range(ybar.shape[0]):
            model[u] = work[u]
        return ssr, True
    return best, found


@jit_voxel
def _same_basin(a, b):
    """Whether two starts share D and D_star to within ``RESTART_NEIGHBOURHOOD``."""
    n = RESTART_NEIGHBOURHOOD  # ratios written as products: a bound of 0 must not divide
    return n * b[2] > a[2] > b[2] / n and n * b[3] > a[3] > b[3] / n


@jit_voxel
def fit_full_voxel(ybar, bu, w, b_min, lo, hi, ES, ED, GSS, PAIR, dstar_grid, d_grid, maxit, p,
                   starts, q, lo2, hi2, model, r, PS, PD, prof, work, mat, free):
    """Fit one voxel's scaled group means with all four parameters free.

    The bi-exponential sum of squares of a noisy voxel often has two or three basins, so one
    local refinement is not enough to match a multi-start optimiser. Refinements, keeping the
    lowest sum of squares:

    1. from the segmented answer before its polish (D from the high-b samples, the best D_star
       of the grid with S0 and f solved): the separated, perfusion-like basin;
    2. from the best separated pair of the (D, D_star) grid, when it lies in another basin and
       comes within ``RESTART_SLACK`` of the fit so far (or step 1 could not run);
    3. from the best close pair (D_star < ``SEPARATION`` D), when it comes within the slack
       too, or the fit so far ended on a bound (a corner such as f = 0);
    4. from up to ``MAX_RESTARTS`` local minima of the D_star profile at the fitted D, away
       from the fitted D_star, that come within the slack.

    Writes the estimate into ``p`` (4,) and the fitted means into ``model`` (n_u,); ``starts``
    (3, 4) and the rest are scratch.

    Returns a status code; ``st.OK`` means ``p`` holds an estimate for :func:`finish_voxel`.
    """
    nu = ybar.shape[0]
    p_sep = starts[0]
    p_close = starts[1]
    p_try = starts[2]
    red_sep, red_close = grid_start(ybar, w, lo, hi, ES, ED, PAIR, dstar_grid, d_grid, PS, PD,
                                    p_sep, p_close)
    tt = 0.0
    for u in range(nu):
        tt += w[u] * ybar[u] * ybar[u]
    ssr = math.inf
    found = False
    # 1
    code, A, D = perfusion_start(ybar, bu, w, b_min, lo, hi, ES, GSS, dstar_grid, r, q, lo2,
                                 hi2)
    if code == st.OK and A + q[0] > 0.0:
        p_try[0] = A + q[0]
        p_try[1] = q[0] / p_try[0]
        p_try[2] = q[1]
        p_try[3] = D
        ssr, found = _refine(p_try, p, model, ssr, found, lo, hi, bu, w, ybar, maxit, work, mat,
                             free)
    # 2
    if red_sep > -math.inf and (
        not found or (tt - red_sep < ssr * (1.0 + RESTART_SLACK) and not _same_basin(p_sep, p))
    ):
        ssr, found = _refine(p_sep, p, model, ssr, found, lo, hi, bu, w, ybar, maxit, work, mat,
                             free)
    # 3
    if red_close > -math.inf and (
        not found or tt - red_close < ssr * (1.0 + RESTART_SLACK) or _on_bound(p, lo, hi)
    ):
        ssr, found = _refine(p_close, p, model, ssr, found, lo, hi, bu, w, ybar, maxit, work,
                             mat, free)
    if not found:
        return st.NO_CONVERGENCE
    # 4: other basins along D_star
    dstar_profile(ybar, bu, w, lo, hi, ES, GSS, dstar_grid, PS, tt, p[3], prof, r)
    D_fit = p[3]
    Ds_fit = p[2]
    mark_restarts(prof, dstar_grid, ssr, Ds_fit)
    for _ in range(MAX_RESTARTS):
        kbest = pop_best_restart(prof)
        if kbest < 0:
            break
        p_try[0] = prof[1, kbest]
        p_try[1] = prof[2, kbest]
        p_try[2] = dstar_grid[kbest]
        p_try[3] = D_fit
        ssr, found = _refine(p_try, p, model, ssr, found, lo, hi, bu, w, ybar, maxit, work, mat,
                             free)
    return st.OK


@jit_voxel
def pop_best_restart(prof):
    """The most promising restart candidate left in ``prof`` (4, n_k) from
    :func:`mark_restarts`: among the grid points marked in row 3, the one with the lowest
    profile sum of squares (row 0), unmarked before it is returned; -1 when none is left.
    Both the scalar and the block kernel take their restarts in this order."""
    kbest = -1
    for k in range(prof.shape[1]):
        if prof[3, k] > 0.0 and (kbest < 0 or prof[0, k] < prof[0, kbest]):
            kbest = k
    if kbest >= 0:
        prof[3, kbest] = 0.0
    return kbest


@jit_voxel
def _on_bound(p, lo, hi):
    """Whether any of the four parameters sits exactly on a bound (after a clipped step)."""
    for i in range(4):
        if p[i] <= lo[i] or p[i] >= hi[i]:
            return True
    return False
