"""The quality-control report (``fastivim.report``, extra ``fastivim[report]``)."""

from __future__ import annotations

import json
import struct
import sys
import warnings

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from click.testing import CliRunner  # noqa: E402

import fastivim  # noqa: E402
from fastivim import cli, io, report  # noqa: E402
from fastivim.kernels import status as st  # noqa: E402
from fastivim.simulate import phantom  # noqa: E402

SHAPE = (14, 12, 5)  #: the fitted fixture: ~600 voxels in the phantom, some failing
RUN_SHAPE = (10, 8, 3)  #: the NIfTI runs through io/cli


@pytest.fixture(scope="module")
def fitted():
    ph = phantom(SHAPE, snr=30, seed=3)
    res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask)
    return res, ph


def png_size(payload: bytes) -> tuple:
    """(width, height) from a PNG's IHDR; asserts the signature."""
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload[12:16] == b"IHDR"
    return struct.unpack(">II", payload[16:24])


def check_png(payload: bytes, fig=None, path=None):
    """A valid, non-blank PNG of the figure's size."""
    w, h = png_size(payload)
    if fig is not None:
        ew, eh = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
        assert (w, h) == (ew, eh)
    import io as _io

    import matplotlib.image as mimg

    img = mimg.imread(_io.BytesIO(payload), format="png")
    assert img.shape[:2] == (h, w)
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not a blank canvas
    assert len(np.unique((rgb[::7] * 255).astype(np.uint8), axis=0)) > 50  # real content


def labels(fig):
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
    return [t for t in out if t]


# --------------------------------------------------------------------------- figures

def test_maps_figure(fitted):
    res, _ = fitted
    fig = report.plot_maps(res)
    check_png(report.figure_png(fig), fig)
    text = labels(fig)
    for expected in ("D (×10⁻³ mm²/s)", "D* (×10⁻³ mm²/s)", "f (fraction)", "S0 (input units)",
                     "R² (unitless)", "quality mask"):
        assert expected in text, (expected, text)
    # 6 rows × n slices of images + 6 colour bars
    n = len(report.representative_slices(res))
    assert len(fig.axes) == 6 * n + 6


def test_maps_voxel_size_and_slices(fitted):
    res, _ = fitted
    fig = report.plot_maps(res, slices=[0, 4], voxel_size=(2.0, 4.0, 3.0), ranges={"f": (0, 1)})
    check_png(report.figure_png(fig), fig)
    assert fig.axes[0].images[0].get_array().shape == (SHAPE[1], SHAPE[0])  # y rows, x cols
    with pytest.raises(ValueError, match="slice 9"):
        report.plot_maps(res, slices=[9])


def test_single_slice_maps_are_a_grid_not_a_strip():
    ph = phantom((14, 12, 1), snr=30, seed=3)
    res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask)
    fig = report.plot_maps(res)
    w, h = png_size(report.figure_png(fig))
    assert 0.8 < w / h < 3, (w, h)  # was a 400×2160 strip
    assert fig.get_suptitle() == "Parameter maps: the single slice"
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 6 and {ax.get_title() for ax in images} >= {"D", "D*", "f", "quality"}
    assert "quality mask" in labels(fig)


def test_representative_slices_spread_over_fitted_voxels():
    res = fastivim.fit_ivim(np.zeros((4, 4, 20, 10)) + 1.0, fastivim.simulate.DEFAULT_B_VALUES,
                            mask=np.pad(np.ones((4, 4, 10), bool), ((0, 0), (0, 0), (5, 5))))
    z = report.representative_slices(res)
    assert z == report.representative_slices(res) and len(z) == 4
    assert all(5 <= k <= 14 for k in z) and z == sorted(set(z))
    assert report.representative_slices(res, n=50) == list(range(5, 15))


def test_histograms_figure(fitted):
    res, _ = fitted
    fig = report.plot_histograms(res)
    check_png(report.figure_png(fig), fig)
    text = labels(fig)
    for expected in ("D (×10⁻³ mm²/s)", "D* (×10⁻³ mm²/s)", "f (fraction)", "R² (unitless)"):
        assert expected in text
    assert text.count("voxels") == 4
    # the median is marked: a vertical line at the median of the quality-mask voxels
    med = float(np.median(res.D[res.quality_mask])) * 1e3
    xs = [ln.get_xdata()[0] for ln in fig.axes[0].lines]
    assert any(abs(x - med) < 1e-9 for x in xs)


