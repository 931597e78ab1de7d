"""Standard deviations of least-squares IVIM estimates, from the fitted maps (compiled).

``full``: the asymptotic covariance at the minimum, ``sigma² (JᵀJ)⁻¹`` with the Jacobian ``J``
of the model over every sample and ``sigma² = SSR / (n_b - 4)``.

``segmented``: each step's own covariance, as the fit makes them. Step 1 is a weighted
log-linear fit of the samples with ``b >= b_threshold``: ``ln S = ln A - b D`` with
``var(ln S_i) ≈ sigma² / S_i²``, so ``var(D) = sigma² / sum w S² (b - b̄)²`` and
``var(ln A) = sigma² / sum w S² + b̄² var(D)`` (``b̄`` the ``w S²``-weighted mean b). Step 2
fits ``B exp(-b D_star)`` (B = S0 f) to what the tissue term leaves, D and A held: its 2×2
``sigma² (J₂ᵀJ₂)⁻¹`` plus step 1's covariance carried through the step-2 estimate's
sensitivity to A and D (first order; the two steps' noise taken as independent). Then
``S0 = A + B`` and ``f = B / S0`` by first-order propagation with the A–B covariance (an error
in A is largely taken up by B, so S0 is much surer than A).

Internal units as in the fitters: b in ms/µm², D in µm²/ms.
"""

import math

import numpy as np
from numba import prange

from ._jit import jit_parallel, jit_voxel

KIND_FULL = 0
KIND_SEGMENTED = 1


@jit_voxel
def _ssr(Y, v, groups, bu, S0, f, Ds, D):
    """Sum of squared residuals of the model over voxel ``v``'s raw samples (NaN when a sample
    is not finite)."""
    ssr = 0.0
    for i in range(Y.shape[1]):
        b = bu[groups[i]]
        r = np.float64(Y[v, i]) - S0 * (f * math.exp(-b * Ds) + (1.0 - f) * math.exp(-b * D))
        ssr += r * r
    return ssr


@jit_voxel
def _invert_spd(A, n, inv):
    """Inverse of the symmetric positive-definite ``A[:n, :n]`` into ``inv`` (Jacobi-scaled
    Gauss–Jordan, no pivoting needed for SPD); returns False when it is numerically singular."""
    for i in range(n):
        if not A[i, i] > 0.0:
            return False
    for i in range(n):
        for j in range(n):
            inv[i, j] = 1.0 if i == j else 0.0
    # scale to unit diagonal: the parameters differ by orders of magnitude
    for i in range(n):
        A[i, n] = 1.0 / math.sqrt(A[i, i])
    for i in range(n):
        for j in range(n):
            A[i, j] *= A[i, n] * A[j, n]
    for k in range(n):
        p = A[k, k]
        if not p > 1e-12:
            return False
        for j in range(n):
            A[k, j] /= p
            inv[k, j] /= p
        for i in range(n):
            if i != k:
                c = A[i, k]
                for j in range(n):
                    A[i, j] -= c * A[k, j]
                    inv[i, j] -= c * inv[k, j]
    for i in range(n):
        for j in range(n):
            inv[i, j] *= A[i, n] * A[j, n]
    return True


@jit_voxel
def _full_sd(bu, w, S0, f, Ds, D, s2, A, inv, sd, v):
    """SDs of (S0, f, D_star, D) from ``s2 (JᵀJ)⁻¹`` at the fitted point (internal units)."""
    for i in range(4):
        for j in range(4):
            A[i, j] = 0.0
    for u in range(bu.shape[0]):
        e1 = math.exp(-bu[u] * Ds)
        e2 = math.exp(-bu[u] * D)
        j0 = f * e1 + (1.0 - f) * e2
        j1 = S0 * (e1 - e2)
        j2 = -S0 * f * bu[u] * e1
        j3 = -S0 * (1.0 - f) * bu[u] * e2
        J = (j0, j1, j2, j3)
        for i in range(4):
            for j in range(4):
                A[i, j] += w[u] * J[i] * J[j]
    if not _invert_spd(A, 4, inv):
        return False
    for k in range(4):
        sd[v, k] = math.sqrt(s2 * inv[k, k]) * (1e-3 if k >= 2 else 1.0)
    return True


