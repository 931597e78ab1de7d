"""The ``segmented`` method: D from the high-b samples first, then D_star and f.

Step 1 fits D and the intercept by weighted log-linear least squares on the samples at or above
``b_threshold``; step 2 fits the perfusion term to the rest with D fixed (a D_star grid with the
amplitude solved exactly, safeguarded Newton, a bounded 2-parameter LM where a bound binds).
The kernel is :mod:`fastivim.kernels.segmented` inside the shared least-squares driver.
"""

from ..kernels.tables import METHOD_SEGMENTED
from . import Method
from .least_squares import runner

METHOD = Method(name="segmented", needs="voxels", run=runner(METHOD_SEGMENTED),
                sd="on_request", models=("ivim", "simplified"))
