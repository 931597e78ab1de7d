"""The ADC maps: mono-exponential fits over all b-values (``ADC``) and over the b-values at or
above b_threshold (``ADC_high``), in the API, the outputs (plain and BIDS) and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import fastivim
from fastivim import cli, io
from fastivim.adc import adc_columns
from fastivim.simulate import DEFAULT_B_VALUES, phantom

B = np.asarray(DEFAULT_B_VALUES, dtype=np.float64)


def _loglinear(y, b):
    """Reference: numpy's polyfit of log S on b (slope = -ADC)."""
    return -np.polyfit(b, np.log(y), 1)[0]


def test_a_mono_exponential_signal_gives_its_adc_from_both_ranges():
    adc = np.array([0.4e-3, 1.1e-3, 2.9e-3])
    Y = 800.0 * np.exp(-np.outer(adc, B))
    cols = adc_columns(Y.astype(np.float32), B, 200.0)
    np.testing.assert_allclose(cols[0], adc, rtol=2e-5)
    np.testing.assert_allclose(cols[1], adc, rtol=2e-5)


def test_adc_over_all_b_includes_perfusion_and_adc_high_does_not():
    """On an IVIM signal ADC (all b) exceeds D; ADC_high (b >= threshold) is the log-linear
    fit of the high-b samples only, as numpy.polyfit computes it."""
    y = fastivim.ivim_signal(B, 1000.0, 0.2, 0.03, 1.0e-3)
    cols = adc_columns(y[None, :], B, 200.0)
    assert cols[0, 0] > 1.15e-3  # D is 1.0e-3
    np.testing.assert_allclose(cols[0, 0], _loglinear(y, B), rtol=1e-5)
    high = B >= 200.0
    np.testing.assert_allclose(cols[1, 0], _loglinear(y[high], B[high]), rtol=1e-5)
    assert abs(cols[1, 0] - 1.0e-3) < 0.1e-3


def test_a_non_positive_or_missing_sample_makes_the_voxel_nan_and_only_it():
    Y = np.tile(900.0 * np.exp(-B * 1e-3), (4, 1))
    Y[1, 0] = 0.0  # b = 0 is used by ADC only
    Y[2, -1] = -3.0  # b = 800: both
    Y[3, 4] = np.nan  # b = 50: ADC only
    cols = adc_columns(Y, B, 200.0)
    assert np.isfinite(cols[:, 0]).all()
    assert np.isnan(cols[0, 1]) and np.isfinite(cols[1, 1])
    assert np.isnan(cols[:, 2]).all()
    assert np.isnan(cols[0, 3]) and np.isfinite(cols[1, 3])


def test_too_few_high_b_values_give_a_nan_adc_high():
    b = np.array([0, 10, 50, 100, 800.0])
    y = 500.0 * np.exp(-b * 1e-3)
    cols = adc_columns(y[None, :], b, 200.0)
    assert np.isfinite(cols[0, 0]) and np.isnan(cols[1, 0])


@pytest.mark.parametrize("method", ["segmented", "full", "bayesian"])
def test_every_fit_has_the_adc_maps_nan_outside_the_mask(method):
    ph = phantom((6, 5, 2), snr=40, seed=3)
    mask = ph.mask
    res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=mask, method=method)
    for name in ("ADC", "ADC_high"):
        m = getattr(res, name)
        assert m.shape == mask.shape and m.dtype == np.float32
        assert np.isnan(m[~mask]).all() and np.isfinite(m[mask]).all()
    cols = adc_columns(ph.signal[mask], ph.b_values, res.b_threshold)
    np.testing.assert_array_equal(res.ADC[mask], cols[0])
    assert "ADC" in res.summary()["stats"]


def test_adc_is_asked_for_in_fit_voxels_and_on_by_default_in_fit_ivim():
    ph = phantom((50,), snr=40, seed=5)
    assert fastivim.fit_voxels(ph.signal, ph.b_values).ADC is None
    vox = fastivim.fit_voxels(ph.signal, ph.b_values, adc=True)
    np.testing.assert_array_equal(vox.ADC, adc_columns(ph.signal, ph.b_values, 200.0)[0])
    assert fastivim.fit_ivim(ph.signal, ph.b_values, adc=False).ADC_high is None


def test_outputs_sidecars_bids_names_and_report_hold_the_adc(tmp_path, monkeypatch):
    ph = phantom((8, 8, 2), snr=40, seed=4)
    io.write_phantom(tmp_path / "dwi.nii.gz", ph)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.main, ["run", "dwi.nii.gz", "-o", "out", "--bids", "deriv",
                                      "--subject", "01", "-q"])
    assert r.exit_code == 0, r.output
    assert "ADC    [1e-3 mm²/s]" in r.stdout
    for name in ("ADC", "ADC_high"):
        side = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert side["Units"] == "mm^2/s"
        assert ("all b-values" if name == "ADC" else "b_threshold") in side["Description"]
        assert side["Model"] == "S(b) = S0 * exp(-b * ADC)"
    bids = sorted(p.name for p in (tmp_path / "deriv").rglob("*.nii.gz"))
    assert any(n.endswith("_ADC.nii.gz") for n in bids), bids
    assert any(n.endswith("_ADChigh.nii.gz") for n in bids), bids
    res = io.load_output(tmp_path / "out")[0]
    assert np.isfinite(res.ADC).any() and np.isfinite(res.ADC_high).any()
    rec = json.loads((tmp_path / "out" / "fastivim.json").read_text())
    assert rec["stats"]["ADC"]["median"] > rec["stats"]["ADC_high"]["median"] > 0
    from fastivim import report

    page = report.report_from_output(tmp_path / "out").read_text(encoding="utf-8")
    assert "ADC" in page
