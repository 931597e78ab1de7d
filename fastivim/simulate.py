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


# ------------------------------------------------------------------------- tissue phantom
#: Tissue values of the OSIPI TF2.4 IVIM test data (``generic.json``, XCAT tissues;
#: github.com/OSIPI/TF2.4_IVIM-MRI_CodeCollection, tests/IVIMmodels/unit_tests, Apache-2.0):
#: ``name: (f, D_star mm²/s, D mm²/s)``. The ascending lower intestine (f = 0.69, at the default
#: f bound) and the heart tissues are left out: this is an abdomen.
OSIPI_TISSUES = {
    "muscle": (0.10, 0.0263, 0.00137),
    "liver": (0.11, 0.100, 0.0015),
    "spleen": (0.20, 0.030, 0.0013),
    "kidney cortex": (0.097, 0.020, 0.00212),
    "kidney medulla": (0.158, 0.019, 0.00209),
    "pancreas": (0.15, 0.010, 0.0013),
    "stomach wall": (0.30, 0.012, 0.0015),
    "esophagus": (0.32, 0.030, 0.00167),
    "spinal cord": (0.178, 0.0289, 0.00041),
    "bone marrow": (0.145, 0.050, 0.00043),
}

#: Organ layout in the body's cross-section (first two axes scaled to [-1, 1]): ``name:
#: (centre_x, centre_y, radius_x, radius_y)``, painted in this order over the muscle that fills
#: the body, so later organs cover earlier ones.
TISSUE_LAYOUT = {
    "liver": (-0.35, -0.15, 0.38, 0.35),
    "spleen": (0.45, -0.25, 0.18, 0.16),
    "stomach wall": (0.22, -0.38, 0.20, 0.12),
    "esophagus": (0.02, -0.42, 0.06, 0.06),
    "pancreas": (0.12, 0.05, 0.18, 0.06),
    "kidney cortex": (0.42, 0.30, 0.15, 0.20),
    "kidney medulla": (0.42, 0.30, 0.08, 0.12),
    "bone marrow": (0.0, 0.55, 0.14, 0.12),
    "spinal cord": (0.0, 0.55, 0.05, 0.05),
}

#: b-value schemes of the accuracy benchmark (s/mm²): OSIPI TF2.4's abdominal 18-b scheme
#: (``generic.json``) and an 11-b clinical abdominal protocol.
B_SCHEMES = {
    "osipi18": np.array([0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 350, 400, 550, 700, 850,
                         1000], dtype=np.float64),
    "clinical11": np.array([0, 10, 20, 40, 60, 100, 150, 200, 400, 600, 800], dtype=np.float64),
}

#: Relative standard deviation of each parameter (S0 included) around its tissue value.
TISSUE_VARIATION = 0.10


@dataclass
class TissuePhantom(Phantom):
    """A :class:`Phantom` made of organs: ``labels`` (int16, ``shape``) is 0 in the background
    and ``k`` where the voxel belongs to ``tissues[k - 1]``."""

    labels: np.ndarray = None
    tissues: tuple = ()


def _tissue_labels(shape):
    """Label map (int16) of the organ layout on ``shape``; every slice along axis 3+ the same."""
    labels = np.zeros(shape, dtype=np.int16)
    if len(shape) < 2:
        labels[...] = 1  # 1-D: all muscle
        return labels
    body = _ellipsoid(shape)
    x = np.linspace(-1, 1, shape[0]) if shape[0] > 1 else np.zeros(1)
    y = np.linspace(-1, 1, shape[1]) if shape[1] > 1 else np.zeros(1)
    X, Y = np.meshgrid(x, y, indexing="ij")
    extra = (1,) * (len(shape) - 2)
    names = list(OSIPI_TISSUES)
    labels[body] = names.index("muscle") + 1
    for name, (cx, cy, rx, ry) in TISSUE_LAYOUT.items():
        organ = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0
        organ = np.broadcast_to(organ.reshape(organ.shape + extra), shape) & body
        labels[organ] = names.index(name) + 1
    return labels


