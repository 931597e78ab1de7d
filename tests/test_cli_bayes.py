"""The command line, config files, BIDS output and the report for the bayesian method, the
uncertainty maps and the simplified model."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import fastivim
from fastivim import cli, io
from fastivim.simulate import tissue_phantom

SD_NAMES = ("D_sd", "D_star_sd", "f_sd", "S0_sd")


@pytest.fixture(scope="module")
def ph():
    return tissue_phantom((24, 24, 2), snr=30, seed=4)


@pytest.fixture()
def work(tmp_path, ph, monkeypatch):
    io.write_phantom(tmp_path / "dwi.nii.gz", ph)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _map(folder, name):
    return np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj)


def test_run_bayesian_writes_the_maps_of_fit_ivim_and_their_sd(work, ph):
    r = invoke("run", "dwi.nii.gz", "--method", "bayesian", "--no-mask", "--seed", "3", "-q")
    assert r.exit_code == 0, r.output
    out = work / "dwi_ivim"
    want = fastivim.fit_ivim(ph.signal, ph.b_values, method="bayesian", seed=3)
    for name in ("D", "D_star", "f", "S0") + SD_NAMES:
        np.testing.assert_array_equal(_map(out, name), getattr(want, name), name)
        side = json.loads((out / f"{name}.json").read_text())
        assert side["FittingMethod"] == "bayesian"
    assert json.loads((out / "D_sd.json").read_text())["Units"] == "mm^2/s"
    rec = json.loads((out / "fastivim.json").read_text())
    assert rec["method"] == "bayesian" and rec["seed"] == 3 and rec["model"] == "ivim"
    assert rec["prior"] == want.prior == "empirical"
    assert rec["noise_sigma"] == pytest.approx(want.noise_sigma)


@pytest.mark.parametrize("method", ["full", "segmented"])
def test_uncertainty_flag_adds_sd_maps_only_when_asked(work, method):
    r = invoke("run", "dwi.nii.gz", "--method", method, "-q")
    assert r.exit_code == 0, r.output
    assert not any((work / "dwi_ivim" / f"{n}.nii.gz").exists() for n in SD_NAMES)
    r = invoke("run", "dwi.nii.gz", "--method", method, "--uncertainty", "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    out = work / "dwi_ivim"
    q = _map(out, "quality_mask") > 0
    for n in SD_NAMES:
        sd = _map(out, n)
        assert sd.dtype == np.float32 and np.all(np.isfinite(sd[q])), n
    assert json.loads((out / "fastivim.json").read_text())["uncertainty"] is True


def test_config_keys_and_bids_names(work):
    (work / "c.yaml").write_text("model: simplified\nuncertainty: true\nmethod: full\n")
    # a 3-b protocol (enough for the simplified model) with b = 0 twice: 4 samples for 3
    # parameters, one residual degree of freedom for the SDs
    b4 = np.array([0.0, 0.0, 400.0, 800.0])
    rng = np.random.default_rng(3)
    sig = fastivim.ivim_signal(b4, 1000.0, 0.15, 0.05, 1.2e-3) * np.ones((4, 4, 2, 1))
    sig = sig + rng.normal(0, 2.0, sig.shape)
    img = nib.Nifti1Image(sig.astype(np.float32), np.eye(4))
    nib.save(img, work / "small.nii.gz")
    (work / "small.bval").write_text("0 0 400 800\n")
    r = invoke("run", "--config", "c.yaml", "small.nii.gz", "--bids", "deriv", "--subject",
               "01", "--no-mask", "-q")
    assert r.exit_code == 0, r.output
    d = work / "deriv" / "sub-01" / "dwi"
    names = sorted(p.name for p in d.iterdir())
    assert "sub-01_model-ivim_Dsd.nii.gz" in names and "sub-01_model-ivim_fsd.json" in names
    assert "sub-01_model-ivim_S0sd.nii.gz" in names
    for suffix in ("Dsd", "fsd", "S0sd"):  # maps that exist are filled, not NaN
        sd = np.asarray(nib.load(d / f"sub-01_model-ivim_{suffix}.nii.gz").dataobj)
        assert np.all(np.isfinite(sd)) and np.all(sd > 0), suffix
    assert not any("Dstar" in n for n in names)  # the simplified model has no D_star at all
    f = np.asarray(nib.load(d / "sub-01_model-ivim_f.nii.gz").dataobj)
    assert np.allclose(f, 0.15, atol=0.02)
    side = json.loads((d / "sub-01_model-ivim_D.json").read_text())
    assert side["Model"].startswith("S(0) = S0; S(b) = S0 * (1 - f)")
    # the same b-values are refused for the bi-exponential model, naming the file
    r = invoke("run", "small.nii.gz", "-q", "-o", "x")
    assert r.exit_code == 1 and "small.bval" in r.stderr and "at least 4 distinct" in r.stderr


def test_bayesian_simplified_is_a_usage_error(work):
    r = invoke("run", "dwi.nii.gz", "--method", "bayesian", "--model", "simplified", "-q")
    assert r.exit_code == 2 and "bayesian method fits the ivim model only" in r.output


def test_report_shows_sd_maps_and_simplified_fits(work):
    pytest.importorskip("matplotlib")
    from fastivim import report

    r = invoke("run", "dwi.nii.gz", "--method", "bayesian", "-q", "--report")
    assert r.exit_code == 0, r.output
    from fastivim.io.read import load_output

    res, rec, _, _ = load_output(work / "dwi_ivim")  # the report reads the maps back
    assert res.prior == "empirical" and res.D_sd is not None
    assert report.map_rows(res)[-4:] == SD_NAMES
    page = (work / "dwi_ivim" / "report.html").read_text()
    assert "bayesian" in page and "empirical prior" in page and "SD of D" in page
    r = invoke("run", "dwi.nii.gz", "--model", "simplified", "-q", "--report", "-o", "s")
    assert r.exit_code == 0, r.output
    page = (work / "s" / "report.html").read_text()
    assert "simplified model" in page
    # its captions describe the simplified model, not the bi-exponential one
    assert "S0 (1 − f) e<sup>−b D</sup>" in page and "f e<sup>−b D*</sup>" not in page


def test_uncertainty_without_residual_degrees_of_freedom_is_refused(work):
    """SD maps from sigma² = SSR / (n - k) need n > k samples: with exactly k, every SD would be
    NaN (the maps were written empty before); the run is refused up front, naming the file."""
    b3 = np.array([0.0, 400.0, 800.0])
    sig = fastivim.ivim_signal(b3, 1000.0, 0.15, 0.05, 1.2e-3) * np.ones((4, 4, 2, 1))
    nib.save(nib.Nifti1Image(sig.astype(np.float32), np.eye(4)), work / "three.nii.gz")
    (work / "three.bval").write_text("0 400 800\n")
    r = invoke("run", "three.nii.gz", "--model", "simplified", "--uncertainty", "--no-mask",
               "-q", "-o", "t")
    assert r.exit_code == 1 and "three.bval" in r.stderr and "degree of freedom" in r.stderr
    assert not (work / "t").exists()
    r = invoke("run", "three.nii.gz", "--model", "simplified", "--no-mask", "-q", "-o", "t")
    assert r.exit_code == 0, r.output  # without SDs the same protocol is fine
    b = [0.0, 50.0, 400.0, 800.0]
    with pytest.raises(ValueError, match="degree of freedom"):
        fastivim.fit_voxels(np.ones((2, 4)), b, method="full", uncertainty=True)


def test_fit_file_takes_the_new_options(work):
    """``io.fit_file`` is "the whole fastivim run" in Python: model, uncertainty and seed too."""
    from fastivim import io

    rec = io.fit_file("dwi.nii.gz", out_dir="ff", uncertainty=True, method="full", seed=3)
    assert rec["uncertainty"] is True and (work / "ff" / "D_sd.nii.gz").is_file()
    rec = io.fit_file("dwi.nii.gz", out_dir="fs", model="simplified")
    assert rec["model"] == "simplified" and not (work / "fs" / "D_star.nii.gz").exists()
