"""The ``full`` method: all four parameters together by bounded, multi-start
Levenberg–Marquardt (:mod:`fastivim.kernels.full`), started from the segmented answer, a
variable-projection grid and the D_star profile's local minima; the lowest sum of squares wins.
"""

from ..kernels.tables import METHOD_FULL
from . import Method
from .least_squares import runner

METHOD = Method(name="full", needs="voxels", run=runner(METHOD_FULL), sd="on_request",
                models=("ivim", "simplified"))
