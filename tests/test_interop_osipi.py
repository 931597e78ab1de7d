"""The OSIPI TF2.4 front door: ``fastivim.interop.osipi.osipi_algorithm`` against the contract.

No OSIPI code is vendored. :class:`StandInOsipiBase` below is ours, written to the interface of
TF2.4's ``src/wrappers/OsipiBase.py`` (commit f91b53c) that a standardized algorithm relies
on: the constructor's defaults (bounds ``{"S0": [0.7, 1.3], "f": [0, 1], "Dp": [0.005, 0.2],
"D": [0, 0.005]}``, thresholds ``[200]``, kept as ``osipi_bounds``), loading an algorithm by
switching ``__class__`` and calling ``__init__(bvalues=, thresholds=, bounds=,
initial_guess=)``, ``osipi_fit`` (signals divided by their mean at the lowest b-value, then
``ivim_fit`` voxel by voxel, zeros where the first sample is NaN) and
``osipi_fit_full_volume``. The checks are those of TF2.4's unit tests
(``tests/IVIMmodels/unit_tests/test_ivim_fit.py``: ``test_ivim_fit_saved``, ``test_bounds``,
``test_default_bounds_and_initial_guesses``) on the OSIPI test vectors this repository vendors
(``tests/data/osipi``). The real suite, run as the README says, passes too.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import numpy.testing as npt
import pytest
from helpers import OSIPI_DIR

import fastivim
from fastivim.interop.osipi import normalise, osipi_algorithm

OSIPI_DEFAULT_BOUNDS = {"S0": [0.7, 1.3], "f": [0, 1.0], "Dp": [0.005, 0.2], "D": [0, 0.005]}
OSIPI_DEFAULT_GUESS = {"S0": 1, "f": 0.1, "Dp": 0.01, "D": 0.001}
#: OSIPI's default tolerances (test_ivim_fit.py: tolerances_helper).
RTOL = {"f": 0.1, "D": 0.1, "Dp": 0.1}
ATOL = {"f": 2e-1, "D": 5e-4, "Dp": 10e-2}


class StandInOsipiBase:
    """The parts of TF2.4's ``OsipiBase`` interface a standardized algorithm uses (ours)."""

    registry = {}

    def __init__(self, bvalues=None, thresholds=None, bounds=None, initial_guess=None,
                 algorithm=None, force_default_settings=True, **kwargs):
        self.bvalues = np.asarray(bvalues) if bvalues is not None else None
        self.thresholds = np.asarray(thresholds) if thresholds is not None else None
        self.bounds = bounds
        self.initial_guess = initial_guess
        self.use_bounds = {"f": False, "D": False, "Dp": False, "S0": False}
        self.use_initial_guess = {"f": False, "D": False, "Dp": False, "S0": False}
        self.deep_learning = self.supervised = self.stochastic = False
        if force_default_settings:
            if self.bounds is None:
                self.bounds = dict(OSIPI_DEFAULT_BOUNDS)
            if self.initial_guess is None:
                self.initial_guess = dict(OSIPI_DEFAULT_GUESS)
            if self.thresholds is None:
                self.thresholds = np.array([200])
        self.osipi_bounds = self.bounds
        self.osipi_initial_guess = self.initial_guess
        if algorithm:
            self.__class__ = self.registry[algorithm]
            self.__init__(bvalues=self.bvalues, thresholds=self.thresholds, bounds=self.bounds,
                          initial_guess=self.initial_guess, **kwargs)

    def osipi_fit(self, data, **kwargs):
        keys = getattr(self, "result_keys", ["f", "Dp", "D"])
        results = {k: np.empty(data.shape[:-1]) for k in keys}
        b0 = np.where(self.bvalues == np.min(self.bvalues))[0]
        data = data / np.mean(data[..., b0], axis=-1)[..., None]
        for ijk in np.ndindex(data.shape[:-1]):
            fit = (self.ivim_fit(data[ijk], **kwargs) if not np.isnan(data[ijk][0])
                   else {"D": 0, "f": 0, "Dp": 0})
            for k in fit:
                results[k][ijk] = fit[k]
        return results

    def osipi_fit_full_volume(self, data, **kwargs):
        return dict(self.ivim_fit_full_volume(data, **kwargs))