def tissue_phantom(shape, b_values=B_SCHEMES["osipi18"], snr=30.0, seed=0,
                   variation=TISSUE_VARIATION) -> TissuePhantom:
    """An abdomen-like phantom: organs with the OSIPI TF2.4 tissue values, Rician noise.

    Each organ of :data:`TISSUE_LAYOUT` (muscle fills the rest of the body) takes its
    ``(f, D_star, D)`` from :data:`OSIPI_TISSUES`; every voxel multiplies each of f, D_star, D
    and S0 (1000) by its own factor ``1 + variation * N(0, 1)`` (clipped to ±3 SD), then f,
    D_star and D are clipped into :data:`fastivim.DEFAULT_BOUNDS`. Outside the body the signal
    is noise only.

    Parameters
    ----------
    shape : int or tuple of int
        Spatial shape; the organ layout lies in the first two axes (1-D shapes are all muscle).
    b_values : array_like (n_b,)
        s/mm²; see :data:`B_SCHEMES`.
    snr : float or None
        ``S0_TISSUE / sigma`` (sigma per channel of the complex noise); ``None``/``inf`` for
        noise-free signals.
    seed : int
        Seed of the NumPy generator: same seed, same phantom, bit for bit.
    variation : float
        Relative standard deviation of each parameter inside an organ.

    Returns
    -------
    TissuePhantom
        ``labels`` and ``tissues`` name each voxel's organ; ``mask`` is the body.
    """
    from .model import DEFAULT_BOUNDS

    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    b = np.asarray(b_values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    labels = _tissue_labels(shape)
    mask = labels > 0
    table = np.array([(1.0, 0.0, 0.0, 0.0)] + [(S0_TISSUE,) + v for v in OSIPI_TISSUES.values()])
    maps = {}
    for k, name in enumerate(("S0", "f", "D_star", "D")):
        factor = 1.0 + variation * np.clip(rng.standard_normal(shape), -3.0, 3.0)
        value = np.where(mask, table[labels, k] * factor, 0.0)
        if name != "S0":
            lo, hi = DEFAULT_BOUNDS[name]
            value = np.where(mask, np.clip(value, lo, hi), 0.0)
        maps[name] = value
    clean = ivim_signal(b, maps["S0"], maps["f"], maps["D_star"], maps["D"])
    noise_free = snr is None or not np.isfinite(snr)
    sigma = 0.0 if noise_free else S0_TISSUE / float(snr)
    signal = add_rician_noise(clean, sigma, rng).astype(np.float32)
    return TissuePhantom(signal=signal, b_values=b, mask=mask,
                         snr=float("inf") if noise_free else float(snr), sigma=sigma,
                         labels=labels, tissues=tuple(OSIPI_TISSUES), **maps)


# ------------------------------------------------------------------------- lesion phantom
#: Values of the small lesions of :func:`lesion_phantom` (f, D_star mm²/s, D mm²/s): tumour-like,
#: more perfused and more restricted than the organs around them.
LESION_VALUES = (0.28, 0.045, 0.8e-3)

#: Voxel size (mm) of :func:`lesion_phantom` by default: abdominal DWI is anisotropic.
LESION_VOXEL_SIZE = (1.5, 1.5, 4.0)

#: Organs a lesion may sit in: muscle (the body's fill) is left out, and so are the stomach
#: wall and the oesophagus, whose f (0.30, 0.32) leaves a lesion no f contrast to keep.
LESION_ORGANS = ("liver", "spleen", "kidney cortex", "pancreas")

#: Width (voxels, in-plane) of the ring of the same organ around a lesion that the lesion's
#: contrast is measured against (and that must lie inside the organ for a lesion to be placed).
LESION_RING = 2


@dataclass
class LesionPhantom(TissuePhantom):
    """A :class:`TissuePhantom` with smooth within-organ variation and small lesions.

    ``lesions`` (int16, ``shape``) is 0 outside lesions and ``k`` inside lesion ``k``
    (1-based); ``rings`` (int16) marks the :data:`LESION_RING`-voxel ring of the same organ
    around lesion ``k``; ``voxel_size`` is the voxel size in mm (one per spatial axis).
    Lesion voxels keep their organ's label in ``labels``.
    """

    lesions: np.ndarray = None
    rings: np.ndarray = None
    voxel_size: tuple = ()


def smooth_field(shape, voxel_size, length_mm, rng):
    """A smooth random field on ``shape`` scaled to [-1, 1]: white noise low-pass filtered with
    a Gaussian of standard deviation ``length_mm`` (in mm, through ``voxel_size``) by FFT."""
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfftn(white)
    k2 = np.zeros(spectrum.shape)
    for ax, (n, size) in enumerate(zip(shape, voxel_size, strict=True)):
        freq = np.fft.rfftfreq(n, d=size) if ax == len(shape) - 1 else np.fft.fftfreq(n, d=size)
        view = [1] * len(shape)
        view[ax] = freq.size
        k2 = k2 + (2 * np.pi * freq.reshape(view)) ** 2
    field = np.fft.irfftn(spectrum * np.exp(-0.5 * k2 * length_mm**2), s=shape,
                          axes=tuple(range(len(shape))))
    field -= field.mean()
    peak = np.abs(field).max()
    return field / peak if peak > 0 else field


def _place_lesions(labels, voxel_size, n_lesions, sizes, rng):
    """Lesion and ring maps (int16): up to ``n_lesions`` ellipsoids, ``sizes`` (lo, hi) voxels
    across in-plane (the same mm extent through-plane, at least one slice), each with its
    :data:`LESION_RING`-voxel ring wholly inside one organ of :data:`LESION_ORGANS` and apart
    from the other lesions and rings."""
    shape = labels.shape
    lesions = np.zeros(shape, dtype=np.int16)
    rings = np.zeros(shape, dtype=np.int16)
    taken = np.zeros(shape, dtype=bool)
    names = list(OSIPI_TISSUES)
    # one organ after the other, so that lesions are not all in the largest organ
    organs = [np.argwhere(labels == names.index(n) + 1) for n in LESION_ORGANS]
    organs = [c for c in organs if c.size]
    if not organs:
        return lesions, rings
    nz = shape[2] if len(shape) > 2 else 1
    grid = np.indices(shape)
    k = 0
    for attempt in range(50 * n_lesions):
        if k == n_lesions:
            break
        candidates = organs[attempt % len(organs)]
        c = candidates[rng.integers(len(candidates))]
        across = int(rng.integers(sizes[0], sizes[1] + 1))
        r = across / 2.0
        rz = max(r * voxel_size[0] / voxel_size[2], 0.5) if len(shape) > 2 else 1.0
        # voxel centres within the ellipsoid; even sizes centre between voxels
        off = 0.5 if across % 2 == 0 else 0.0
        d2 = ((grid[0] - c[0] + off) / r) ** 2 + ((grid[1] - c[1] + off) / r) ** 2
        if len(shape) > 2:
            d2 = d2 + ((grid[2] - c[2]) / rz) ** 2 if nz > 1 else d2
        lesion = d2 < 1.0
        if lesion.sum() < 2:
            continue
        ring = _dilate_inplane(lesion, LESION_RING) & ~lesion
        zone = lesion | ring
        organ = labels[tuple(c)]
        if not np.all(labels[zone] == organ) or taken[_dilate_inplane(zone, 1)].any():
            continue
        k += 1
        lesions[lesion] = k
        rings[ring] = k
        taken |= zone
    return lesions, rings


def _dilate_inplane(m, n):
    """``m`` dilated by ``n`` voxels along the first two axes (a square structuring element)."""
    out = m.copy()
    for _ in range(n):
        grown = out.copy()
        for ax in (0, 1):
            if m.shape[ax] > 1:
                grown[(slice(None),) * ax + (slice(1, None),)] |= out[(slice(None),) * ax
                                                                     + (slice(None, -1),)]
                grown[(slice(None),) * ax + (slice(None, -1),)] |= out[(slice(None),) * ax
                                                                      + (slice(1, None),)]
        out = grown  # axis 1 grows the axis-0 result: a square element (diagonals too)
    return out


def lesion_phantom(shape, b_values=B_SCHEMES["clinical11"], snr=20.0, seed=0,
                   voxel_size=LESION_VOXEL_SIZE, smooth=TISSUE_VARIATION, jitter=0.04,
                   length_mm=20.0, n_lesions=18, lesion_sizes=(2, 5)) -> LesionPhantom:
    """An abdomen-like phantom that is not made of uniform blocks, with small lesions.

    The organs of :func:`tissue_phantom` (OSIPI TF2.4 values). Each of S0, f, D_star and D is
    its organ's value times ``(1 + smooth * F) * (1 + jitter * N(0, 1))``: ``F`` a smooth random
    field in [-1, 1] (Gaussian low-pass of white noise, ``length_mm`` standard deviation in mm,
    one field per parameter), the second factor a voxel's own jitter (clipped to ±3 SD). Then up
    to ``n_lesions`` lesions, ``lesion_sizes`` voxels across in-plane, inside organs with
    :data:`LESION_VALUES` (times the jitter), and Rician noise.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape (2-D or 3-D); the organ layout lies in the first two axes.
    b_values : array_like (n_b,)
        s/mm².
    snr : float or None
        ``S0_TISSUE / sigma``; ``None``/``inf`` for noise-free signals.
    seed : int
        Seed of the NumPy generator: same seed, same phantom.
    voxel_size : tuple of float
        mm per voxel along each spatial axis (the smooth field's length and the lesions'
        through-plane extent are in mm).
    smooth, jitter : float
        Amplitude of the smooth within-organ variation and SD of the voxel jitter (relative).
    length_mm : float
        Length scale of the smooth variation, mm.
    n_lesions : int
        Lesions to place (fewer when the organs have no room).
    lesion_sizes : (int, int)
        Smallest and largest in-plane diameter, voxels.

    Returns
    -------
    LesionPhantom
    """
    from .model import DEFAULT_BOUNDS

    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"lesion_phantom needs a 2-D or 3-D shape, got {shape}")
    voxel_size = tuple(float(v) for v in voxel_size)[:len(shape)]
    b = np.asarray(b_values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    labels = _tissue_labels(shape)
    mask = labels > 0
    lesions, rings = _place_lesions(labels, voxel_size, n_lesions, lesion_sizes, rng)
    table = np.array([(1.0, 0.0, 0.0, 0.0)] + [(S0_TISSUE,) + v for v in OSIPI_TISSUES.values()])
    lesion_values = (None,) + LESION_VALUES
    maps = {}
    for k, name in enumerate(("S0", "f", "D_star", "D")):
        field = smooth_field(shape, voxel_size, length_mm, rng)
        noise = 1.0 + jitter * np.clip(rng.standard_normal(shape), -3.0, 3.0)
        base = table[labels, k]
        if k > 0:
            base = np.where(lesions > 0, lesion_values[k], base)
            value = np.where(lesions > 0, base * noise, base * (1.0 + smooth * field) * noise)
            lo, hi = DEFAULT_BOUNDS[name]
            value = np.where(mask, np.clip(value, lo, hi), 0.0)
        else:
            value = np.where(mask, base * (1.0 + smooth * field) * noise, 0.0)
        maps[name] = value
    clean = ivim_signal(b, maps["S0"], maps["f"], maps["D_star"], maps["D"])
    noise_free = snr is None or not np.isfinite(snr)
    sigma = 0.0 if noise_free else S0_TISSUE / float(snr)
    signal = add_rician_noise(clean, sigma, rng).astype(np.float32)
    return LesionPhantom(signal=signal, b_values=b, mask=mask,
                         snr=float("inf") if noise_free else float(snr), sigma=sigma,
                         labels=labels, tissues=tuple(OSIPI_TISSUES), lesions=lesions,
                         rings=rings, voxel_size=voxel_size, **maps)


def lesion_contrast(estimate, truth, phantom) -> np.ndarray:
    """Share of each lesion's true contrast that a map keeps: (n_lesions,) float64.

    Contrast is the mean inside the lesion minus the mean over its ring (the
    :data:`LESION_RING`-voxel ring of the same organ around it), for the map and for the truth;
    the share is their ratio (1 = kept, 0 = erased). A non-finite estimate in the lesion or
    ring makes that lesion's share NaN.
    """
    est = np.asarray(estimate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    n = int(phantom.lesions.max())
    out = np.empty(n)
    for k in range(1, n + 1):
        les = phantom.lesions == k
        ring = phantom.rings == k
        t = tru[les].mean() - tru[ring].mean()
        out[k - 1] = (est[les].mean() - est[ring].mean()) / t
    return out
