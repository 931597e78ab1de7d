"""fastivim: fast, trustworthy IVIM fitting of multi-b-value diffusion MRI.

``S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))``, b in s/mm², D and D_star in mm²/s.

Importing this package loads numpy and numba only (no nibabel, click or matplotlib), so
pipelines can call the kernel alone::

    import fastivim
    res = fastivim.fit_ivim(signal, b_values, method="full")
    vox = fastivim.fit_voxels(Y, b_values)        # Y: (n_vox, n_b)
"""

__version__ = "0.1.0"

from . import simulate
from .fit import METHODS, MODELS, IVIMResult, fit_ivim, fit_voxels, validate_b_values
from .kernels.status import STATUS_MEANINGS
from .model import DEFAULT_BOUNDS, PARAM_NAMES, ivim_signal, resolve_bounds

__all__ = [
    "DEFAULT_BOUNDS",
    "IVIMResult",
    "METHODS",
    "MODELS",
    "PARAM_NAMES",
    "STATUS_MEANINGS",
    "fit_ivim",
    "fit_voxels",
    "ivim_signal",
    "resolve_bounds",
    "simulate",
    "validate_b_values",
]