fastivim_full = osipi_algorithm(StandInOsipiBase, "full", "fastivim_full")
fastivim_segmented = osipi_algorithm(StandInOsipiBase, "segmented", "fastivim_segmented")
StandInOsipiBase.registry.update(fastivim_full=fastivim_full,
                                 fastivim_segmented=fastivim_segmented)
ALGORITHMS = ["fastivim_full", "fastivim_segmented"]

#: TF2.4's standardized-algorithm attributes and their types.
CONTRACT = {"id_author": str, "id_algorithm_type": str, "id_return_parameters": str,
            "id_units": str, "id_ref": str, "required_bvalues": int,
            "required_thresholds": list, "required_bounds": bool,
            "required_bounds_optional": bool, "required_initial_guess": bool,
            "required_initial_guess_optional": bool, "supported_bounds": bool,
            "supported_initial_guess": bool, "supported_thresholds": bool,
            "supported_dimensions": int, "supported_priors": bool}


def _generic():
    data = json.loads((OSIPI_DIR / "generic.json").read_text())
    b = np.asarray(data.pop("config")["bvalues"], dtype=np.float64)
    return b, data


B, TISSUES = _generic()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_class_contract(name):
    cls = StandInOsipiBase.registry[name]
    assert issubclass(cls, StandInOsipiBase) and cls.__name__ == name
    assert cls.__module__ == __name__  # picklable by reference (joblib, njobs > 1)
    for attr, kind in CONTRACT.items():
        assert isinstance(getattr(cls, attr), kind), attr
    assert callable(cls.ivim_fit) and callable(cls.ivim_fit_full_volume)
    fit = StandInOsipiBase(algorithm=name, bvalues=B)
    assert type(fit) is cls and fit.fastivim_method == name.split("_")[1]
    assert type(pickle.loads(pickle.dumps(fit))) is cls
    with pytest.raises(ValueError, match="unknown fastivim method"):
        osipi_algorithm(StandInOsipiBase, "bayes", "x")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_default_bounds_and_initial_guesses(name):
    """TF2.4's test_default_bounds_and_initial_guesses: bounds used and realistic."""
    fit = StandInOsipiBase(algorithm=name)
    assert all(fit.use_bounds.values()) and not any(fit.use_initial_guess.values())
    ob = fit.osipi_bounds
    assert 0 <= ob["D"][0] <= 0.003 and 0 <= ob["D"][1] <= 0.01
    assert 0.003 <= ob["Dp"][0] <= 0.05 and 0.003 <= ob["Dp"][1] <= 0.5
    assert ob["D"][1] <= ob["Dp"][0]


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("tissue", list(TISSUES))
def test_ivim_fit_saved(name, tissue):
    """TF2.4's test_ivim_fit_saved on OSIPI's generic.json, OSIPI's bounds and tolerances;
    and the numbers are fastivim's own (fit_voxels on the normalised signal)."""
    data = TISSUES[tissue]
    signal = np.asarray(data["data"], dtype=np.float64)
    signal = signal / signal[0]
    bounds = dict(OSIPI_DEFAULT_BOUNDS, Dp=[0.01, 0.2] if data["f"] == 0 else [0.005, 0.2])
    fit = StandInOsipiBase(algorithm=name, bvalues=B, bounds=bounds)
    res = fit.osipi_fit(signal)
    npt.assert_allclose(res["f"], data["f"], rtol=RTOL["f"], atol=ATOL["f"])
    if data["f"] < 0.80:
        npt.assert_allclose(res["D"], data["D"], rtol=RTOL["D"], atol=ATOL["D"])
    if data["f"] > 0.03:
        npt.assert_allclose(res["Dp"], data["Dp"], rtol=RTOL["Dp"], atol=ATOL["Dp"])
    ref = fastivim.fit_voxels(normalise(signal[None], B), B, method=fit.fastivim_method,
                              bounds={"S0": bounds["S0"], "f": bounds["f"],
                                      "D_star": bounds["Dp"], "D": bounds["D"]},
                              b_threshold=200.0)
    assert (res["f"], res["Dp"], res["D"]) == (ref.f[0], ref.D_star[0], ref.D[0])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_bounds_are_used(name):
    """TF2.4's test_bounds: deliberately silly bounds hold on every tissue."""
    bounds = {"S0": [1.1, 1.3], "f": [0.2, 0.3], "Dp": [0.01, 0.02], "D": [0.0008, 0.0012]}
    fit = StandInOsipiBase(algorithm=name, bvalues=B, bounds=bounds,
                           initial_guess={"S0": 1.2, "f": 0.25, "Dp": 0.015, "D": 0.001})
    for tissue, data in TISSUES.items():
        res = fit.osipi_fit(np.asarray(data["data"], dtype=np.float64))
        for key in ("f", "Dp", "D"):
            assert bounds[key][0] - 1e-10 <= res[key] <= bounds[key][1] + 1e-10, (tissue, key)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_full_volume_matches_voxel_by_voxel(name):
    """The full-volume fit equals osipi_fit's voxel-by-voxel results, whatever the signal
    scale (it normalises as osipi_fit does), and NaN voxels stay NaN."""
    Y = np.array([np.asarray(d["data"], dtype=np.float64) for d in TISSUES.values()])
    Y = (Y * 800.0).reshape(2, -1, B.size)
    Y[0, 0] = np.nan
    fit = StandInOsipiBase(algorithm=name, bvalues=B)
    vol = fit.osipi_fit_full_volume(Y)
    vox = fit.osipi_fit(Y)
    assert vol["D"].shape == Y.shape[:-1] and vol["D"].dtype == np.float64
    assert np.isnan(vol["D"][0, 0]) and vox["D"][0, 0] == 0  # osipi_fit's zeros
    for key in ("f", "Dp", "D"):
        npt.assert_array_equal(vol[key].ravel()[1:], vox[key].ravel()[1:])
    ref = fastivim.fit_ivim(normalise(Y, B), B, method=fit.fastivim_method,
                            bounds={"S0": (0.7, 1.3), "f": (0, 1.0), "D_star": (0.005, 0.2),
                                    "D": (0, 0.005)}, b_threshold=200.0)
    npt.assert_array_equal(vol["D"], ref.D.astype(np.float64))


