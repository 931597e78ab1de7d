"""Shared folders, corrupted files, malformed records and special files (issue 16).

Each test tries what a hostile but fair user of a shared output folder could do, or what bad
luck does to files: links planted at the names fastivim writes, FIFOs and devices given as small
inputs, a flipped bit in a ``.nii.gz``, run records edited by hand, YAML alias bombs, many runs
starting at once into a fresh derivatives folder. Every refusal is one line naming the file;
nothing is written outside the output folder and nothing a link points to is touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_refused, invoke

import fastivim
from fastivim import _atomic, io
from fastivim.cli import main
from fastivim.simulate import phantom

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=float)
SECRET = "SECRET\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def signal():
    return phantom((6, 5, 2), snr=50, seed=3).signal.astype(np.float32)


def write_dwi(folder: Path, data, name="dwi.nii.gz") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    io.bval_sidecar(path).write_text(" ".join(f"{v:g}" for v in B) + "\n")
    return path


def victim(tmp_path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text(SECRET)
    return v


def untouched(v: Path) -> bool:
    return v.read_text() == SECRET and not v.is_symlink()


# -- 1. links planted in a shared output folder ------------------------------------------------

@pytest.mark.parametrize("name", [".fastivim.json.lock", ".D.nii.gz.partial",
                                  ".fastivim.json.partial", ".f.json.partial", "D.nii.gz",
                                  "fastivim.json", "report.html"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_run_never_writes_through_a_planted_link(tmp_path, signal, name, overwrite):
    dwi = write_dwi(tmp_path, signal)
    v = victim(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / name).symlink_to(v)
    r = invoke("run", dwi, "-o", shared, "-q", *(["--overwrite"] if overwrite else []))
    assert r.exit_code == 1, r.output
    assert untouched(v)
    assert (shared / name).is_symlink()
    assert not (shared / "fastivim.json").is_file() or name == "fastivim.json"
    if name.startswith(".") or overwrite:  # a link at a final name without --overwrite: "exists"
        assert_refused(r, name, "symbolic link")


def test_a_link_at_a_lock_name_is_refused_dangling_too(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / ".fastivim.json.lock").symlink_to(tmp_path / "does-not-exist-yet")
    r = invoke("run", dwi, "-o", shared, "-q")
    assert_refused(r, ".fastivim.json.lock", "symbolic link")
    assert not (tmp_path / "does-not-exist-yet").exists()


def test_a_hard_linked_lock_file_is_refused(tmp_path, signal):
    """A hard link is not a symbolic link, but writing the PID into it would still reach the
    other name."""
    dwi = write_dwi(tmp_path, signal)
    v = victim(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.link(v, shared / ".fastivim.json.lock")
    r = invoke("run", dwi, "-o", shared, "-q")
    assert_refused(r, ".fastivim.json.lock", "hard links")
    assert v.read_text() == SECRET


def test_a_special_file_at_an_output_name_is_refused_without_blocking(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.mkfifo(shared / "D.nii.gz")
    r = invoke("run", dwi, "-o", shared, "-q", "--overwrite")
    assert_refused(r, "D.nii.gz", "FIFO")
    os.unlink(shared / "D.nii.gz")
    os.mkfifo(shared / ".fastivim.json.lock")
    r = invoke("run", dwi, "-o", shared, "-q")
    assert_refused(r, ".fastivim.json.lock")


def test_a_link_planted_at_a_staging_name_during_the_fit_is_not_followed(tmp_path, signal,
                                                                           monkeypatch):
    """The staging name is created with O_EXCL|O_NOFOLLOW: a link planted while the run fits
    (after its start-up clean-up) makes the run refuse, and the link's target is untouched."""
    import fastivim.pipeline as pipeline

    dwi = write_dwi(tmp_path, signal)
    v = victim(tmp_path)
    out = tmp_path / "shared"
    real = pipeline.encode_maps

    def plant_then_encode(*a, **kw):
        (out / ".D.nii.gz.partial").symlink_to(v)
        (out / ".D.json.partial").symlink_to(v)
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "encode_maps", plant_then_encode)
    with pytest.raises(io.OutputError, match=r"\.D\.nii\.gz\.partial: is a symbolic link"):
        io.fit_file(dwi, out_dir=out)
    assert untouched(v)
    assert not (out / "D.nii.gz").exists() and not (out / "fastivim.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".partial") and not p.is_symlink()]


def test_a_staged_file_swapped_for_a_link_before_the_commit_is_refused(tmp_path, signal,
                                                                         monkeypatch):
    """Someone who can write to the folder replaces a staged file by a link just before the
    commit: the commit refuses (the final name never becomes a link), nothing is committed."""
    from fastivim.io.write import LayoutWriter

    dwi = write_dwi(tmp_path, signal)
    v = victim(tmp_path)
    out = tmp_path / "shared"
    real = LayoutWriter.commit

    def swap_then_commit(self, *a, **kw):
        staged = out / ".D.nii.gz.partial"
        staged.unlink()
        staged.symlink_to(v)
        return real(self, *a, **kw)

    monkeypatch.setattr(LayoutWriter, "commit", swap_then_commit)
    with pytest.raises(io.OutputError, match="replaced or removed by another process"):
        io.fit_file(dwi, out_dir=out)
    assert untouched(v)
    assert not os.path.lexists(out / "D.nii.gz") and not (out / "fastivim.json").exists()


@pytest.mark.parametrize("name", [".report.html.partial", "report.html", ".report_maps.png.partial",
                                  "report_decay.png", ".fastivim.json.lock"])
def test_report_never_writes_through_a_planted_link(tmp_path, signal, name):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    shared = tmp_path / "shared"
    io.fit_file(dwi, out_dir=shared)
    v = victim(tmp_path)
    (shared / name).symlink_to(v)
    r = invoke("report", shared)
    assert_refused(r, name, "symbolic link")
    assert untouched(v)
    assert not (shared / "report.html").is_file() or (shared / "report.html").is_symlink()
    assert not (shared / "report_maps.png").exists()  # nothing half-written


def test_bids_folders_below_the_derivatives_folder_must_not_be_links(tmp_path, signal):
    """``DERIV/sub-01`` planted as a link to another folder would put the maps there."""
    dwi = write_dwi(tmp_path, signal)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    (deriv / "sub-01").symlink_to(elsewhere)
    r = invoke("run", dwi, "--bids", deriv, "--subject", "01", "-q")
    assert_refused(r, "sub-01", "symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_a_dataset_description_link_is_refused(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    v = victim(tmp_path)
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    (deriv / "dataset_description.json").symlink_to(v)
    r = invoke("run", dwi, "--bids", deriv, "--subject", "01", "-q")
    assert_refused(r, "dataset_description.json", "symbolic link")
    assert untouched(v)
    assert not (deriv / "sub-01").exists()


# -- batch in a shared derivatives folder -----------------------------------------------------

def make_bids(root: Path, subjects=("01", "02")) -> Path:
    for k, sub in enumerate(subjects):
        dwi = root / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz"
        io.write_phantom(dwi, phantom((6, 5, 2), snr=40, seed=k))
        shutil.rmtree(dwi.with_name(io.image_stem(dwi) + "_truth"))
    return root


@pytest.fixture(scope="module")
def bids_src(tmp_path_factory):
    return make_bids(tmp_path_factory.mktemp("bidssrc") / "bids")


@pytest.fixture()
def bids_copy(bids_src, tmp_path):
    """A BIDS dataset of two subjects in this test's folder, and its finished batch (the run
    records keep the input paths, so the batch is run here rather than copied)."""
    root = tmp_path / "bids"
    shutil.copytree(bids_src, root)
    deriv = tmp_path / "deriv"
    r = CliRunner().invoke(main, ["batch", str(root), "-o", str(deriv), "-q"])
    assert r.exit_code == 0, r.output
    return root, deriv


@pytest.mark.parametrize("name", [".fastivim_summary.tsv.partial", ".fastivim_summary.tsv.lock",
                                  "fastivim_summary.tsv", ".fastivim_summary.json.partial"])
def test_batch_never_writes_through_a_planted_link(bids_copy, tmp_path, name):
    root, deriv = bids_copy
    v = victim(tmp_path)
    (deriv / name).unlink(missing_ok=True)
    (deriv / name).symlink_to(v)
    r = invoke("batch", root, "-o", deriv, "-q", "--redo")
    assert_refused(r, name, "symbolic link")
    assert untouched(v)


# -- 2. corrupted .nii.gz ---------------------------------------------------------------------

def _flip(path: Path, where: float, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    pos = 20 + int((len(data) - 40) * where)  # inside the compressed data, not the header/trailer
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def large_gz(tmp_path_factory):
    """A phantom big enough that a bit flip lands in the voxel data (what nibabel decodes)."""
    d = tmp_path_factory.mktemp("gz")
    path = d / "dwi.nii.gz"
    io.write_phantom(path, phantom((24, 24, 6), snr=30, seed=5))
    return path


@pytest.mark.parametrize("where, bit", [(0.2, 0), (0.5, 3), (0.8, 7), (0.95, 1)])
def test_a_flipped_bit_in_a_nii_gz_is_refused(large_gz, tmp_path, where, bit):
    bad = tmp_path / "bad.nii.gz"
    shutil.copy(large_gz, bad)
    shutil.copy(io.bval_sidecar(large_gz), io.bval_sidecar(bad))
    _flip(bad, where, bit)
    r = invoke("run", bad, "-o", tmp_path / "out", "-q")
    assert_refused(r, "bad.nii.gz", "damaged")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [4, 8, 200])
def test_a_truncated_nii_gz_is_refused(large_gz, tmp_path, cut):
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(large_gz.read_bytes()[:-cut])
    shutil.copy(io.bval_sidecar(large_gz), io.bval_sidecar(bad))
    with pytest.raises(io.InputError, match=r"cut\.nii\.gz: damaged or truncated"):
        io.load_dwi(bad)


def test_a_corrupted_mask_is_refused(large_gz, tmp_path):
    img = nib.load(large_gz)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(img.shape[:3], np.uint8), img.affine), mask)
    data = bytearray(mask.read_bytes())
    data[-6] ^= 0xFF  # the stored length of the uncompressed data
    mask.write_bytes(bytes(data))
    with pytest.raises(io.InputError, match=r"mask\.nii\.gz: damaged or truncated"):
        io.load_mask(mask, img)


