"""dipy's own IVIM tests, run against ``fastivim.interop.dipy.IvimModel``.

The test module that ships with the installed dipy (``dipy/reconst/tests/test_ivim.py``) is
read, its import line ``from dipy.reconst.ivim import IvimModel, ivim_prediction`` is changed
to take ``IvimModel`` from fastivim (``ivim_prediction`` stays dipy's), and every one of its
test functions runs here, except the tests of dipy's internals listed in :data:`DIPY_INTERNAL`
with the reason. Nothing else of dipy's file is changed, so its 6-decimal comparisons of
noise-free parameters hold the adapter to the least-squares minimum in float64.

dipy is a test extra (``setup.cfg``); without it these tests are skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest

dipy = pytest.importorskip("dipy")

#: The import line of dipy's test module, and what it becomes.
DIPY_IMPORT = "from dipy.reconst.ivim import IvimModel, ivim_prediction"
OUR_IMPORT = ("from dipy.reconst.ivim import ivim_prediction\n"
              "from fastivim.interop.dipy import IvimModel")

#: dipy's tests of its own internals (not of the public API), left out with the reason.
DIPY_INTERNAL = {
    "test_estimate_linear_fit": "calls IvimModelTRR.estimate_linear_fit, an internal step of "
                                "dipy's TRR fit",
    "test_estimate_f_D_star": "calls IvimModelTRR.estimate_f_D_star, an internal step of "
                              "dipy's TRR fit",
    "test_fit_one_stage": "two_stage=False: expects the numbers of dipy's linear-only estimate",
    "test_leastsq_failing": "expects the warning texts of dipy's linear-fit fallbacks (fastivim "
                            "fits the noisy voxel without falling back)",
    "test_leastsq_error": "calls IvimModelTRR._leastsq, dipy's private scipy call",
    "test_noisy_fit": "counts the 3 warnings of dipy's linear-fit fallbacks",
    "test_perfusion_fraction_vp": "VarPro with cvxpy: dipy's own optimiser (decimal=2 against "
                                  "its own f_VP)",
    "test_D_star_vp": "VarPro with cvxpy: dipy's own optimiser",
    "test_D_vp": "VarPro with cvxpy: dipy's own optimiser",
}

#: dipy's file as of dipy 1.12 has 25 tests; 16 of them test the public API and must run.
N_TESTS, N_PUBLIC = 25, 16


def _dipy_test_source() -> str:
    spec = importlib.util.find_spec("dipy.reconst.tests.test_ivim")
    assert spec is not None and spec.origin, "dipy's test_ivim.py is not installed"
    with open(spec.origin, encoding="utf-8") as fh:
        return fh.read()


def _test_names(source: str) -> list:
    tree = ast.parse(source)
    return [n.name for n in tree.body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


SOURCE = _dipy_test_source()
NAMES = _test_names(SOURCE)
PUBLIC = [n for n in NAMES if n not in DIPY_INTERNAL]


@pytest.fixture(scope="module")
def dipy_tests():
    """dipy's test module with fastivim's IvimModel, its ``setup_module`` already run."""
    assert SOURCE.count(DIPY_IMPORT) == 1, "dipy's test file no longer imports IvimModel so"
    module = types.ModuleType("dipy_test_ivim_on_fastivim")
    module.__file__ = "dipy/reconst/tests/test_ivim.py (IvimModel from fastivim)"
    sys.modules[module.__name__] = module
    try:
        exec(compile(SOURCE.replace(DIPY_IMPORT, OUR_IMPORT), module.__file__, "exec"),
             module.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dipy's bounds notice, if any
            module.setup_module()
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


def test_dipy_test_file_is_the_expected_one():
    """25 tests, the listed internals among them, 16 public-API tests left to run."""
    assert len(NAMES) == N_TESTS, NAMES
    assert set(DIPY_INTERNAL) <= set(NAMES)
    assert len(PUBLIC) == N_PUBLIC


def test_the_substitution_took(dipy_tests):
    from fastivim.interop.dipy import IvimModel

    assert dipy_tests.IvimModel is IvimModel
    assert isinstance(dipy_tests.ivim_model_trr, IvimModel)


@pytest.mark.parametrize("name", NAMES)
def test_dipy_own_test(dipy_tests, name):
    """One of dipy's own tests, unchanged, on fastivim's IvimModel (internals: skipped)."""
    if name in DIPY_INTERNAL:
        pytest.skip(f"dipy internal: {DIPY_INTERNAL[name]}")
    getattr(dipy_tests, name)()


# ---------------------------------------------------------------- beyond dipy's own tests
B = np.array([0.0, 10, 20, 30, 40, 60, 80, 100, 120, 140, 160, 180, 200, 300, 400, 500, 600,
              700, 800, 900, 1000])


class _Bvals:
    """Not a dipy GradientTable: anything with ``.bvals`` will do."""

    def __init__(self, bvals):
        self.bvals = np.asarray(bvals, dtype=np.float64)


def test_float64_parameters_round_to_fit_voxels_maps():
    """The adapter's float64 parameters are the kernel's: rounded to float32 they equal
    ``fastivim.fit_voxels``' maps with the same method, bounds and threshold, voxel for
    voxel (noisy voxels, so minima lie anywhere)."""
    import fastivim
    from fastivim.interop.dipy import BOUNDS, IvimModel

    rng = np.random.default_rng(3)
    n = 300
    truth = np.column_stack([rng.uniform(500, 1500, n), rng.uniform(0.05, 0.3, n),
                             rng.uniform(0.01, 0.08, n), rng.uniform(5e-4, 2e-3, n)])
    Y = fastivim.ivim_signal(B, *truth.T) + rng.normal(0, 10, (n, B.size))
    fit = IvimModel(_Bvals(B)).fit(Y.reshape(10, 30, B.size))
    assert fit.model_params.dtype == np.float64 and fit.shape == (10, 30)
    bounds = {k: (BOUNDS[0][i], BOUNDS[1][i]) for i, k in enumerate(("S0", "f", "D_star", "D"))}
    ref = fastivim.fit_voxels(Y, B, method="full", bounds=bounds, b_threshold=400.0)
    ours = fit.model_params.reshape(n, 4)
    inside = np.ones(n, bool)
    for i, k in enumerate(("S0", "f", "D_star", "D")):
        inside &= (ours[:, i] > bounds[k][0]) & (ours[:, i] < bounds[k][1])
    assert inside.sum() > n // 2
    for i, k in enumerate(("S0", "f", "D_star", "D")):
        np.testing.assert_array_equal(ours[inside, i].astype(np.float32),
                                      getattr(ref, k)[inside], err_msg=k)
    assert np.array_equal(fit.status.reshape(n), ref.status)


def test_fit_methods_map_onto_fastivim_methods():
    from fastivim.interop.dipy import IvimModel

    assert IvimModel(_Bvals(B), fit_method="TRR").method == "full"
    assert IvimModel(_Bvals(B), fit_method="VarPro").method == "full"
    assert IvimModel(_Bvals(B), fit_method="segmented").method == "segmented"
    assert IvimModel(_Bvals(B), two_stage=False).method == "segmented"
    with pytest.warns(UserWarning, match="Using fit_method: TRR instead"):
        assert IvimModel(_Bvals(B), fit_method="nlls").method == "full"


def test_dipy_refusals():
    from fastivim.interop.dipy import IvimModel

    with pytest.raises(ValueError, match="No measured signal at bvalue == 0"):
        IvimModel(_Bvals(B + 5))
    gtab = _Bvals(B)
    gtab.b0_threshold = 50.0
    with pytest.raises(ValueError, match="b0_threshold larger than 0"):
        IvimModel(gtab)
    with pytest.raises(ValueError, match="4 numbers"):
        IvimModel(_Bvals(B), bounds=([0, 0, 0], [1, 1, 1]))
    with pytest.raises(ValueError, match="bounds\\['f'\\]"):
        IvimModel(_Bvals(B), bounds=([0, 0, 0, 0], [np.inf, 2.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        IvimModel(_Bvals(B), fit_mehtod="trr")
    model = IvimModel(_Bvals(B))
    with pytest.raises(ValueError, match="mask and data shape do not match"):
        model.fit(np.ones((2, 3, B.size)), mask=np.ones((3, 2), bool))
    with pytest.raises(ValueError, match="b-values along its last axis"):
        model.fit(np.ones((2, B.size + 1)))


def test_mask_zeros_and_failed_voxels_nan():
    """Outside the mask: zeros (dipy); an unfittable voxel inside: NaN and its status."""
    import fastivim
    from fastivim.interop.dipy import IvimModel
    from fastivim.kernels.status import BAD_INPUT

    y = fastivim.ivim_signal(B, 1000.0, 0.1, 0.02, 1e-3)
    data = np.stack([y, y, np.full(B.size, np.nan), y]).reshape(2, 2, B.size)
    mask = np.array([[True, False], [True, True]])
    fit = IvimModel(_Bvals(B)).fit(data, mask=mask)
    assert np.all(fit.model_params[0, 1] == 0)
    assert np.all(np.isnan(fit.model_params[1, 0]))
    assert fit.status[1, 0] == BAD_INPUT
    np.testing.assert_allclose(fit.model_params[1, 1], [1000.0, 0.1, 0.02, 1e-3], rtol=1e-9)
    np.testing.assert_allclose(fit.predict(_Bvals(B))[0, 0], y, rtol=1e-9)
    assert np.all(fit.predict(_Bvals(B))[0, 1] == 0)
    assert fit[1, 1].shape == () and fit[1].shape == (2,)


def test_fastivim_default_bounds_in_dipys_form():
    """The README's recipe for fastivim's default bounds in dipy's form gives exactly them."""
    import fastivim
    from fastivim.interop.dipy import IvimModel

    model = IvimModel(_Bvals(B), bounds=([0, 0, 0.002, 1e-4], [np.inf, 0.7, 0.1, 5e-3]))
    assert model._bounds == fastivim.DEFAULT_BOUNDS


def test_float_mask_nan_is_out():
    import fastivim
    from fastivim.interop.dipy import IvimModel

    y = fastivim.ivim_signal(B, 1000.0, 0.1, 0.02, 1e-3)
    fit = IvimModel(_Bvals(B)).fit(np.stack([y, y, y]), mask=np.array([1.0, np.nan, 0.0]))
    assert np.all(np.isfinite(fit.model_params[0]))
    assert np.all(fit.model_params[1:] == 0)
