"""The estimators, one module each, behind one registry.

:mod:`fastivim.fit` is the public face: it checks the b-values and options, masks and
flattens the signal, asks :data:`REGISTRY` for the method, runs it on the ``(n_vox, n_b)``
matrix and builds the :class:`~fastivim.IVIMResult`. A method module holds everything that is
its own: which compiled kernel it runs, how it drives it, what it needs and what it returns.

Adding a method is one new module here that defines a :class:`Method` named ``METHOD``, its
line in :data:`REGISTRY` and its one-line description in :data:`fastivim.model.METHODS` (read
by the CLI, config files and help texts without importing any kernel).

=============  ==============================  =========  ===================================
method         module                          needs      SD maps
=============  ==============================  =========  ===================================
segmented      :mod:`.segmented`               voxels     with ``uncertainty=True``
full           :mod:`.full`                    voxels     with ``uncertainty=True``
bayesian       :mod:`.bayesian`                voxels     always (posterior SD)
=============  ==============================  =========  ===================================

The ``simplified`` model is not a method: :mod:`.simplified` fits it for ``segmented`` and
``full`` alike (both reach the same least-squares answer for that linear-in-log model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from ..model import METHODS as _DESCRIPTIONS

#: What a method needs: ``"voxels"`` (each row of the (n_vox, n_b) matrix on its own, so
#: ``fit_voxels`` can call it) or ``"volume"`` (neighbours: the mask, the spatial shape and the
#: voxel sizes, so only ``fit_ivim`` can).
NEEDS = ("voxels", "volume")

#: When a method gives the SD maps (``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd``).
SD_POLICIES = ("on_request", "always")


@dataclass(frozen=True)
class FitRequest:
    """Everything a method reads besides the signal matrix, validated by :mod:`fastivim.fit`.

    Attributes
    ----------
    b : float64 array (n_b,)
        b-values in s/mm², the signal's column order.
    bounds : dict
        ``{name: (lower, upper)}`` in :data:`fastivim.model.PARAM_NAMES` units.
    b_threshold : float
        s/mm², already checked against the sampling.
    seed : int
        Seed of any random subsample (same seed, same bits).
    uncertainty : bool
        The caller asked for SD maps.
    model : str
        ``"ivim"`` or ``"simplified"``.
    progress : bool
        Show a tqdm bar on stderr.
    kernel : str
        Private: the least-squares kernel (``"block"`` or the ``"scalar"`` reference).
    mask : bool array or None
        Volume methods: which voxels of ``spatial`` the rows of the matrix are (C order);
        None means every voxel.
    spatial : tuple or None
        Volume methods: the spatial shape; None when the rows have no geometry (fit_voxels).
    voxel_sizes : tuple of float or None
        Volume methods: voxel size along each spatial axis, mm (None: unknown).
    """

    b: np.ndarray
    bounds: dict
    b_threshold: float
    seed: int = 0
    uncertainty: bool = False
    model: str = "ivim"
    progress: bool = False
    kernel: str = "block"
    mask: np.ndarray | None = None
    spatial: tuple | None = None
    voxel_sizes: tuple | None = None


class MethodOutput(NamedTuple):
    """What a method returns for the (n_vox, n_b) matrix it was given.

    ``out`` (n_vox, 6) float32 in :data:`fastivim.fit.OUTPUT_COLUMNS` order; ``status``
    (n_vox,) uint8; ``sd`` (n_vox, 4) float32 in :data:`fastivim.model.PARAM_NAMES` order, or
    None; ``extra``: further :class:`~fastivim.IVIMResult` fields by name.
    """

    out: np.ndarray
    status: np.ndarray
    sd: np.ndarray | None = None
    extra: dict = {}


@dataclass(frozen=True)
class Method:
    """One estimator: its name, what it needs, its runner and what it returns.

    Attributes
    ----------
    name : str
        The ``method=`` string (a key of :data:`fastivim.model.METHODS`).
    needs : str
        One of :data:`NEEDS`.
    run : callable
        ``run(Y, request) -> MethodOutput`` with ``Y`` the C-contiguous (n_vox, n_b) matrix.
    sd : str
        One of :data:`SD_POLICIES`.
    models : tuple of str
        The signal models it fits (a key of :data:`fastivim.model.MODELS` each).
    extra_fields : tuple of str
        :class:`~fastivim.IVIMResult` fields it fills besides the maps.
    """

    name: str
    needs: str
    run: Callable
    sd: str = "on_request"
    models: tuple = ("ivim",)
    extra_fields: tuple = ()

    def __post_init__(self):
        assert self.needs in NEEDS, self.needs
        assert self.sd in SD_POLICIES, self.sd


def _registry() -> dict:
    from . import bayesian, full, segmented

    methods = (segmented.METHOD, full.METHOD, bayesian.METHOD)
    return {m.name: m for m in methods}


#: Every method by name.
REGISTRY = _registry()
assert set(REGISTRY) == set(_DESCRIPTIONS), "every method of model.METHODS needs a module here"


def get(name: str) -> Method:
    """The registered method ``name`` (a ValueError that lists the valid names otherwise)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods are "
                         f"{', '.join(REGISTRY)}") from None


__all__ = ["FitRequest", "Method", "MethodOutput", "REGISTRY", "get"]