@pytest.mark.parametrize("dtype, slope, inter", [("float32", 1.0, 0.0), ("int16", 1.0, 0.0),
                                                 ("int16", 0.5, 10.0), ("float64", 2.0, 0.0),
                                                 (">f4", 1.0, 0.0)])
def test_checked_reading_gives_nibabels_values(tmp_path, dtype, slope, inter):
    """The CRC-checked reader returns what nibabel returns (scaling, byte order, Fortran
    order)."""
    rng = np.random.default_rng(0)
    data = (rng.random((5, 4, 3, 10)) * 1000).astype(dtype)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / "x.nii.gz"
    nib.save(img, path)
    loaded = nib.load(path)
    got = io.read._read_data(loaded, path)
    unscaled = slope == 1.0 and inter == 0.0 and np.dtype(dtype).kind == "f"
    want = np.asanyarray(nib.load(path).dataobj) if unscaled or dtype == "int16" and \
        slope == 1.0 and inter == 0.0 else nib.load(path).get_fdata(dtype=np.float32)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


# -- 3. malformed run records -----------------------------------------------------------------

def _edit_record(path: Path, edit) -> None:
    rec = json.loads(path.read_text())
    edit(rec)
    path.write_text(json.dumps(rec))


def _first(m):
    return sorted(m)[0]