def test_decay_figure_draws_the_model(fitted):
    res, ph = fitted
    fig = report.plot_decay(res, ph.signal, ph.b_values)
    check_png(report.figure_png(fig), fig)
    picks = report.sample_voxels(res)
    assert len(picks) == report.N_VOXELS
    n_checked = 0
    for sf, (voxel, _) in zip(fig.subfigs, picks, strict=False):
        ax_lin, ax_log = sf.axes
        assert ax_log.get_yscale() == "log" and ax_lin.get_yscale() == "linear"
        assert ax_lin.get_xlabel() == "b (s/mm²)" and "input units" in ax_lin.get_ylabel()
        measured, *fit = ax_lin.lines
        np.testing.assert_allclose(measured.get_ydata(), ph.signal[voxel])
        if fit:
            b, y = fit[0].get_data()
            expect = fastivim.ivim_signal(b, res.S0[voxel], res.f[voxel], res.D_star[voxel],
                                          res.D[voxel])
            np.testing.assert_allclose(y, expect, rtol=1e-12)
            assert f"D = {res.D[voxel] * 1e3:.3g}" in sf._suptitle.get_text()
            n_checked += 1
    assert n_checked >= 4


def test_sample_voxels_reproducible_and_mixed(fitted):
    res, _ = fitted
    a = report.sample_voxels(res, n=6, seed=0)
    assert a == report.sample_voxels(res, n=6, seed=0)
    assert len({v for v, _ in a}) == 6
    status = [int(res.status[v]) for v, _ in a]
    assert status[:4] == [st.OK] * 4 and all(s not in (st.OK, st.OUTSIDE_MASK)
                                             for s in status[4:])
    r2 = [float(res.r_squared[v]) for v, _ in a[:4]]
    assert r2 == sorted(r2)  # worst passing fit first
    assert all("percentile" in label for _, label in a[:4])


def test_sample_voxels_when_everything_passes_or_fails():
    ph = phantom(40, snr=None, seed=1)
    res = fastivim.fit_ivim(ph.signal, ph.b_values)
    res.status[:] = st.OK
    res.quality_mask[:] = True
    assert len(report.sample_voxels(res, n=5)) == 5
    res.status[:] = st.NO_CONVERGENCE
    res.quality_mask[:] = False
    picks = report.sample_voxels(res, n=5)
    assert len(picks) == 5 and all(label.startswith("failed") for _, label in picks)
    res.status[:] = st.OUTSIDE_MASK
    assert report.sample_voxels(res, n=5) == []


def test_decay_given_voxels_and_bad_signal(fitted):
    res, ph = fitted
    fig = report.plot_decay(res, ph.signal, voxels=[(7, 6, 2), (0, 0, 0)])
    check_png(report.figure_png(fig), fig)
    assert "outside the mask" in fig.subfigs[1]._suptitle.get_text()
    with pytest.raises(ValueError, match="does not match"):
        report.plot_decay(res, ph.signal[:, :, :2])
    with pytest.raises(ValueError, match="b-values"):
        report.plot_decay(res, ph.signal, ph.b_values[:5])


def test_figures_without_any_passing_voxel(fitted):
    res, ph = fitted
    import copy

    bad = copy.deepcopy(res)
    bad.quality_mask[:] = False
    bad.status[bad.status == st.OK] = st.NO_CONVERGENCE
    for fig in (report.plot_maps(bad), report.plot_histograms(bad),
                report.plot_decay(bad, ph.signal)):
        check_png(report.figure_png(fig), fig)


def test_summary_numbers(fitted):
    res, _ = fitted
    s = report.summary(res, record={"timings": {"fit": 0.5}, "input": "/x/dwi.nii.gz"})
    q = res.quality_mask
    np.testing.assert_allclose(s["stats"]["D"]["median"], np.median(res.D[q]))
    np.testing.assert_allclose(s["stats"]["f"]["q75"], np.percentile(res.f[q], 75))
    assert s["voxels"]["quality"] == int(q.sum())
    assert s["voxels"]["fitted"] == int((res.status != st.OUTSIDE_MASK).sum())
    assert s["timings"] == {"fit": 0.5} and s["method"] == "segmented"
    page = report.summary_html(s)
    for text in ("median", "IQR", "/x/dwi.nii.gz", "fit 0.50 s", "segmented", "800"):
        assert text in page


# ---------------------------------------------------------------------------- report