@jit_voxel
def _segmented_sd(bu, w, b_min, S0, f, Ds, D, s2, A, inv, sd, v):
    """SDs of (S0, f, D_star, D) from the two steps of the segmented fit (internal units)."""
    Ai = S0 * (1.0 - f)  # tissue intercept
    B = S0 * f
    # step 1: weighted log-linear regression over the high-b samples
    sw = 0.0
    swb = 0.0
    for u in range(bu.shape[0]):
        if bu[u] >= b_min:
            s = Ai * math.exp(-bu[u] * D)
            om = w[u] * s * s
            sw += om
            swb += om * bu[u]
    if not sw > 0.0:
        return False
    bbar = swb / sw
    sxx = 0.0
    for u in range(bu.shape[0]):
        if bu[u] >= b_min:
            s = Ai * math.exp(-bu[u] * D)
            sxx += w[u] * s * s * (bu[u] - bbar) ** 2
    if not sxx > 0.0:
        return False
    var_D = s2 / sxx
    var_A = Ai * Ai * (s2 / sw + bbar * bbar * var_D)  # var(A) = A² var(ln A)
    cov_AD = Ai * bbar * var_D  # ln A and the slope -D are correlated through b̄
    # step 2: B exp(-b D_star) over every sample, with D and A held. Its estimate moves with
    # step 1's: d(B, D_star) = H⁻¹ J₂ᵀ W dr, where the target r = y - A exp(-b D) moves by
    # -exp(-b D) dA + A b exp(-b D) dD.
    a00 = a01 = a11 = 0.0
    gA0 = gA1 = gD0 = gD1 = 0.0
    for u in range(bu.shape[0]):
        e = math.exp(-bu[u] * Ds)
        eD = math.exp(-bu[u] * D)
        jb = e
        jd = -B * bu[u] * e
        a00 += w[u] * jb * jb
        a01 += w[u] * jb * jd
        a11 += w[u] * jd * jd
        gA0 -= w[u] * jb * eD
        gA1 -= w[u] * jd * eD
        gD0 += w[u] * jb * Ai * bu[u] * eD
        gD1 += w[u] * jd * Ai * bu[u] * eD
    A[0, 0] = a00
    A[0, 1] = a01
    A[1, 0] = a01
    A[1, 1] = a11
    if not _invert_spd(A, 2, inv):
        return False
    # sensitivities G (2 x 2): rows (B, D_star), columns (A, D)
    GBA = inv[0, 0] * gA0 + inv[0, 1] * gA1
    GSA = inv[1, 0] * gA0 + inv[1, 1] * gA1
    GBD = inv[0, 0] * gD0 + inv[0, 1] * gD1
    GSD = inv[1, 0] * gD0 + inv[1, 1] * gD1
    var_B = s2 * inv[0, 0] + GBA * GBA * var_A + 2 * GBA * GBD * cov_AD + GBD * GBD * var_D
    var_Ds = s2 * inv[1, 1] + GSA * GSA * var_A + 2 * GSA * GSD * cov_AD + GSD * GSD * var_D
    cov_AB = GBA * var_A + GBD * cov_AD
    var_S0 = var_A + var_B + 2.0 * cov_AB
    var_f = (Ai * Ai * var_B + B * B * var_A - 2.0 * Ai * B * cov_AB) / S0**4
    sd[v, 0] = math.sqrt(max(var_S0, 0.0))
    sd[v, 1] = math.sqrt(max(var_f, 0.0))
    sd[v, 2] = math.sqrt(var_Ds) * 1e-3
    sd[v, 3] = math.sqrt(var_D) * 1e-3
    return True


@jit_parallel
def ls_uncertainty(Y, kind, groups, bu, w, b_min, n_chunks, out, sd):
    """SDs of the least-squares maps in ``out`` (n_vox, >= 4: S0, f, D_star, D in user units)
    for the voxels of ``Y`` (n_vox, n_b); writes ``sd`` (n_vox, 4) float32 in the same order.

    Parameters
    ----------
    kind : int
        :data:`KIND_FULL` or :data:`KIND_SEGMENTED`.
    groups, bu, w
        Index of each sample's unique b-value, the unique b-values in ms/µm², group sizes.
    b_min : float
        High-b threshold of the segmented step 1, ms/µm².

    NaN where a parameter is NaN, where ``n_b <= 4`` (no residual degrees of freedom) or where
    the information matrix is singular (e.g. f = 0 leaves D_star undetermined).
    """
    n = Y.shape[0]
    dof = Y.shape[1] - 4
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        A = np.empty((4, 5))
        inv = np.empty((4, 4))
        for v in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            for k in range(4):
                sd[v, k] = math.nan
            S0 = np.float64(out[v, 0])
            f = np.float64(out[v, 1])
            Ds = np.float64(out[v, 2]) * 1e3
            D = np.float64(out[v, 3]) * 1e3
            if dof <= 0 or not (math.isfinite(S0) and math.isfinite(f) and math.isfinite(Ds)
                                and math.isfinite(D)):
                continue
            ssr = _ssr(Y, v, groups, bu, S0, f, Ds, D)
            if not math.isfinite(ssr):
                continue
            s2 = ssr / dof
            if kind == KIND_FULL:
                ok = _full_sd(bu, w, S0, f, Ds, D, s2, A, inv, sd, v)
            else:
                ok = _segmented_sd(bu, w, b_min, S0, f, Ds, D, s2, A, inv, sd, v)
            if not ok:
                for k in range(4):
                    sd[v, k] = math.nan