BAD_RECORDS = {
    "manifest entry 5": lambda r: r["manifest"].__setitem__(_first(r["manifest"]), 5),
    "manifest entry a list": lambda r: r["manifest"].__setitem__(_first(r["manifest"]), [1, 2]),
    "manifest a list": lambda r: r.__setitem__("manifest", [1, 2]),
    "manifest entry /dev/zero": lambda r: r["manifest"].__setitem__(
        "/dev/zero", {"bytes": 10, "sha256": "0" * 64}),
    "manifest entry ../x": lambda r: r["manifest"].__setitem__(
        "../x", {"bytes": 10, "sha256": "0" * 64}),
    "no manifest": lambda r: r.pop("manifest"),
    "stats a string": lambda r: r.__setitem__("stats", "x"),
    "timings null": lambda r: r.__setitem__("timings", None),
    "voxels a list": lambda r: r.__setitem__("voxels", [1]),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_malformed_record_fails_its_series_and_the_batch_goes_on(bids_copy, case):
    root, deriv = bids_copy
    rec = deriv / "sub-01" / "dwi" / "sub-01_model-ivim_fastivim.json"
    _edit_record(rec, BAD_RECORDS[case])
    r = invoke("batch", root, "-o", deriv, "-q")
    assert r.exit_code == 3, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.output
    rows = {row["participant_id"]: row for row in fastivim.batch.read_summary(
        deriv / "fastivim_summary.tsv")}
    assert rows["sub-01"]["status"] == "failed"
    assert "sub-01_model-ivim_fastivim.json" in rows["sub-01"]["error"]
    assert rows["sub-02"]["status"] == "ok"
    # --dry-run says the same and writes nothing
    r = invoke("batch", root, "-o", deriv, "--dry-run")
    assert r.exit_code == 0, r.output
    assert re.search(r"sub-01\s+fail", r.output) and "malformed" in r.output or "cannot" in \
        r.output
    # --redo replaces the bad record
    r = invoke("batch", root, "-o", deriv, "-q", "--redo")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_report_of_a_malformed_record_is_one_line(tmp_path, signal, case):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    io.fit_file(dwi, out_dir=tmp_path / "out")
    rec = tmp_path / "out" / "fastivim.json"
    _edit_record(rec, BAD_RECORDS[case])
    r = invoke("report", tmp_path / "out")
    assert_refused(r, "fastivim.json")
    assert not (tmp_path / "out" / "report.html").exists()


def test_a_map_missing_from_the_manifest_is_not_trusted(bids_copy, tmp_path, signal):
    """Removing a map's entry from the manifest must not let another run's file in."""
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    out = tmp_path / "out"
    io.fit_file(dwi, out_dir=out)
    _edit_record(out / "fastivim.json", lambda r: r["manifest"].pop("f.nii.gz"))
    r = invoke("report", out)
    assert_refused(r, "f.nii.gz", "not listed")
    # batch: the series is not complete, so it is fitted again (not reused)
    root, deriv = bids_copy
    rec = deriv / "sub-01" / "dwi" / "sub-01_model-ivim_fastivim.json"
    _edit_record(rec, lambda r: r["manifest"].pop("sub-01_model-ivim_D.nii.gz"))
    r = invoke("batch", root, "-o", deriv, "-q")
    assert r.exit_code == 0, r.output
    rows = {row["participant_id"]: row for row in fastivim.batch.read_summary(
        deriv / "fastivim_summary.tsv")}
    assert rows["sub-01"]["fitted"] == "this-run" and rows["sub-02"]["fitted"] == "earlier-run"


def test_a_fifo_planted_at_a_listed_map_is_refused_without_blocking(tmp_path, signal):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    out = tmp_path / "out"
    io.fit_file(dwi, out_dir=out)
    (out / "D.nii.gz").unlink()
    os.mkfifo(out / "D.nii.gz")
    r = invoke("report", out)
    assert_refused(r, "D.nii.gz", "FIFO")


def test_record_schema_unit():
    from fastivim.io.record import check_record

    good = {"manifest": {"D.nii.gz": {"bytes": 3, "sha256": "a" * 64}}}
    assert check_record(good, "r.json") is good
    for bad in ([], {"manifest": {"D.nii.gz": {"bytes": -1, "sha256": "a" * 64}}},
                {"manifest": {"D.nii.gz": {"bytes": 3, "sha256": "xyz"}}},
                {"manifest": {".D.nii.gz.partial": {"bytes": 3, "sha256": "a" * 64}}},
                dict(good, method=["x"]), dict(good, b_values=[0, "1"]),
                dict(good, bounds={"f": [0]}), dict(good, noise_sigma=float("nan"))):
        with pytest.raises(io.InputError, match="r.json"):
            check_record(bad, "r.json")


# -- 4. YAML alias bombs and other YAML surprises ---------------------------------------------

def _bomb(levels=9) -> str:
    lol = "[" + ", ".join(['"lol"'] * 9) + "]"
    parts = [f"&a {lol}"]
    prev = "a"
    for n in "bcdefghijk"[: levels - 1]:
        parts.append(f"&{n} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = n
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("text", [
    "b_threshold: {bomb}\n",
    "bounds:\n  f: {bomb}\n",
    "subject: {bomb}\nbids: d\n",
    "x: &a 1\nb_threshold: *a\n",          # a harmless alias is refused too
    "method: &m full\n",                  # and an anchor alone
])
def test_yaml_anchors_and_aliases_are_refused_at_once(tmp_path, signal, text):
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text.format(bomb=_bomb()))
    r = invoke("run", dwi, "--config", cfg, "-q")
    assert_refused(r, "c.yaml", "aliases")


@pytest.mark.parametrize("text, words", [
    ("method: full\nmethod: segmented\n", "'method' is given twice"),
    ("bounds:\n  f: [0, 0.5]\n  f: [0, 0.3]\n", "'f' is given twice"),
    ("b_threshold: 1:30\n", "'1:30'"),          # YAML 1.1 base 60 would read 90
    ("b_threshold: 2_00\n", "'2_00'"),          # YAML 1.1 would read 200
    ("b_threshold: 0x10\n", "'0x10'"),
    ("overwrite: yes\n", "'yes'"),              # YAML 1.1 would read true
    ("method: [x]\n", "'method' must be"),
    ("method: {a: 1}\n", "'method' must be"),
    ("model: [x]\n", "'model' must be"),
    ("? [a]\n: 1\n", "c.yaml"),
])
def test_yaml_surprises_are_errors(tmp_path, signal, text, words):
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = invoke("run", dwi, "--config", cfg, "-q")
    assert_refused(r, "c.yaml", words)


def test_yaml_numbers_that_are_plain_still_work(tmp_path):
    from fastivim.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("b_threshold: 1e2\nmask_fraction: .25\nseed: 7\noverwrite: true\n"
                   "bounds:\n  D: [0, 5.0e-3]\n")
    got = load_config(cfg)
    assert got["b_threshold"] == 100.0 and got["mask_fraction"] == 0.25 and got["seed"] == 7
    assert got["overwrite"] is True and got["bounds"]["D"] == (0.0, 5e-3)


def test_huge_values_are_shortened_in_messages(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("b_threshold: [" + ", ".join(["123456789"] * 50000) + "]\n")
    r = invoke("run", dwi, "--config", cfg, "-q")
    assert_refused(r, "c.yaml", "'b_threshold' must be", "...")


def test_the_api_refuses_a_method_of_the_wrong_type():
    from fastivim.options import FitOptions, OptionError

    for bad in (["x"], {"a": 1}, 3):
        with pytest.raises(OptionError, match="method"):
            FitOptions(method=bad)


# -- 5. many runs into a fresh derivatives folder ---------------------------------------------

@pytest.mark.parametrize("round_", range(3))
def test_parallel_runs_into_a_fresh_derivatives_folder(tmp_path, round_):
    """The cluster array-job pattern: runs that start together (released by a barrier) all
    succeed, and ``dataset_description.json`` is written once, whole."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    n = 6
    deriv = tmp_path / "deriv"
    res = fastivim.fit_ivim(phantom((4, 4, 1), seed=1).signal, B)
    encoded = io.encode_maps(res, None)
    barrier = threading.Barrier(n)

    def export(subject):
        barrier.wait(timeout=60)
        return [str(p) for p in io.export_bids(res, deriv, subject, _encoded=encoded)]

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(export, [f"{k:02d}" for k in range(n)]))
    assert sum(str(deriv / "dataset_description.json") in r for r in results) == 1
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert sorted(p.name for p in deriv.iterdir()) == ["dataset_description.json"] + [
        f"sub-{k:02d}" for k in range(n)]


def test_dataset_description_made_by_another_writer_meanwhile_is_kept(tmp_path, monkeypatch):
    """Another run creates the file between our check and our commit: it is kept, ours is
    dropped, and nothing fails."""
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    desc = deriv / "dataset_description.json"
    real = os.path.lexists

    def racing_lexists(p):
        if Path(p) == desc and not real(p):
            desc.write_text('{"Name": "the other writer"}')
            return False
        return real(p)

    monkeypatch.setattr(_atomic.os.path, "lexists", racing_lexists)
    assert io.write.ensure_dataset_description(deriv) is False
    monkeypatch.undo()
    assert json.loads(desc.read_text()) == {"Name": "the other writer"}
    assert [p.name for p in deriv.iterdir()] == ["dataset_description.json"]


# -- 6. the report checks the input it draws --------------------------------------------------

def test_report_does_not_draw_an_input_that_changed(tmp_path, signal):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    out = tmp_path / "out"
    io.fit_file(dwi, out_dir=out)
    nib.save(nib.Nifti1Image(signal * 3.0, np.diag([2.0, 2.0, 3.0, 1.0])), dwi)  # same grid
    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    assert "the input changed since the fit" in r.stderr
    page = (out / "report.html").read_text()
    assert "Not drawn" in page and not (out / "report_decay.png").exists()
    assert (out / "report_maps.png").exists()
    # unchanged input: the decay figure is drawn
    nib.save(nib.Nifti1Image(signal, np.diag([2.0, 2.0, 3.0, 1.0])), dwi)
    io.fit_file(dwi, out_dir=out, overwrite=True)
    r = invoke("report", out)
    assert r.exit_code == 0 and "changed" not in r.stderr
    assert (out / "report_decay.png").exists()


# -- 7. special and huge small inputs ---------------------------------------------------------

@pytest.mark.parametrize("option", ["--bvals", "--config", "--bvecs"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "dir"])
def test_special_files_as_small_inputs_are_refused_without_blocking(tmp_path, signal, option,
                                                                     kind):
    dwi = write_dwi(tmp_path, signal)
    if kind == "fifo":
        path = tmp_path / "special"
        os.mkfifo(path)
    elif kind == "dir":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = Path(kind)
    r = invoke("run", dwi, option, path, "-o", tmp_path / "out", "-q")
    assert_refused(r, str(path) if kind != "fifo" else "special",
                   {"fifo": "FIFO", "/dev/zero": "device", "dir": "directory"}[kind])
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_the_image_or_mask_is_refused(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    os.mkfifo(tmp_path / "mask.nii.gz")
    r = invoke("run", dwi, "--mask", tmp_path / "mask.nii.gz", "-q")
    assert_refused(r, "mask.nii.gz", "not a regular file")
    os.mkfifo(tmp_path / "pipe.nii.gz")
    (tmp_path / "pipe.bval").write_text("0 10 20 30 50 80 100 200 400 800\n")
    r = invoke("run", tmp_path / "pipe.nii.gz", "-q")
    assert_refused(r, "pipe.nii.gz", "not a regular file")


@pytest.mark.parametrize("option, name", [("--bvals", "huge.bval"), ("--config", "huge.yaml")])
def test_small_inputs_beyond_the_limit_are_refused_before_reading(tmp_path, signal, option,
                                                                  name):
    dwi = write_dwi(tmp_path, signal)
    huge = tmp_path / name
    with open(huge, "wb") as fh:  # sparse: no time or disk spent writing it
        fh.truncate(_atomic.SMALL_FILE_LIMIT + 1)
    r = invoke("run", dwi, option, huge, "-q")
    assert_refused(r, name, "larger than the 4 MiB")


def test_a_fifo_as_a_batch_bval_does_not_block(tmp_path):
    root = make_bids(tmp_path / "bids", ("01", "02"))
    bval = root / "sub-01" / "dwi" / "sub-01_dwi.bval"
    bval.unlink()
    os.mkfifo(bval)
    r = invoke("batch", root, "-o", tmp_path / "deriv", "-q")
    assert r.exit_code == 3, r.output
    rows = {row["participant_id"]: row for row in fastivim.batch.read_summary(
        tmp_path / "deriv" / "fastivim_summary.tsv")}
    assert rows["sub-01"]["status"] == "failed" and "FIFO" in rows["sub-01"]["error"]
    assert rows["sub-02"]["status"] == "ok"


# -- 8. BIDS report links ---------------------------------------------------------------------

def test_bids_report_links_to_its_real_files(tmp_path, signal):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    r = invoke("run", dwi, "--bids", tmp_path / "d", "--subject", "01", "--session", "1",
               "--report", "-q")
    assert r.exit_code == 0, r.output
    folder = tmp_path / "d" / "sub-01" / "ses-1" / "dwi"
    page = (folder / "sub-01_ses-1_model-ivim_report.html").read_text()
    links = re.findall(r'href="([^"]+)"', page)
    assert links and all(link.startswith("sub-01_ses-1_model-ivim_report_") for link in links)
    assert all((folder / link).is_file() for link in links)


# -- 9. strict numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["800_0", "0x10", "١٠٠٠", "8e", "1.2.3", "1e3_0", "--5",
                                   "1e+", "nan0"])
def test_b_value_tokens_that_are_not_plain_numbers_are_refused(tmp_path, token):
    f = tmp_path / "b.bval"
    f.write_text("0 10 20 30 50 80 100 200 400 " + token + "\n")
    with pytest.raises(io.InputError, match="is not a number"):
        io.read_bvals(f)


@pytest.mark.parametrize("token, value", [("800", 800.0), ("8e2", 800.0), ("8.E+2", 800.0),
                                          ("+800.0", 800.0), (".5", 0.5)])
def test_plain_numbers_are_read(tmp_path, token, value):
    f = tmp_path / "b.bval"
    f.write_text("0 " + token + "\n")
    assert io.read_bvals(f)[1] == value


def test_b_vector_tokens_are_strict(tmp_path):
    f = tmp_path / "v.bvec"
    f.write_text("1 0 0\n0 1_0 0\n0 0 1\n")
    with pytest.raises(io.InputError, match="'1_0' is not a number"):
        io.read_bvecs(f, 3)
    f.write_text("1 0 0\n0 1 0\n0 0 1\n")
    np.testing.assert_array_equal(io.read_bvecs(f, 3), np.eye(3))


def test_cli_bounds_are_strict_numbers(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    r = invoke("run", dwi, "--bounds", "f=0,0_5", "-q")
    assert r.exit_code == 2 and "must be numbers" in r.output


# -- 10. the smaller ones ---------------------------------------------------------------------

def _full_disk_on(monkeypatch, predicate):
    real = _atomic._write_fd
    seen = []

    def maybe_full(fd, payload):
        name = os.readlink(f"/proc/self/fd/{fd}")
        seen.append(name)
        if predicate(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, payload)

    monkeypatch.setattr(_atomic, "_write_fd", maybe_full)
    return seen


@pytest.mark.parametrize("which", ["report.html", "report_decay.png"])
def test_a_full_disk_during_the_report_names_the_file_and_leaves_no_png(tmp_path, signal,
                                                                        monkeypatch, which):
    pytest.importorskip("matplotlib")
    dwi = write_dwi(tmp_path, signal)
    out = tmp_path / "out"
    io.fit_file(dwi, out_dir=out)
    before = sorted(p.name for p in out.iterdir())
    _full_disk_on(monkeypatch, lambda name: name.endswith(f".{which}.partial"))
    r = invoke("report", out)
    assert_refused(r, which, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == before  # no orphan PNG, no partial


def test_a_full_disk_for_the_batch_summary_names_the_file(bids_copy, monkeypatch):
    root, deriv = bids_copy
    _full_disk_on(monkeypatch, lambda name: "fastivim_summary" in name)
    r = invoke("batch", root, "-o", deriv, "-q", "--redo")
    assert_refused(r, "fastivim_summary", "No space left on device")
    assert not [p for p in deriv.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("spoil", ["link", "file", "full"])
def test_run_to_a_folder_and_bids_is_all_or_nothing(tmp_path, signal, monkeypatch, spoil):
    """``run -o A --bids B``: a problem with B found while writing leaves A untouched."""
    dwi = write_dwi(tmp_path, signal)
    a, b = tmp_path / "A", tmp_path / "B"
    b.mkdir()
    if spoil == "link":  # only found at staging: the BIDS folder's name is taken by a link
        (b / "sub-01").symlink_to(tmp_path / "nowhere")
    elif spoil == "file":
        (b / "sub-01").write_text("not a folder")
    else:
        _full_disk_on(monkeypatch, lambda name: "/B/" in name)
    r = invoke("run", dwi, "-o", a, "--bids", b, "--subject", "01", "-q")
    assert r.exit_code == 1, r.output
    assert "sub-01" in r.stderr or "B" in r.stderr
    assert not a.exists() or list(a.iterdir()) == []
    assert not (tmp_path / "nowhere").exists()


def test_nan_pixdim_with_report(tmp_path, signal):
    pytest.importorskip("matplotlib")
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    img = nib.Nifti1Image(signal, affine)
    img.header.set_sform(affine, code=2)
    img.header["pixdim"][1:4] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(img, path)
    (tmp_path / "nan.bval").write_text(" ".join(f"{v:g}" for v in B) + "\n")
    assert np.isnan(nib.load(path).header["pixdim"][1])
    r = invoke("run", path, "-o", tmp_path / "out", "--report", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "report_maps.png").is_file()


@pytest.mark.parametrize("name", ["sub-01_acq-a.b_dwi.nii.gz", "sub-01_acq_dwi.nii.gz",
                                  "sub-01_acq-é_dwi.nii.gz", "sub-01_acq-a-b_dwi.nii.gz"])
def test_invalid_bids_entities_are_refused(tmp_path, signal, name):
    dwi = write_dwi(tmp_path, signal, name=name)
    r = invoke("run", dwi, "--bids", tmp_path / "d", "--subject", "01", "-q")
    assert_refused(r, "invalid BIDS entity")
    assert not (tmp_path / "d").exists()


def test_invalid_bids_entities_fail_their_batch_series(tmp_path):
    root = make_bids(tmp_path / "bids", ("01",))
    good = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    bad = good.with_name("sub-01_acq-a.b_dwi.nii.gz")
    shutil.copy(good, bad)
    shutil.copy(io.bval_sidecar(good), io.bval_sidecar(bad))
    r = invoke("batch", root, "-o", tmp_path / "deriv", "-q")
    assert r.exit_code == 3, r.output
    rows = fastivim.batch.read_summary(tmp_path / "deriv" / "fastivim_summary.tsv")
    by_dwi = {Path(row["dwi"]).name: row for row in rows}
    assert by_dwi[bad.name]["status"] == "failed"
    assert "invalid BIDS entity" in by_dwi[bad.name]["error"]
    assert by_dwi[good.name]["status"] == "ok"  # not mistaken for a duplicate of the bad one


@pytest.mark.parametrize("label", ["é", "٠١", "ａ1", "01\u200b"])
def test_non_ascii_labels_are_refused(tmp_path, signal, label):
    dwi = write_dwi(tmp_path, signal)
    r = invoke("run", dwi, "--bids", tmp_path / "d", "--subject", label, "-q")
    assert_refused(r, "ASCII")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="ASCII"):
        io.layout.check_label(label, "subject")


@pytest.mark.parametrize("snr", ["nan", "NaN", "-nan"])
def test_simulate_refuses_a_nan_snr(tmp_path, snr):
    r = invoke("simulate", tmp_path / "p.nii.gz", "--shape", "4,4,2", "--snr", snr)
    assert r.exit_code == 2 and "--snr" in r.output
    assert not (tmp_path / "p.nii.gz").exists()


def test_an_unreachable_scheduler_leaves_no_derivatives_folder(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import socket

    import fastivim.batch as batch

    root = make_bids(tmp_path / "bids", ("01",))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(batch, "SCHEDULER_TIMEOUT", "2s")
    r = invoke("batch", root, "-o", tmp_path / "deriv", "-q", "--scheduler",
               f"tcp://127.0.0.1:{port}")
    assert r.exit_code == 1, r.output
    assert "cannot reach the Dask scheduler" in r.output
    assert not (tmp_path / "deriv").exists()


@pytest.mark.parametrize("method", ["segmented", "full", "bayesian"])
@pytest.mark.parametrize("s0", [1e30, 3e38])
def test_float32_signals_near_the_float32_maximum_are_fitted(method, s0):
    """All-finite float32 signals up to 3e38: every fit is done in float64, so none is refused
    as bad input and the maps hold the true D."""
    b = B
    rng = np.random.default_rng(0)
    S = 0.1 * np.exp(-b * 0.02) + 0.9 * np.exp(-b * 1e-3)
    Y = (S * (1 + 0.01 * rng.standard_normal((40, b.size)))) * s0
    Y = Y.astype(np.float32)
    assert np.all(np.isfinite(Y))
    res = fastivim.fit_ivim(Y, b, method=method)
    assert np.all(res.status <= 1), np.bincount(res.status)
    assert np.all(np.isfinite(res.S0))
    np.testing.assert_allclose(np.median(res.S0.astype(np.float64)) / s0, 1.0, rtol=0.05)
    np.testing.assert_allclose(np.median(res.D), 1e-3, rtol=0.1)


def test_an_s0_beyond_float32_is_never_a_converged_voxel():
    b = B
    S = 0.1 * np.exp(-b * 0.02) + 0.9 * np.exp(-b * 1e-3)
    rng = np.random.default_rng(0)
    Y = np.clip(S * 3.4e38 * (1 + 0.03 * rng.standard_normal((50, b.size))), 0,
                np.finfo(np.float32).max).astype(np.float32)
    for method in ("segmented", "full", "bayesian"):
        res = fastivim.fit_ivim(Y, b, method=method)
        fitted = np.isin(res.status, (0, 1, 5))  # the codes whose maps hold values
        failed = ~fitted
        for name in ("S0", "f", "D_star", "D", "r_squared", "rmse",
                     "S0_sd", "f_sd", "D_star_sd", "D_sd"):
            m = getattr(res, name)
            if m is None:
                continue
            assert np.all(np.isfinite(m[fitted])) or name.endswith("_sd"), (method, name)
            assert not np.isinf(m).any(), (method, name)
            assert np.isnan(m[failed]).all(), (method, name)
        assert not res.quality_mask[failed].any(), method
