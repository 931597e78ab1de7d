"""osipy's IVIM tutorial, run on ``fastivim.interop.osipy``.

The tutorial's complete example and its custom-bounds step (``tests/data/osipy``, vendored
verbatim from osipy's ``docs/tutorials/ivim-analysis.md``, see PROVENANCE.md there) run with
only their two import lines changed, on a simulated NIfTI from :mod:`fastivim.simulate`
named as the tutorial names it. Their maps must be exactly :func:`fastivim.fit_ivim`'s, and
the BIDS export must hold those maps.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

import fastivim

OSIPY_DIR = Path(__file__).resolve().parent / "data" / "osipy"
#: The two import lines the switch changes, and what they become.
SWITCH = [("import osipy\n", "import fastivim.interop.osipy as osipy\n"),
          ("from osipy.ivim import ", "from fastivim.interop.osipy.ivim import ")]
TUTORIAL_B = np.array([0, 10, 20, 50, 100, 200, 400, 800], dtype=np.float64)
CUSTOM_BOUNDS = {"D": (0.0005, 0.003), "D_star": (0.01, 0.05), "f": (0.0, 0.5)}


def _tutorial(name: str) -> str:
    """A vendored block with the two import lines switched (each must occur, once at most)."""
    text = (OSIPY_DIR / name).read_text(encoding="utf-8")
    for old, new in SWITCH:
        assert text.count(old) <= 1
        text = text.replace(old, new)
    assert not re.search(r"^\s*(import osipy|from osipy)", text, flags=re.M)  # nothing of osipy
    return text


def test_vendored_tutorial_is_osipys_text():
    pairs = re.findall(r"^([0-9a-f]{64})  (\S+)$",
                       (OSIPY_DIR / "PROVENANCE.md").read_text(encoding="utf-8"), flags=re.M)
    assert {n for _, n in pairs} == {"complete_example.py.txt", "custom_bounds.py.txt"}
    for digest, name in pairs:
        assert hashlib.sha256((OSIPY_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    """Run the complete example, then the custom-bounds step, in a folder holding
    ``dwi_multi_b.nii.gz``; return the example's namespace and the folder."""
    import contextlib
    import io
    import os

    from fastivim.io import write_phantom

    work = tmp_path_factory.mktemp("osipy_tutorial")
    ph = fastivim.simulate.phantom((10, 9, 3), b_values=TUTORIAL_B, snr=40.0, seed=7)
    write_phantom(work / "dwi_multi_b.nii.gz", ph)
    ns = {"__name__": "osipy_tutorial"}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_tutorial("complete_example.py.txt"), "complete_example", "exec"), ns)
            exec(compile(_tutorial("custom_bounds.py.txt"), "custom_bounds", "exec"), ns)
    finally:
        os.chdir(cwd)
    ns["_stdout"] = out.getvalue()
    return ns, work


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype


def test_complete_example_maps_are_fastivims(tutorial_run):
    ns, _ = tutorial_run
    ref = fastivim.fit_ivim(ns["dwi_dataset"].data, TUTORIAL_B, mask=ns["mask"],
                            method="segmented")
    _same(ns["D"], ref.D)
    _same(ns["D_star"], ref.D_star)
    _same(ns["f"], ref.f)
    _same(ns["result"].s0_map.values, ref.S0)
    _same(ns["result"].r_squared, ref.r_squared)
    _same(ns["valid"], ref.quality_mask)
    assert ns["valid"].sum() > 100  # the phantom's body is fitted
    assert "D mean: " in ns["_stdout"] and "f mean: " in ns["_stdout"]


def test_complete_example_exports_those_maps(tutorial_run):
    import nibabel as nib

    ns, work = tutorial_run
    folder = work / "derivatives" / "osipy" / "sub-01" / "ses-01" / "dwi"
    written = sorted(p.name for p in folder.iterdir())
    stem = "sub-01_ses-01_model-ivim_"
    assert written == sorted([stem + n for n in (
        "D.nii.gz", "D.json", "Dstar.nii.gz", "Dstar.json", "f.nii.gz", "f.json",
        "fastivim.json")])
    for suffix, key in (("D", "D"), ("Dstar", "D_star"), ("f", "f")):
        img = nib.load(folder / f"{stem}{suffix}.nii.gz")
        np.testing.assert_array_equal(np.asarray(img.dataobj), ns[key])
    assert (work / "derivatives" / "osipy" / "dataset_description.json").is_file()


