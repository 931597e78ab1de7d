"""The automatic mask (the lowest-b image above a share of its robust maximum), in NumPy only.

Used by ``fastivim run`` (:mod:`fastivim.io`) and by ``fit_ivim(..., mask="auto")``; it
imports neither nibabel nor click, so the API stays light.
"""

from __future__ import annotations

import numpy as np

from .options import RunOptions

#: The automatic mask's reference level: this percentile of the lowest-b image.
AUTO_MASK_PERCENTILE = 99.0

#: Default share of that reference a voxel's lowest-b signal must exceed.
MASK_FRACTION = RunOptions().mask_fraction


def lowest_b_image(data, b_values) -> np.ndarray:
    """Mean of the volumes at the lowest b-value, float32 (X, Y, Z)."""
    b = np.asarray(b_values)
    idx = np.flatnonzero(b == b.min())
    return np.mean(np.asarray(data)[..., idx], axis=-1, dtype=np.float32)


def auto_mask(data, b_values, fraction: float = MASK_FRACTION) -> tuple[np.ndarray, float]:
    """Automatic mask from the lowest-b (b = 0) image.

    A voxel is in when its lowest-b signal exceeds ``fraction`` × the 99th percentile of the
    lowest-b image (a robust maximum, so a few hot voxels do not move it). This drops the
    noise-only background, which a plain low-percentile cut keeps when it fills much of the
    field of view.

    Parameters
    ----------
    data : array, shape (X, Y, Z, n_b)
    b_values : array (n_b,)
        s/mm².
    fraction : float
        In [0, 1); 0 keeps every voxel with positive signal.

    Returns
    -------
    mask : bool array (X, Y, Z)
    threshold : float
        The lowest-b signal level used, in the input's units.
    """
    b0 = lowest_b_image(data, b_values)
    finite = np.isfinite(b0)
    ref = float(np.percentile(b0[finite], AUTO_MASK_PERCENTILE)) if finite.any() else 0.0
    threshold = max(fraction * ref, 0.0)
    with np.errstate(invalid="ignore"):
        mask = finite & (b0 > threshold)
    return mask, threshold
