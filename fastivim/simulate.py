"""Synthetic IVIM phantoms with known ground truth (for the demo, tests and benchmarks).

Signals follow :func:`fastivim.model.ivim_signal` with Rician noise: the magnitude of the
complex signal plus independent Gaussian noise of standard deviation ``sigma = S0 / snr`` in
each channel, as magnitude MR images are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import ivim_signal

#: The b-value scheme of the benchmarks (s/mm²).
DEFAULT_B_VALUES = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=np.float64)

#: Ground-truth ranges: (low, high) for each parameter, physiological for body/brain tissue.
TRUTH_RANGES = {"f": (0.05, 0.35), "D_star": (10e-3, 80e-3), "D": (0.5e-3, 2e-3)}

#: Signal at b = 0 inside the phantom.
S0_TISSUE = 1000.0


@dataclass
class Phantom:
    """A synthetic acquisition and the parameters that made it.

    ``signal`` has shape ``shape + (n_b,)`` (float32); the maps have ``shape`` (float64) and are
    0 outside ``mask``, where the signal is noise only.
    """

    signal: np.ndarray
    b_values: np.ndarray
    S0: np.ndarray
    f: np.ndarray
    D_star: np.ndarray
    D: np.ndarray
    mask: np.ndarray
    snr: float
    sigma: float

    def truth(self) -> dict:
        """Ground-truth maps by parameter name."""
        return {"S0": self.S0, "f": self.f, "D_star": self.D_star, "D": self.D}


def add_rician_noise(signal, sigma, rng):
    """Magnitude of ``signal`` plus complex Gaussian noise of per-channel std ``sigma``."""
    if sigma == 0:
        return np.asarray(signal, dtype=np.float64)
    real = signal + rng.normal(0.0, sigma, np.shape(signal))
    imag = rng.normal(0.0, sigma, np.shape(signal))
    return np.hypot(real, imag)


def _ellipsoid(shape):
    """Boolean ellipsoid filling ~80% of each axis (all True for 1-D shapes)."""
    if len(shape) < 2:
        return np.ones(shape, dtype=bool)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape],
                        indexing="ij")
    r2 = sum((g / 0.85) ** 2 for g in grids[:2])
    return r2 <= 1.0


def phantom(shape, b_values=DEFAULT_B_VALUES, snr=30.0, seed=0, ranges=None) -> Phantom:
    """Make a phantom of spatial ``shape`` with known D, D_star, f and S0.

    Parameters
    ----------
    shape : int or tuple of int
        Spatial shape. 1-D shapes are all tissue; 2-D and larger hold an elliptic-cylinder
        "body" (in the first two axes) surrounded by noise-only background.
    b_values : array_like (n_b,)
        s/mm².
    snr : float or None
        S0 / sigma inside the tissue; ``None`` or ``inf`` for noise-free signals.
    seed : int
        Seed of the NumPy generator: same seed, same phantom.
    ranges : dict, optional
        ``{"f"|"D_star"|"D": (low, high)}`` over :data:`TRUTH_RANGES`. Each tissue voxel draws
        its parameters uniformly (D and D_star log-uniformly) from these ranges.

    Returns
    -------
    Phantom
    """
    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    b = np.asarray(b_values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rr = dict(TRUTH_RANGES, **(ranges or {}))
    mask = _ellipsoid(shape)
    f = np.where(mask, rng.uniform(*rr["f"], size=shape), 0.0)
    D = np.where(mask, np.exp(rng.uniform(*np.log(rr["D"]), size=shape)), 0.0)
    D_star = np.where(mask, np.exp(rng.uniform(*np.log(rr["D_star"]), size=shape)), 0.0)
    S0 = np.where(mask, S0_TISSUE, 0.0)
    clean = ivim_signal(b, S0, f, D_star, D)
    noise_free = snr is None or not np.isfinite(snr)
    sigma = 0.0 if noise_free else S0_TISSUE / float(snr)
    signal = add_rician_noise(clean, sigma, rng).astype(np.float32)
    return Phantom(signal=signal, b_values=b, S0=S0, f=f, D_star=D_star, D=D, mask=mask,
                   snr=float("inf") if noise_free else float(snr), sigma=sigma)


def error_table(estimate: dict, truth: dict, where) -> dict:
    """Accuracy of fitted maps against the truth, over the voxels ``where``.

    Parameters
    ----------
    estimate, truth : dict of arrays
        Maps by parameter name (same shapes).
    where : bool array
        Voxels to compare (e.g. the quality mask inside the phantom).

    Returns
    -------
    dict
        ``{name: {"truth_median", "fit_median", "median_abs_rel_error", "median_rel_bias"}}``
        for every name of ``estimate`` (relative errors as fractions).
    """
    out = {}
    for name, est in estimate.items():
        e = np.asarray(est, dtype=np.float64)[where]
        t = np.asarray(truth[name], dtype=np.float64)[where]
        rel = (e - t) / t
        out[name] = {"truth_median": float(np.median(t)), "fit_median": float(np.median(e)),
                     "median_abs_rel_error": float(np.median(np.abs(rel))),
                     "median_rel_bias": float(np.median(rel))}
    return out