def test_custom_bounds_step(tutorial_run):
    ns, _ = tutorial_run
    ref = fastivim.fit_ivim(ns["dwi_dataset"].data, TUTORIAL_B, mask=ns["mask"],
                            method="segmented", bounds=CUSTOM_BOUNDS)
    res = ns["custom_result"]
    _same(res.d_map.values, ref.D)
    _same(res.d_star_map.values, ref.D_star)
    _same(res.f_map.values, ref.f)
    fitted = np.isfinite(res.d_map.values)
    assert fitted.sum() > 100
    for key, values in (("D", res.d_map.values), ("D_star", res.d_star_map.values),
                        ("f", res.f_map.values)):
        lo, hi = CUSTOM_BOUNDS[key]
        assert np.all((values[fitted] >= lo) & (values[fitted] <= hi)), key
    # the bounds made a difference: the default fit has D* outside the custom range
    default = ns["result"].d_star_map.values
    assert np.any(default[fitted] > CUSTOM_BOUNDS["D_star"][1])


def test_osipy_conventions():
    """osipy's errors, the D* key, the method override and the BAYESIAN method."""
    import fastivim.interop.osipy as osipy
    from fastivim.interop.osipy.ivim import FittingError, FittingMethod, IVIMFitParams

    ph = fastivim.simulate.phantom((6, 5, 2), b_values=TUTORIAL_B, snr=40.0, seed=1)
    with pytest.raises(FittingError, match=r"Signal last dimension \(8\) != number of b-values"):
        osipy.fit_ivim(ph.signal, TUTORIAL_B[:-1])
    with pytest.raises(FittingError, match="at least 4 b-values"):
        osipy.fit_ivim(ph.signal[..., :3], TUTORIAL_B[:3])
    with pytest.raises(FittingError, match="unknown bounds key"):
        osipy.fit_ivim(ph.signal, TUTORIAL_B, params=IVIMFitParams(bounds={"Dp": (0, 1)}))
    with pytest.raises(FittingError, match="lower bound"):
        osipy.fit_ivim(ph.signal, TUTORIAL_B, params=IVIMFitParams(bounds={"f": (0.5, 0.1)}))
    params = IVIMFitParams(method=FittingMethod.SEGMENTED, bounds={"D*": (0.01, 0.05)})
    full = osipy.fit_ivim(ph.signal, TUTORIAL_B, params=params, method=FittingMethod.FULL)
    assert params.method is FittingMethod.SEGMENTED  # not changed by the override
    ref = fastivim.fit_ivim(ph.signal, TUTORIAL_B, method="full",
                            bounds={"D_star": (0.01, 0.05)})
    _same(full.d_star_map.values, ref.D_star)
    calls = []
    bayes = osipy.fit_ivim(ph.signal, TUTORIAL_B, method=FittingMethod.BAYESIAN,
                           progress_callback=calls.append)
    _same(bayes.f_map.values, fastivim.fit_ivim(ph.signal, TUTORIAL_B, method="bayesian").f)
    assert calls == [1.0]
    assert full.fitting_stats["n_voxels_total"] == 60


def test_export_metadata_and_refusals(tmp_path):
    import json

    import fastivim.interop.osipy as osipy

    ph = fastivim.simulate.phantom((6, 5, 2), b_values=TUTORIAL_B, snr=40.0, seed=1)
    res = osipy.fit_ivim(signal=ph.signal, b_values=TUTORIAL_B)
    folder = osipy.export_bids({"S0": res.s0_map}, tmp_path, "02", metadata={"site": "A"})
    assert folder == tmp_path / "sub-02" / "dwi"
    record = json.loads((folder / "sub-02_model-ivim_fastivim.json").read_text())
    assert record["metadata"] == {"site": "A"} and record["method"] == "segmented"
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == ["sub-02_model-ivim_S0.nii.gz"]
    # a second export into the same folder replaces the first, as osipy's does
    osipy.export_bids({"f": res.f_map}, tmp_path, "02")
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == ["sub-02_model-ivim_f.nii.gz"]
    other = osipy.fit_ivim(signal=ph.signal, b_values=TUTORIAL_B)
    with pytest.raises(ValueError, match="one fit_ivim result"):
        osipy.export_bids({"f": res.f_map, "D": other.d_map}, tmp_path, "03")
    with pytest.raises(ValueError, match="cannot be empty"):
        osipy.export_bids({}, tmp_path, "03")
    with pytest.raises(ValueError, match="letters and digits"):
        osipy.export_bids({"f": res.f_map}, tmp_path, "sub-03")
    assert not (tmp_path / "sub-03").exists()


def test_load_nifti(tmp_path):
    import fastivim.interop.osipy as osipy
    from fastivim.io import InputError, write_phantom

    ph = fastivim.simulate.phantom((4, 4, 2), b_values=TUTORIAL_B, snr=40.0, seed=2)
    write_phantom(tmp_path / "dwi.nii.gz", ph)
    ds = osipy.load_nifti(tmp_path / "dwi.nii.gz")
    assert ds.shape == (4, 4, 2, 8) and ds.affine.shape == (4, 4)
    np.testing.assert_array_equal(ds.data, ph.signal.astype(np.float32))
    with pytest.raises(InputError, match="no such image"):
        osipy.load_nifti(tmp_path / "missing.nii.gz")