def test_make_report(fitted, tmp_path):
    res, ph = fitted
    out = report.make_report(res, ph.signal, ph.b_values, tmp_path / "qc")
    assert out == tmp_path / "qc" / "report.html"
    page = out.read_text(encoding="utf-8")
    for key in ("maps", "histograms", "decay"):
        name = report.REPORT_FILES[key]
        payload = (out.parent / name).read_bytes()
        check_png(payload)
        assert f'href="{name}"' in page
        import base64

        assert base64.b64encode(payload).decode() in page  # embedded: self-contained
    for text in ("Summary", "median", "quality mask", "b-values", "bounds", "0–3 ×10⁻³"):
        assert text in page
    # drawn again into the same folder: replaced, not refused; no stale decay figure left
    assert report.make_report(res, None, None, tmp_path / "qc") == out
    assert "Not drawn: the signal" in out.read_text(encoding="utf-8")
    assert not (tmp_path / "qc" / "report_decay.png").exists()


def test_make_report_without_signal_and_for_a_voxel_list(tmp_path):
    ph = phantom(30, snr=40, seed=2)
    res = fastivim.fit_voxels(ph.signal, ph.b_values, method="full")
    out = report.make_report(res, None, None, tmp_path)
    page = out.read_text(encoding="utf-8")
    assert "Not drawn: maps need 2 or 3" in page and "Not drawn: the signal" in page
    assert (tmp_path / "report_histograms.png").is_file()
    assert not (tmp_path / "report_maps.png").exists()
    out = report.make_report(res, ph.signal, ph.b_values, tmp_path / "b")
    check_png((tmp_path / "b" / "report_decay.png").read_bytes())


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    io.write_phantom(tmp_path / "dwi.nii.gz", phantom(RUN_SHAPE, snr=30, seed=4))
    return tmp_path


def test_cli_run_with_report(run_dir):
    r = CliRunner().invoke(cli.main, ["run", "dwi.nii.gz", "-q", "-o", "out", "--report"])
    assert r.exit_code == 0, r.output
    html = run_dir / "out" / "report.html"
    assert "report: " in r.output and html.is_file()
    page = html.read_text(encoding="utf-8")
    for name in ("report_maps.png", "report_histograms.png", "report_decay.png"):
        check_png((run_dir / "out" / name).read_bytes())
        assert name in page
    assert str(run_dir / "dwi.nii.gz") in page  # the input, from fastivim.json
    assert "run timings" in page
    html.write_text("stale")  # a re-run must rewrite it (content, not mtime: coarse clocks)
    r = CliRunner().invoke(cli.main, ["report", "out"])
    assert r.exit_code == 0, r.output
    again = html.read_text(encoding="utf-8")
    assert again != "stale" and all(name in again for name in ("report_maps.png",
                                                              "report_decay.png"))


