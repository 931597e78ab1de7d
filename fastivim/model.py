"""The IVIM signal equation, parameter names, default bounds, the methods and the maps they make.

The bi-exponential IVIM model (Le Bihan et al., Radiology 1988,
doi:10.1148/radiology.168.2.3393671)::

    S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))

with b in s/mm², D and D_star in mm²/s, f dimensionless and S0 in the signal's own units.
This module is the single home of the equation (simulation, residuals and tests call it) and of
the table of output maps (:data:`MAPS`): the writers, the BIDS names, the report and the run
record all read it, so a new method or model adds entries here and its module in
``fastivim/methods/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

#: Parameter order used by every kernel output column: ``params[:, i]`` is ``PARAM_NAMES[i]``.
PARAM_NAMES = ("S0", "f", "D_star", "D")

#: The model as text, for sidecars and dataset descriptions.
EQUATION = "S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D)), b in s/mm^2"

#: Units of each parameter, for sidecars and reports.
PARAM_UNITS = {"S0": "arbitrary", "f": "fraction", "D_star": "mm^2/s", "D": "mm^2/s"}

#: Default bounds (lower, upper). D_star > D is enforced on top of these.
DEFAULT_BOUNDS = {
    "S0": (0.0, math.inf),
    "f": (0.0, 0.7),
    "D_star": (2e-3, 100e-3),
    "D": (0.1e-3, 5e-3),
}


#: Largest plausible diffusivity bound, mm²/s: a D or D_star bound above it is a unit error
#: (µm²/ms = 1e-3 mm²/s written as mm²/s), not a tissue property.
MAX_DIFFUSIVITY = 1.0


def ivim_signal(b_values, S0, f, D_star, D):
    """Evaluate the IVIM model, broadcasting numpy-style.

    Parameters
    ----------
    b_values : array_like, shape (n_b,)
        b-values in s/mm². They form the last axis of the result.
    S0, f, D_star, D : array_like
        Parameters (S0 in signal units, f in [0, 1], D_star and D in mm²/s); any shapes that
        broadcast together. Each gets a trailing axis for the b-values.

    Returns
    -------
    numpy.ndarray, shape broadcast(S0, f, D_star, D).shape + (n_b,)
        ``S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))`` in float64.
    """
    b = np.asarray(b_values, dtype=np.float64)
    S0, f, D_star, D = (np.asarray(p, dtype=np.float64)[..., None] for p in (S0, f, D_star, D))
    return S0 * (f * np.exp(-b * D_star) + (1.0 - f) * np.exp(-b * D))


def resolve_bounds(bounds: Mapping[str, tuple] | None = None) -> dict:
    """Merge user bounds over the defaults and validate them.

    Parameters
    ----------
    bounds : mapping of str to (lower, upper), optional
        Keys among ``S0``, ``f``, ``D_star``, ``D``. Missing keys keep their default.

    Returns
    -------
    dict
        Every key with a ``(float lower, float upper)`` pair.

    Raises
    ------
    ValueError
        Unknown key, a pair that is not two numbers, a non-finite lower bound, a lower bound
        above its upper bound, f outside [0, 1], a negative bound, an S0 upper bound <= 0, a D
        or D_star bound above :data:`MAX_DIFFUSIVITY` (a unit error), a D_star upper bound
        not above the D lower bound (D_star > D impossible), or an interval that holds no
        float32 value (maps are float32); the message names the key and the reason.
    """
    merged = dict(DEFAULT_BOUNDS)
    if bounds is None:
        return merged
    for key, pair in dict(bounds).items():
        if key not in DEFAULT_BOUNDS:
            raise ValueError(
                f"unknown bounds key {key!r}; valid keys are {', '.join(PARAM_NAMES)}"
            )
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"bounds[{key!r}] must be a pair (lower, upper), got {pair!r}"
            ) from None
        if not math.isfinite(lo):
            raise ValueError(f"bounds[{key!r}]: lower bound must be finite, got {lo}")
        if math.isnan(hi):
            raise ValueError(f"bounds[{key!r}]: upper bound is NaN")
        if lo > hi:
            raise ValueError(f"bounds[{key!r}]: lower bound {lo} is above upper bound {hi}")
        if lo < 0:
            raise ValueError(f"bounds[{key!r}]: lower bound must be >= 0, got {lo}")
        if key == "f" and hi > 1:
            raise ValueError(f"bounds['f']: upper bound must be <= 1, got {hi}")
        if key in ("D", "D_star") and not math.isfinite(hi):
            raise ValueError(f"bounds[{key!r}]: upper bound must be finite, got {hi}")
        if key in ("D", "D_star") and hi > MAX_DIFFUSIVITY:
            raise ValueError(
                f"bounds[{key!r}]: upper bound {hi:g} mm²/s is not a plausible diffusivity "
                f"(tissue D is about 1e-3, D_star 1e-2 to 1e-1 mm²/s); values in µm²/ms must "
                f"be divided by 1000, e.g. {lo * 1e-3:g},{hi * 1e-3:g}"
            )
        if key == "S0" and not hi > 0:
            raise ValueError(f"bounds['S0']: upper bound must be > 0, got {hi:g}")
        merged[key] = (lo, hi)
    if not merged["D_star"][1] > merged["D"][0]:
        raise ValueError(
            f"bounds: D_star (upper bound {merged['D_star'][1]:g}) can never exceed D (lower "
            f"bound {merged['D'][0]:g}); the model needs D_star > D"
        )
    lo32, hi32 = float32_bounds(merged)
    for key, l32, h32 in zip(PARAM_NAMES, lo32, hi32, strict=True):
        if l32 > h32:
            raise ValueError(
                f"bounds[{key!r}] = {merged[key]} holds no float32 value, and maps are stored "
                f"as float32: widen it (by a relative 1e-7 is enough)"
            )
    return merged


def bounds_array(bounds: Mapping[str, tuple]) -> np.ndarray:
    """Bounds as a ``(4, 2)`` float64 array in :data:`PARAM_NAMES` order (for the kernels)."""
    return np.array([bounds[k] for k in PARAM_NAMES], dtype=np.float64)


def float32_bounds(bounds: Mapping[str, tuple]) -> tuple[np.ndarray, np.ndarray]:
    """The float32 interval inside each float64 bound, in :data:`PARAM_NAMES` order.

    Maps are stored as float32, so a value fitted on a bound must be stored as a float32 that
    still compares inside it (``float32(0.3)`` is above 0.3).

    Returns
    -------
    (lo32, hi32) : two (4,) float32 arrays
        The smallest float32 >= each lower bound and the largest float32 <= each upper bound
        (``inf`` stays ``inf``). Where a bound holds no float32 at all, ``lo32 > hi32``.
    """
    barr = bounds_array(bounds)
    lo32 = barr[:, 0].astype(np.float32)
    hi32 = barr[:, 1].astype(np.float32)
    below = lo32.astype(np.float64) < barr[:, 0]
    lo32[below] = np.nextafter(lo32[below], np.float32(np.inf))
    above = hi32.astype(np.float64) > barr[:, 1]
    hi32[above] = np.nextafter(hi32[above], np.float32(-np.inf))
    return lo32, hi32


def bounds_to_json(bounds: Mapping[str, tuple]) -> dict:
    """Bounds as JSON: ``{name: [lower, upper]}`` with an infinite upper bound as ``null``."""
    return {k: [float(lo), None if math.isinf(hi) else float(hi)] for k, (lo, hi) in bounds.items()}


def bounds_from_json(bounds: Mapping[str, list]) -> dict:
    """Inverse of :func:`bounds_to_json`: ``null`` (None) upper bounds become ``inf``."""
    return {k: (float(lo), math.inf if hi is None else float(hi)) for k, (lo, hi) in bounds.items()}


# ------------------------------------------------------------------- methods, models and maps

#: Fitting methods by name, with a one-line description (help texts, config comments). Each has a
#: module in :mod:`fastivim.methods` (its registry checks that the two tables agree).
METHODS = {
    "segmented": "D from the high-b samples first, then D_star and f",
    "full": "all four parameters together (bounded Levenberg-Marquardt, multi-start)",
    "bayesian": "grid empirical Bayes: prior learned from the volume, posterior mean and SD",
    "spatial": "bayesian with evidence pooled from similar neighbouring voxels (needs a volume)",
}

#: Signal models. Every map of :data:`MAPS` names the models that produce it. ``ivim`` is the
#: bi-exponential model; ``simplified`` has no D_star (see :data:`EQUATIONS`).
MODELS = ("ivim", "simplified")

#: Each model's equation as text, for sidecars and dataset descriptions.
EQUATIONS = {
    "ivim": EQUATION,
    "simplified": "S(0) = S0; S(b) = S0 * (1 - f) * exp(-b * D) for b >= b_threshold, "
                  "b in s/mm^2",
}


@dataclass(frozen=True)
class Display:
    """How a map is shown in the report: label, units, scale factor, fixed range, colour map.

    ``scale`` multiplies the stored value (D in mm²/s × 1e3 → ×10⁻³ mm²/s). ``vmax = None``
    means the 99th percentile of the fitted voxels (S0, whose units are arbitrary).
    """

    label: str
    units: str
    scale: float
    vmin: float
    vmax: float | None
    cmap: str
    log: bool = False

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.units})"


@dataclass(frozen=True)
class MapInfo:
    """One output map, declared once.

    Attributes
    ----------
    name : str
        File stem in a ``fastivim run`` output folder (``D`` → ``D.nii.gz`` + ``D.json``).
    attr : str
        The :class:`~fastivim.IVIMResult` attribute holding it.
    dtype : str
        Stored dtype (float maps ``float32``, codes ``uint8``).
    units, description : str
        For the JSON sidecar.
    bids_suffix : str
        BIDS suffix, letters and digits only (``sub-01_model-ivim_<suffix>.nii.gz``).
    display : Display or None
        How the report draws it (None: not drawn as a map).
    models : tuple of str
        The models (:data:`MODELS`) whose fits have this map; absent for the others.
    optional : bool
        Only present when the fit was asked for it (e.g. an uncertainty map).
    newer : bool
        Written by every fit, but absent from outputs of versions before it existed: readers
        take a missing file as an absent map (e.g. the ADC maps).
    """

    name: str
    attr: str
    dtype: str
    units: str
    description: str
    bids_suffix: str
    display: Display | None = None
    models: tuple = MODELS
    optional: bool = False
    newer: bool = False

    def produced_by(self, model: str = "ivim") -> bool:
        """Whether a fit of ``model`` has this map."""
        return model in self.models


#: Every map a fit can produce, in file order. A writer writes those the result holds
#: (:func:`maps_of`).
MAPS = (
    MapInfo("D", "D", "float32", "mm^2/s", "tissue (slow) diffusion coefficient D", "D",
            Display("D", "×10⁻³ mm²/s", 1e3, 0.0, 3.0, "viridis")),
    MapInfo("D_star", "D_star", "float32", "mm^2/s", "pseudo-diffusion coefficient D*", "Dstar",
            Display("D*", "×10⁻³ mm²/s", 1e3, 2.0, 100.0, "plasma", log=True),
            models=("ivim",)),
    MapInfo("f", "f", "float32", "none", "perfusion fraction f", "f",
            Display("f", "fraction", 1.0, 0.0, 0.5, "cividis")),
    MapInfo("S0", "S0", "float32", "arbitrary", "fitted signal at b = 0, in the input's units",
            "S0", Display("S0", "input units", 1.0, 0.0, None, "gray")),
    # mono-exponential ADCs beside the IVIM maps (fastivim.adc), from every fit
    MapInfo("ADC", "ADC", "float32", "mm^2/s",
            "apparent diffusion coefficient: mono-exponential (log-linear least squares) fit "
            "over all b-values, b = 0 included (the clinical ADC; perfusion included)", "ADC",
            Display("ADC", "×10⁻³ mm²/s", 1e3, 0.0, 3.0, "viridis"), newer=True),
    MapInfo("ADC_high", "ADC_high", "float32", "mm^2/s",
            "apparent diffusion coefficient over the b-values >= b_threshold only "
            "(mono-exponential, perfusion suppressed)", "ADChigh",
            Display("ADC (b ≥ threshold)", "×10⁻³ mm²/s", 1e3, 0.0, 3.0, "viridis"),
            newer=True),
    MapInfo("R2", "r_squared", "float32", "none", "coefficient of determination of the fit", "R2",
            Display("R²", "unitless", 1.0, 0.5, 1.0, "YlGnBu_r")),
    MapInfo("RMSE", "rmse", "float32", "arbitrary",
            "root-mean-square residual of the fit, in the input's units", "RMSE"),
    MapInfo("quality_mask", "quality_mask", "uint8", "none",
            "1 where the fit converged inside the bounds with D_star > D (status 0)",
            "qualitymask"),
    MapInfo("status", "status", "uint8", "none", "per-voxel fit status code (see Levels)",
            "status"),
    # one-SD uncertainty of each parameter: bayesian always, least squares with uncertainty
    MapInfo("D_sd", "D_sd", "float32", "mm^2/s", "uncertainty (one standard deviation) of D",
            "Dsd", Display("SD of D", "×10⁻³ mm²/s", 1e3, 0.0, 0.5, "magma"), optional=True),
    MapInfo("D_star_sd", "D_star_sd", "float32", "mm^2/s",
            "uncertainty (one standard deviation) of D*", "Dstarsd",
            Display("SD of D*", "×10⁻³ mm²/s", 1e3, 0.0, 50.0, "magma"), models=("ivim",),
            optional=True),
    MapInfo("f_sd", "f_sd", "float32", "none", "uncertainty (one standard deviation) of f",
            "fsd", Display("SD of f", "fraction", 1.0, 0.0, 0.1, "magma"), optional=True),
    MapInfo("S0_sd", "S0_sd", "float32", "arbitrary",
            "uncertainty (one standard deviation) of S0, in the input's units", "S0sd",
            Display("SD of S0", "input units", 1.0, 0.0, None, "magma"), optional=True),
)

#: Map by result attribute.
MAP_BY_ATTR = {m.attr: m for m in MAPS}


def maps_of(result) -> tuple:
    """The maps of :data:`MAPS` that ``result`` holds (an attribute that is None is absent)."""
    return tuple(m for m in MAPS if getattr(result, m.attr, None) is not None)