def test_thresholds_are_b_threshold():
    """The first OSIPI threshold is fastivim's b_threshold (it changes the segmented fit)."""
    signal = np.asarray(next(iter(TISSUES.values()))["data"], dtype=np.float64)
    at200 = StandInOsipiBase(algorithm="fastivim_segmented", bvalues=B).ivim_fit(signal)
    at400 = StandInOsipiBase(algorithm="fastivim_segmented", bvalues=B,
                             thresholds=[400]).ivim_fit(signal)
    ref = fastivim.fit_voxels(normalise(signal[None], B), B, method="segmented",
                              bounds={"S0": (0.7, 1.3), "f": (0, 1.0), "D_star": (0.005, 0.2),
                                      "D": (0, 0.005)}, b_threshold=400.0)
    assert at400["D"] == ref.D[0] and at400["D"] != at200["D"]


def test_refusals():
    fit = StandInOsipiBase(algorithm="fastivim_full")  # no b-values: OSIPI allows it here
    with pytest.raises(ValueError, match="b-values must be provided"):
        fit.ivim_fit(np.ones(B.size))
    bad = StandInOsipiBase(algorithm="fastivim_full", bvalues=B, bounds={"Dstar": [0, 1]})
    with pytest.raises(ValueError, match="unknown bounds key 'Dstar'"):
        bad.ivim_fit(np.ones(B.size))
