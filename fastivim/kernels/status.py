"""Per-voxel status codes written by the kernels (``uint8``).

Kernels never raise: each voxel gets one of these codes instead. Only ``OK`` voxels enter the
quality mask. Codes ``NO_CONVERGENCE``, ``BAD_INPUT`` and ``NUMERICAL_FAILURE`` leave NaN
parameters; ``AT_BOUND`` and ``DSTAR_NOT_ABOVE_D`` keep the (valid, but constrained) estimate.
"""

OK = 0  #: converged, finite, interior, D_star > D
AT_BOUND = 1  #: converged, but a parameter is pinned at one of its bounds
NO_CONVERGENCE = 2  #: the iteration limit was reached before convergence (params NaN)
BAD_INPUT = 3  #: NaN/inf samples, or no positive signal (all zero or negative-only; params NaN)
NUMERICAL_FAILURE = 4  #: too few positive high-b samples for the log-linear step, or a
#: non-finite result (params NaN)
DSTAR_NOT_ABOVE_D = 5  #: D_star ended at (or could not be placed above) D
OUTSIDE_MASK = 6  #: not fitted: outside the mask (set by the Python layer, params NaN)

STATUS_MEANINGS = {
    OK: "converged, interior, D_star > D",
    AT_BOUND: "converged with a parameter pinned at a bound",
    NO_CONVERGENCE: "iteration limit reached without convergence",
    BAD_INPUT: "non-finite samples, or no positive signal",
    NUMERICAL_FAILURE: "too few positive high-b samples, or a non-finite result",
    DSTAR_NOT_ABOVE_D: "D_star could not be kept above D",
    OUTSIDE_MASK: "outside the mask, not fitted",
}
