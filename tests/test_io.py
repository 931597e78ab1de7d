"""fastivim.io and fastivim.pipeline: reading DWI series, masks, writing maps, BIDS, one run."""

import json

import nibabel as nib
import numpy as np
import pytest

import fastivim
from fastivim import io, pipeline
from fastivim.io import write as io_write
from fastivim.simulate import phantom

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=float)
AFFINE = np.array([[-2.0, 0.1, 0, 30], [0, 2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def write_nifti(path, data, affine=AFFINE, klass=nib.Nifti1Image, qcode=1, scode=2,
                dtype=None, slope=None, inter=None):
    img = klass(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def clean_phantom():
    return phantom((10, 10, 3), snr=None, seed=3)


@pytest.fixture()
def dwi_file(tmp_path, clean_phantom):
    p = write_nifti(tmp_path / "sub-01_dwi.nii.gz", clean_phantom.signal)
    (tmp_path / "sub-01_dwi.bval").write_text(" ".join(f"{b:g}" for b in B) + "\n")
    return p


# ------------------------------------------------------------------------------- reading

def test_load_dwi_uses_bval_sidecar(dwi_file, clean_phantom):
    d = io.load_dwi(dwi_file)
    assert d.bvals_from_sidecar and d.bvals_path.name == "sub-01_dwi.bval"
    np.testing.assert_array_equal(d.b_values, B)
    np.testing.assert_array_equal(d.data, clean_phantom.signal)
    assert d.data.dtype == np.float32


def test_load_dwi_one_value_per_line_and_bvecs(dwi_file, tmp_path):
    (tmp_path / "b.txt").write_text("\n".join(f"{b:g}" for b in B) + "\n")
    vec = np.tile([[1.0], [0.0], [0.0]], (1, B.size))
    np.savetxt(tmp_path / "b.bvec", vec)
    d = io.load_dwi(dwi_file, bvals=tmp_path / "b.txt", bvecs=tmp_path / "b.bvec")
    assert not d.bvals_from_sidecar
    np.testing.assert_array_equal(d.b_values, B)
    assert d.bvecs.shape == (B.size, 3)


def test_load_dwi_applies_scaling(tmp_path):
    raw = np.arange(4 * 3 * 2 * 10, dtype=np.int16).reshape(4, 3, 2, 10)
    p = write_nifti(tmp_path / "s.nii", raw, dtype=np.int16, slope=2.0, inter=10.0)
    d = io.load_dwi(p, bvals=B)
    np.testing.assert_allclose(d.data, raw * 2.0 + 10.0)
    assert d.data.dtype == np.float32  # scaled integers: float32, as documented (not float64)
    unscaled = io.load_dwi(write_nifti(tmp_path / "u.nii", raw, dtype=np.int16), bvals=B)
    assert unscaled.data.dtype == np.int16  # unscaled small integers come back as stored


def test_load_dwi_nifti2(tmp_path, clean_phantom):
    p = write_nifti(tmp_path / "n2.nii.gz", clean_phantom.signal, klass=nib.Nifti2Image)
    d = io.load_dwi(p, bvals=B)
    assert isinstance(d.img, nib.Nifti2Image)
    res = fastivim.fit_ivim(d.data, d.b_values)
    io.save_maps(res, tmp_path / "out", d.img)
    out = nib.load(tmp_path / "out" / "D.nii.gz")
    assert isinstance(out, nib.Nifti2Image)
    np.testing.assert_array_equal(out.affine, d.img.affine)


@pytest.mark.parametrize("bvals, message", [
    ("0 10 20 abc 100 200 400 800 900 1000", "'abc' is not a number"),
    ("0 10 20 30 100 200 400 800 900 -5", "must be >= 0"),
    ("0 10 20 30 100 200 400 800 900 nan", "NaN"),
    ("0 0 0 0 0 800 800 800 800 800", "at least 4 distinct"),
    ("0 10 20 30 50 80 100 200", "8 b-values given but the signal has 10 samples"),
    ("0 10 20 30 50\n80 100 200 400 800", "one row of b-values or one value per line"),
    ("", "b-value file is empty"),
])
def test_bad_bvals(dwi_file, tmp_path, bvals, message):
    f = tmp_path / "bad.bval"
    f.write_text(bvals)
    with pytest.raises(io.InputError, match=message) as err:
        io.load_dwi(dwi_file, bvals=f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_bad_images(tmp_path):
    with pytest.raises(io.InputError, match="no such image"):
        io.load_dwi(tmp_path / "missing.nii.gz", bvals=B)
    (tmp_path / "adir.nii").mkdir()
    with pytest.raises(io.InputError, match="adir.nii: is a directory, expected an image"):
        io.load_dwi(tmp_path / "adir.nii", bvals=B)
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(io.InputError, match="text.nii.gz: not a NIfTI file"):
        io.load_dwi(tmp_path / "text.nii.gz", bvals=B)
    (tmp_path / "x.mgz").write_bytes(b"")
    with pytest.raises(io.InputError, match=r"not a NIfTI file \(expected a .nii"):
        io.load_dwi(tmp_path / "x.mgz", bvals=B)
    p3 = write_nifti(tmp_path / "vol.nii", np.ones((4, 4, 4), np.float32))
    with pytest.raises(io.InputError, match=r"vol.nii: a 3D image \(4×4×4\)"):
        io.load_dwi(p3, bvals=B)
    p4 = write_nifti(tmp_path / "nob.nii", np.ones((2, 2, 2, 10), np.float32))
    with pytest.raises(io.InputError, match="no b-values: pass --bvals FILE or put nob.bval"):
        io.load_dwi(p4)


def test_truncated_gzip_is_a_clean_error(dwi_file, tmp_path):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(dwi_file.read_bytes()[:2000])
    with pytest.raises(io.InputError, match="cut.nii.gz: ") as err:
        io.load_dwi(cut, bvals=B)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------- masks

def test_auto_mask_finds_the_phantom():
    ph = phantom((24, 24, 3), snr=30, seed=1)
    mask, thr = io.auto_mask(ph.signal, ph.b_values)
    assert 0 < thr < 1000
    agree = np.mean(mask == ph.mask)
    assert agree > 0.98, agree


def test_auto_mask_uses_mean_of_lowest_b_volumes():
    data = np.zeros((3, 1, 1, 5), np.float32)
    data[0, 0, 0] = [10, 0, 5, 5, 5]  # two b=0 volumes: mean 5
    data[1, 0, 0] = [100, 100, 5, 5, 5]
    mask, thr = io.auto_mask(data, np.array([0, 0, 10, 20, 30]), fraction=0.1)
    assert thr == pytest.approx(0.1 * np.percentile([5, 100, 0], 99))
    assert mask.tolist() == [[[False]], [[True]], [[False]]]


def test_load_mask(dwi_file, tmp_path, clean_phantom):
    ref = nib.load(dwi_file)
    m = write_nifti(tmp_path / "m.nii.gz", clean_phantom.mask.astype(np.float32) * 0.5)
    np.testing.assert_array_equal(io.load_mask(m, ref), clean_phantom.mask)
    other = write_nifti(tmp_path / "g.nii.gz", np.ones((10, 10, 4), np.uint8))
    with pytest.raises(io.InputError, match=r"g.nii.gz: mask grid 10×10×4 does not match .*×3"):
        io.load_mask(other, ref)
    shifted = write_nifti(tmp_path / "a.nii.gz", np.ones((10, 10, 3), np.uint8), affine=np.eye(4))
    with pytest.raises(io.InputError, match="a.nii.gz: mask affine differs"):
        io.load_mask(shifted, ref)
    empty = write_nifti(tmp_path / "e.nii.gz", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(io.InputError, match="e.nii.gz: mask is empty"):
        io.load_mask(empty, ref)


# ------------------------------------------------------------------------------- writing

def test_save_maps_overlays_input_exactly(dwi_file, tmp_path):
    d = io.load_dwi(dwi_file)
    res = fastivim.fit_ivim(d.data, d.b_values, method="full", uncertainty=True)
    files = io.save_maps(res, tmp_path / "maps", d.img)
    names = sorted(p.name for p in files)
    # the default maps, and the uncertainty maps asked for (D_sd.nii.gz + D_sd.json, ...)
    sd_files = [f"{m.name}{ext}" for m in io.MAPS if m.optional for ext in (".nii.gz", ".json")]
    assert len(sd_files) == 8
    assert names == sorted([p.name for p in io.map_paths(tmp_path / "maps")] + sd_files)
    for spec in io.MAPS:
        img = nib.load(tmp_path / "maps" / f"{spec.name}.nii.gz")
        assert img.shape == d.spatial_shape
        np.testing.assert_array_equal(img.affine, d.img.affine)
        np.testing.assert_array_equal(img.get_qform(), d.img.get_qform())
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
        assert img.header.get_xyzt_units()[0] == "mm"
        assert img.get_data_dtype() == np.dtype(spec.dtype)
        got = np.asanyarray(img.dataobj)
        want = getattr(res, spec.attr).astype(spec.dtype)
        np.testing.assert_array_equal(got, want)
        side = json.loads((tmp_path / "maps" / f"{spec.name}.json").read_text())
        assert side["Units"] == spec.units
        # the ADC maps are mono-exponential fits whatever the IVIM method
        assert side["FittingMethod"] == ("full" if not spec.name.startswith("ADC") else
                                         "log-linear least squares (mono-exponential)")
    assert json.loads((tmp_path / "maps" / "D.json").read_text())["Units"] == "mm^2/s"
    assert json.loads((tmp_path / "maps" / "f.json").read_text())["Units"] == "none"
    assert "6" in json.loads((tmp_path / "maps" / "status.json").read_text())["Levels"]
    rec = json.loads((tmp_path / "maps" / "fastivim.json").read_text())
    assert rec["method"] == "full" and rec["b_values"] == B.tolist()
    assert rec["bounds"]["S0"] == [0.0, None]


def test_save_maps_keeps_qform_only_geometry(tmp_path, clean_phantom):
    rigid = np.array([[0, -2.0, 0, 30], [2.0, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    p = write_nifti(tmp_path / "q.nii", clean_phantom.signal, affine=rigid, qcode=1, scode=0)
    d = io.load_dwi(p, bvals=B)
    assert int(d.img.header["qform_code"]) == 1 and int(d.img.header["sform_code"]) == 0
    res = fastivim.fit_ivim(d.data, d.b_values)
    io.save_maps(res, tmp_path / "o", d.img)
    img = nib.load(tmp_path / "o" / "f.nii.gz")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 0
    np.testing.assert_allclose(img.affine, d.img.affine)


def test_save_maps_without_reference_and_refusing_to_overwrite(tmp_path):
    res = fastivim.fit_ivim(phantom((6, 6, 2), seed=2).signal, B)
    io.save_maps(res, tmp_path / "o")
    np.testing.assert_array_equal(nib.load(tmp_path / "o" / "D.nii.gz").affine, np.eye(4))
    before = (tmp_path / "o" / "D.nii.gz").read_bytes()
    res2 = fastivim.fit_ivim(phantom((6, 6, 2), seed=9).signal, B)
    with pytest.raises(io.OutputError, match="D.nii.gz: output exists .*--overwrite"):
        io.save_maps(res2, tmp_path / "o")
    assert (tmp_path / "o" / "D.nii.gz").read_bytes() == before
    io.save_maps(res2, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "D.nii.gz").read_bytes() != before


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    res = fastivim.fit_ivim(phantom((6, 6, 2), seed=2).signal, B)
    calls = []
    real = io_write.json_bytes

    def fail_late(obj):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # an interrupt halfway through the writes
        return real(obj)

    monkeypatch.setattr(io_write, "json_bytes", fail_late)
    with pytest.raises(KeyboardInterrupt):
        io.save_maps(res, tmp_path / "deep" / "out")
    assert list(tmp_path.iterdir()) == []  # no maps, no .partial files, no directories


def test_unwritable_output(tmp_path):
    res = fastivim.fit_ivim(phantom((6, 6, 2), seed=2).signal, B)
    (tmp_path / "file").write_text("x")
    with pytest.raises(io.OutputError, match="cannot create output directory .* not a directory"):
        io.save_maps(res, tmp_path / "file" / "out")


def test_export_bids(dwi_file, tmp_path):
    d = io.load_dwi(dwi_file)
    res = fastivim.fit_ivim(d.data, d.b_values)
    deriv = tmp_path / "derivatives" / "fastivim"
    files = io.export_bids(res, deriv, "01", session="pre", reference_img=d.img)
    dwi_dir = deriv / "sub-01" / "ses-pre" / "dwi"
    expected = {f"sub-01_ses-pre_model-ivim_{s}.{ext}"
                for s in ("D", "Dstar", "f", "S0", "ADC", "ADChigh", "R2", "RMSE", "qualitymask",
                          "status")
                for ext in ("nii.gz", "json")}
    assert {p.name for p in dwi_dir.iterdir()} == expected
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "fastivim"
    assert desc["GeneratedBy"][0]["Version"] == fastivim.__version__
    assert len(files) == len(expected) + 1
    img = nib.load(dwi_dir / "sub-01_ses-pre_model-ivim_Dstar.nii.gz")
    np.testing.assert_array_equal(img.affine, d.img.affine)
    # a second subject without session, same dataset_description kept
    io.export_bids(res, deriv, "02", reference_img=d.img)
    assert (deriv / "sub-02" / "dwi" / "sub-02_model-ivim_D.nii.gz").is_file()
    with pytest.raises(ValueError, match="subject label"):
        io.export_bids(res, deriv, "sub-03")


# ------------------------------------------------------------------------------- pipeline

def test_fit_file_threads_apply_to_the_run_only(dwi_file, tmp_path):
    import numba

    before = numba.get_num_threads()
    rec = io.fit_file(dwi_file, out_dir=tmp_path / "o", threads=1)
    assert rec["threads"] == 1  # the fit ran on the requested threads...
    assert numba.get_num_threads() == before  # ...and the caller's setting is restored


def test_fit_file_recovers_the_truth(dwi_file, tmp_path, clean_phantom):
    rec = io.fit_file(dwi_file, method="full", out_dir=tmp_path / "o", command="test")
    q = nib.load(tmp_path / "o" / "quality_mask.nii.gz").get_fdata() > 0
    assert q.sum() >= 0.9 * clean_phantom.mask.sum()
    for name in ("D", "D_star", "f"):
        est = nib.load(tmp_path / "o" / f"{name}.nii.gz").get_fdata()[q]
        tru = getattr(clean_phantom, name)[q]
        assert np.median(np.abs(est / tru - 1)) < 1e-3, name
    saved = json.loads((tmp_path / "o" / "fastivim.json").read_text())
    for key in ("input", "b_values", "mask_source", "method", "bounds", "timings", "version",
                "command"):
        assert key in saved, key
    assert saved["input"] == str(dwi_file.absolute())
    assert saved["command"] == "test"
    assert saved["mask_source"].startswith("auto")
    assert saved["voxels"]["fitted"] == rec["voxels"]["fitted"] == int(clean_phantom.mask.sum())
    assert set(saved["timings"]) >= {"read", "mask", "fit", "write", "total"}
    d_map = nib.load(tmp_path / "o" / "D.nii.gz").get_fdata()[q]
    assert saved["stats"]["D"]["median"] == pytest.approx(np.median(d_map), rel=1e-6)
    assert saved["stats"]["f"]["q25"] == pytest.approx(
        np.percentile(nib.load(tmp_path / "o" / "f.nii.gz").get_fdata()[q], 25), rel=1e-6)


def test_fit_file_checks_outputs_before_fitting(dwi_file, tmp_path, monkeypatch):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "fastivim.json").write_text("{}")

    def no_fit(*a, **k):
        raise AssertionError("fitted although the output exists")

    monkeypatch.setattr(pipeline, "fit_ivim", no_fit)
    with pytest.raises(io.OutputError, match="output exists"):
        io.fit_file(dwi_file, out_dir=tmp_path / "o")


def test_fit_file_empty_auto_mask(tmp_path):
    p = write_nifti(tmp_path / "zero.nii", np.zeros((3, 3, 2, 10), np.float32))
    with pytest.raises(io.InputError, match="zero.nii: the automatic mask is empty"):
        io.fit_file(p, bvals=B, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