def test_report_from_output_round_trip(run_dir):
    io.fit_file(run_dir / "dwi.nii.gz", out_dir=run_dir / "out")
    res, record, zooms = report.load_output(run_dir / "out")
    assert res.shape == RUN_SHAPE and zooms == (2.0, 2.0, 3.0)
    assert res.quality_mask.dtype == bool and res.status.dtype == np.uint8
    assert res.bounds["S0"][1] == np.inf and record["method"] == "segmented"
    # the input moved away: the report still comes, without the decay figure
    (run_dir / "dwi.nii.gz").rename(run_dir / "moved.nii.gz")
    with pytest.warns(UserWarning, match="no signal-decay figure"):
        out = report.report_from_output(run_dir / "out")
    assert "Not drawn: the signal" in out.read_text(encoding="utf-8")
    # ... or is given explicitly
    (run_dir / "moved.bval").write_text((run_dir / "dwi.bval").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = report.report_from_output(run_dir / "out", dwi=run_dir / "moved.nii.gz")
    assert "Not drawn" not in out.read_text(encoding="utf-8")


def test_report_from_output_errors(tmp_path):
    with pytest.raises(ValueError, match="fastivim.json"):
        report.report_from_output(tmp_path)
    (tmp_path / "fastivim.json").write_text("{}")
    with pytest.raises(ValueError, match="fastivim.json: malformed run record: no 'manifest'"):
        report.report_from_output(tmp_path)
    (tmp_path / "fastivim.json").write_text('{"manifest": {}}')
    with pytest.raises(ValueError, match="D.nii.gz: not listed in fastivim.json's manifest"):
        report.report_from_output(tmp_path)
    entry = {"bytes": 3, "sha256": "0" * 64}
    (tmp_path / "fastivim.json").write_text(json.dumps({"manifest": {"D.nii.gz": entry}}))
    with pytest.raises(ValueError, match="D.nii.gz: listed in fastivim.json but missing"):
        report.report_from_output(tmp_path)


def test_missing_matplotlib(fitted, run_dir, monkeypatch):
    io.fit_file(run_dir / "dwi.nii.gz", out_dir=run_dir / "out")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res, ph = fitted
    with pytest.raises(ImportError, match=r"pip install fastivim\[report\]"):
        report.plot_histograms(res)
    with pytest.raises(ImportError, match=r"pip install fastivim\[report\]"):
        report.make_report(res, ph.signal, ph.b_values, run_dir / "qc")
    assert not (run_dir / "qc").exists()
    r = CliRunner().invoke(cli.main, ["report", "out"])
    assert r.exit_code == 1 and "pip install fastivim[report]" in r.output
    # one clean line: what is missing, why, and the one install command
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: the report needs matplotlib (")
    assert lines[0].count("pip install") == 1 and lines[0].count("needs") == 1
    assert not (run_dir / "out" / "report.html").exists()
    # what needs no drawing still works
    assert report.summary(res)["voxels"]["quality"] == int(res.quality_mask.sum())


def test_large_volume_is_sampled_not_looped(tmp_path, monkeypatch):
    """A 128×128×30 result (fake maps, no fit): the report samples voxels, never loops over all.

    Checked by counting the model evaluations the decay figure makes (not by timing, which
    depends on the machine): they must stay a small, volume-independent number of voxels.
    """
    rng = np.random.default_rng(0)
    shape = (128, 128, 30)
    b = fastivim.simulate.DEFAULT_B_VALUES
    mask = np.zeros(shape, bool)
    mask[16:112, 16:112, 2:28] = True
    n = int(mask.sum())
    maps = {k: np.full(shape, np.nan, np.float32) for k in ("D", "D_star", "f", "S0",
                                                           "r_squared", "rmse")}
    truth = {"D": rng.uniform(0.5e-3, 2e-3, n), "D_star": rng.uniform(1e-2, 8e-2, n),
             "f": rng.uniform(0.05, 0.3, n), "S0": np.full(n, 1000.0)}
    for k, v in truth.items():
        maps[k][mask] = v
    maps["r_squared"][mask] = rng.uniform(0.8, 1.0, n)
    maps["rmse"][mask] = 10.0
    status = np.full(shape, st.OUTSIDE_MASK, np.uint8)
    status[mask] = np.where(rng.random(n) < 0.9, st.OK, st.AT_BOUND)
    res = fastivim.IVIMResult(quality_mask=status == st.OK, status=status, method="full",
                              bounds=fastivim.resolve_bounds(), b_values=b, **maps)
    signal = np.zeros(shape + (b.size,), np.float32)
    signal[mask] = fastivim.ivim_signal(b, truth["S0"], truth["f"], truth["D_star"], truth["D"])
    evaluated = []
    real = report.ivim_signal

    def counting(b_values, *params):
        out = real(b_values, *params)
        evaluated.append(out.size // np.size(b_values))
        return out

    monkeypatch.setattr(report, "ivim_signal", counting)
    report.make_report(res, signal, b, tmp_path)
    assert (tmp_path / "report.html").exists()
    assert 0 < sum(evaluated) <= 100, f"{sum(evaluated)} model curves for {n} voxels"


def test_report_on_a_bids_series(run_dir):
    r = CliRunner().invoke(cli.main, ["run", "dwi.nii.gz", "-q", "--bids", "deriv",
                                      "--subject", "01", "--report"])
    assert r.exit_code == 0, r.output
    d = run_dir / "deriv" / "sub-01" / "dwi"
    page = d / "sub-01_model-ivim_report.html"
    assert page.is_file() and "report: deriv/sub-01/dwi/sub-01_model-ivim_report.html" in r.output
    for name in ("maps", "histograms", "decay"):
        check_png((d / f"sub-01_model-ivim_report_{name}.png").read_bytes())
    page.unlink()
    for target in (d, d / "sub-01_model-ivim_fastivim.json"):  # the folder or its record
        r = CliRunner().invoke(cli.main, ["report", str(target)])
        assert r.exit_code == 0, r.output
        assert str(run_dir / "dwi.nii.gz") in page.read_text(encoding="utf-8")
        page.unlink()
