"""``fastivim batch`` over a tiny generated BIDS tree: locally, on a Dask cluster, resumed.

Every fitted series must equal ``fastivim run DWI --bids ... --subject ...`` on that series,
map for map and sidecar for sidecar.
"""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from fastivim import batch, cli, io
from fastivim.options import RunOptions
from fastivim.simulate import phantom

SHAPE = (8, 8, 3)

#: (subject, session, seed, how): the good series and two broken ones.
LAYOUT = [
    ("01", None, 1, "plain"),
    ("02", "1", 2, "plain"),
    ("02", "2", 3, "plain"),
    ("03", None, 4, "mask"),  # with sub-03_desc-brain_mask.nii.gz beside it
    ("04", None, 5, "bad-bvals"),  # 3 b-values for 10 volumes
    ("05", None, 6, "not-nifti"),  # garbage bytes named *_dwi.nii.gz
]
GOOD = [x for x in LAYOUT if x[3] in ("plain", "mask")]
BROKEN = {"sub-04": "b-values", "sub-05": "not a NIfTI"}


def _label(sub, ses):
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")


def _dwi(root, sub, ses):
    d = Path(root) / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
    return d / f"{_label(sub, ses)}_dwi.nii.gz"


@pytest.fixture(scope="module")
def bids_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    for sub, ses, seed, how in LAYOUT:
        dwi = _dwi(root, sub, ses)
        io.write_phantom(dwi, phantom(SHAPE, snr=40, seed=seed))
        shutil.rmtree(dwi.with_name(io.image_stem(dwi) + "_truth"))
        if how == "mask":
            ref = nib.load(dwi)
            m = np.zeros(SHAPE, np.uint8)
            m[2:6, 2:6, :] = 1
            nib.save(nib.Nifti1Image(m, ref.affine),
                     dwi.with_name(f"sub-{sub}_desc-brain_mask.nii.gz"))
        elif how == "bad-bvals":
            io.bval_sidecar(dwi).write_text("0 10 20\n")
        elif how == "not-nifti":
            dwi.write_bytes(b"this is not an image")
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    return root


@pytest.fixture(scope="module")
def reference(bids_root, tmp_path_factory):
    """``fastivim run --bids REF`` on every good series."""
    ref = tmp_path_factory.mktemp("ref")
    for sub, ses, _, how in GOOD:
        dwi = _dwi(bids_root, sub, ses)
        args = ["run", str(dwi), "--bids", str(ref), "--subject", sub, "-q"]
        args += ["--session", ses] if ses else []
        args += ["--mask", str(dwi.with_name(f"sub-{sub}_desc-brain_mask.nii.gz"))] \
            if how == "mask" else []
        r = CliRunner().invoke(cli.main, args)
        assert r.exit_code == 0, r.output
    return ref


def invoke(*args):
    return CliRunner().invoke(cli.main, ["batch"] + [str(a) for a in args])


def summary(deriv):
    rows = batch.read_summary(Path(deriv) / batch.SUMMARY_NAME)
    return {r["participant_id"] + ("" if r["session_id"] == "n/a" else "_" + r["session_id"]): r
            for r in rows}


def assert_same_as_run(deriv, ref, sub, ses):
    """Every map and sidecar of one series equals the ``fastivim run`` output."""
    for got in io.bids_paths(deriv, sub, ses):
        want = Path(ref) / got.relative_to(deriv)
        if got.name.endswith(".json"):
            assert json.loads(got.read_text()) == json.loads(want.read_text()), got.name
        else:
            a, b = nib.load(got), nib.load(want)
            np.testing.assert_array_equal(a.get_fdata(), b.get_fdata(), err_msg=got.name)
            np.testing.assert_array_equal(a.affine, b.affine)
            assert a.get_data_dtype() == b.get_data_dtype()


def check_complete_run(deriv, ref, fitted=None):
    rows = summary(deriv)
    assert sorted(rows) == sorted(_label(s, t) for s, t, _, _ in LAYOUT)
    for sub, ses, _, how in GOOD:
        row = rows[_label(sub, ses)]
        assert row["status"] == "ok" and row["error"] == "n/a", row
        assert_same_as_run(deriv, ref, sub, ses)
        # the medians of the table are those of the maps in their quality mask
        d = io.bids_dir(deriv, sub, ses)
        q = nib.load(next(d.glob("*_qualitymask.nii.gz"))).get_fdata() > 0
        D = np.asarray(nib.load(next(d.glob("*_model-ivim_D.nii.gz"))).dataobj)
        assert float(row["D_median"]) == pytest.approx(float(np.median(D[q])), rel=1e-6)
        assert int(row["voxels_quality"]) == q.sum()
        assert row["mask"] == ("auto" if how == "plain"
                               else f"sub-{sub}/dwi/sub-{sub}_desc-brain_mask.nii.gz")
        if how == "mask":
            assert int(row["voxels_fitted"]) == 4 * 4 * 3  # the given mask, not the automatic one
        if fitted is not None:
            assert row["fitted"] == fitted.get(_label(sub, ses), "this-run")
    for label, what in BROKEN.items():
        assert rows[label]["status"] == "failed"
        assert what in rows[label]["error"] and f"{label}_dwi." in rows[label]["error"]
        assert not io.bids_dir(deriv, label[4:]).exists()  # nothing half-written
    return rows


def test_local_batch_equals_run(bids_root, reference, tmp_path):
    deriv = tmp_path / "deriv"
    r = invoke(bids_root, "-o", deriv, "-q")
    assert r.exit_code == batch.EXIT_SOME_FAILED, r.output
    assert "Traceback" not in r.output
    assert "fitted now    4" in r.output and "failed        2" in r.output
    assert "sub-04: " in r.output and "sub-05: " in r.output
    check_complete_run(deriv, reference)
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    side = json.loads((deriv / "fastivim_summary.json").read_text())
    assert side["D_median"]["Units"] == "mm^2/s"
    rec = json.loads(batch.record_path(batch.Series("01", None, Path("x")), deriv).read_text())
    assert rec["threads"] == __import__("numba").config.NUMBA_NUM_THREADS  # all cores
    assert rec["input"] == str(_dwi(bids_root, "01", None))


def test_resume_redoes_only_missing_or_interrupted(bids_root, reference, tmp_path):
    deriv = tmp_path / "deriv"
    assert invoke(bids_root, "-o", deriv, "-q").exit_code == batch.EXIT_SOME_FAILED
    # sub-01: outputs deleted; sub-02 ses-2: interrupted (record gone, one map truncated)
    shutil.rmtree(deriv / "sub-01")
    s22 = batch.Series("02", "2", _dwi(bids_root, "02", "2"))
    batch.record_path(s22, deriv).unlink()
    half = io.bids_paths(deriv, "02", "2")[0]
    half.write_bytes(half.read_bytes()[:50])
    kept = io.bids_paths(deriv, "03")[0]
    mtime = kept.stat().st_mtime_ns

    dry = invoke(bids_root, "-o", deriv, "--dry-run")
    assert dry.exit_code == 0, dry.output
    plan = {line.split()[0]: line.split()[1] for line in dry.output.splitlines()[:6]}
    assert plan == {"sub-01": "fit", "sub-02_ses-1": "skip", "sub-02_ses-2": "fit",
                    "sub-03": "skip", "sub-04": "fit", "sub-05": "fit"}

    r = invoke(bids_root, "-o", deriv, "-q")
    assert r.exit_code == batch.EXIT_SOME_FAILED, r.output
    assert "fitted now    2" in r.output and "reused        2" in r.output
    check_complete_run(deriv, reference,
                       fitted={"sub-02_ses-1": "earlier-run", "sub-03": "earlier-run"})
    assert kept.stat().st_mtime_ns == mtime  # complete series untouched

    # other fit options: nothing is complete any more
    dry = invoke(bids_root, "-o", deriv, "--dry-run", "--method", "full")
    assert "6 series: 6 fit (dry run" in dry.output and "skip" not in dry.output


def test_interrupt_keeps_every_subject_in_the_table(bids_root, tmp_path, monkeypatch):
    deriv = tmp_path / "deriv"
    real = batch.fit_series
    calls = []

    def fit_then_interrupt(series, *a, **kw):
        calls.append(series.label)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(series, *a, **kw)

    monkeypatch.setattr(batch, "fit_series", fit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(bids_root, deriv)
    rows = summary(deriv)
    assert [rows[k]["status"] for k in sorted(rows)] == ["ok", "ok"] + ["pending"] * 4
    assert not batch.record_path(batch.Series("02", "2", Path("x")), deriv).exists()


def test_dry_run_writes_nothing_and_errors_are_one_line(bids_root, tmp_path):
    deriv = tmp_path / "deriv"
    r = invoke(bids_root, "-o", deriv, "--dry-run")
    assert r.exit_code == 0 and "6 series: 6 fit (dry run" in r.output
    assert "sub-03_desc-brain_mask.nii.gz" in r.output
    assert not deriv.exists()
    r = invoke(tmp_path / "nope", "-o", deriv)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "no such directory" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke(empty, "-o", deriv)
    assert r.exit_code == 1 and "no sub-*/[ses-*/]dwi/*_dwi.nii[.gz] found" in r.output
    r = invoke(bids_root, "-o", deriv, "--workers", "2", "--scheduler", "tcp://x:1")
    assert r.exit_code == 2
    r = invoke(bids_root, "-o", deriv, "--mask-pattern", "{nope}.nii.gz", "--dry-run")
    assert r.exit_code == 1 and "unknown placeholder" in r.output
    r = invoke(bids_root, "-o", deriv, "--bounds", "f=0.5,0.1")
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_acquisitions_of_one_session_keep_their_entities(tmp_path):
    """``sub-06_acq-a_dwi`` and ``sub-06_acq-b_dwi`` are two series with two rows and two sets
    of outputs (they shared one row and one output before); two files of one series fail."""
    root = tmp_path / "bids"
    for acq, seed in (("a", 0), ("b", 1)):
        io.write_phantom(root / "sub-06" / "dwi" / f"sub-06_acq-{acq}_dwi.nii.gz",
                         phantom(SHAPE, snr=40, seed=seed))
    found = batch.find_series(root)
    assert [s.label for s in found] == ["sub-06_acq-a", "sub-06_acq-b"]
    assert all(s.problem is None for s in found)
    deriv = tmp_path / "deriv"
    report = batch.run_batch(root, deriv)
    assert report.fitted == 2 and report.failed == 0
    rows = batch.read_summary(deriv / batch.SUMMARY_NAME)
    assert [r["series"] for r in rows] == ["sub-06_acq-a", "sub-06_acq-b"]
    d = io.bids_dir(deriv, "06")
    for acq in ("a", "b"):
        assert (d / f"sub-06_acq-{acq}_model-ivim_D.nii.gz").is_file()
        rec = json.loads((d / f"sub-06_acq-{acq}_model-ivim_fastivim.json").read_text())
        assert rec["input"].endswith(f"sub-06_acq-{acq}_dwi.nii.gz")
    a = nib.load(d / "sub-06_acq-a_model-ivim_D.nii.gz").get_fdata()
    b = nib.load(d / "sub-06_acq-b_model-ivim_D.nii.gz").get_fdata()
    assert not np.array_equal(a, b, equal_nan=True)  # each from its own image
    # `fastivim run --bids` names its outputs the same way
    r = CliRunner().invoke(cli.main, ["run", str(found[0].dwi), "--bids", str(tmp_path / "r"),
                                      "--subject", "06", "-q"])
    assert r.exit_code == 0, r.output
    assert (io.bids_dir(tmp_path / "r", "06") / "sub-06_acq-a_model-ivim_D.nii.gz").is_file()
    # the same series twice (.nii and .nii.gz) would write the same maps: both fail
    img = nib.load(found[0].dwi)
    nib.save(img, root / "sub-06" / "dwi" / "sub-06_acq-a_dwi.nii")
    twice = [s for s in batch.find_series(root) if s.label == "sub-06_acq-a"]
    assert len(twice) == 2 and all("would write the same maps" in s.problem for s in twice)


def test_edited_bvals_are_refitted_not_reused(tmp_path):
    """Resume compares input content: an edited ``.bval`` after a complete batch means a
    refit with the new b-values (it reported "reused" and kept the old maps before)."""
    root = tmp_path / "bids"
    dwi = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    io.write_phantom(dwi, phantom(SHAPE, snr=40, seed=2))
    deriv = tmp_path / "deriv"
    first = batch.run_batch(root, deriv)
    assert first.fitted == 1
    again = batch.run_batch(root, deriv)
    assert again.reused == 1 and again.fitted == 0  # unchanged inputs: reused
    bval = io.bval_sidecar(dwi)
    b = np.array(bval.read_text().split(), dtype=float)
    b[1] += 5.0  # a corrected b-value, same length: only the content tells
    bval.write_text(" ".join(f"{v:g}" for v in b) + "\n")
    third = batch.run_batch(root, deriv)
    assert third.reused == 0 and third.fitted == 1
    rec = json.loads(batch.record_path(batch.find_series(root)[0], deriv).read_text())
    assert rec["b_values"] == b.tolist()
    assert rec["inputs"]["bvals"] == io.file_fingerprint(bval)


def test_the_bvec_beside_each_image_is_picked_up(tmp_path):
    """A BIDS series' ``<stem>.bvec`` is read and recorded like ``fastivim run --bvecs``; an
    edited .bvec means a refit, and a series without one still runs."""
    root = tmp_path / "bids"
    dwi = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    ph = phantom(SHAPE, snr=40, seed=2)
    io.write_phantom(dwi, ph)
    other = root / "sub-02" / "dwi" / "sub-02_dwi.nii.gz"
    io.write_phantom(other, ph)
    n_b = ph.b_values.size
    vecs = np.zeros((3, n_b))
    vecs[0, ph.b_values > 0] = 1.0
    bvec = dwi.with_name("sub-01_dwi.bvec")
    bvec.write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in vecs) + "\n")
    deriv = tmp_path / "deriv"
    first = batch.run_batch(root, deriv)
    assert first.fitted == 2
    recs = {s.subject: json.loads(batch.record_path(s, deriv).read_text())
            for s in batch.find_series(root)}
    assert recs["01"]["bvecs_source"] == str(bvec)
    assert np.array_equal(np.asarray(recs["01"]["bvecs"]), vecs.T) or np.array_equal(
        np.asarray(recs["01"]["bvecs"]), vecs)
    assert recs["01"]["inputs"]["bvecs"] == io.file_fingerprint(bvec)
    assert recs["02"]["bvecs_source"] is None
    vecs[1, ph.b_values > 0] = 1e-3
    bvec.write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in vecs) + "\n")
    again = batch.run_batch(root, deriv)
    assert again.fitted == 1 and again.reused == 1


def test_broken_symlink_dwi_is_reported_not_skipped(tmp_path):
    """A DWI that is a dangling link appears in the table as failed, with the reason."""
    root = tmp_path / "bids"
    io.write_phantom(root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", phantom(SHAPE, seed=1))
    link = root / "sub-02" / "dwi" / "sub-02_dwi.nii.gz"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "gone" / "sub-02_dwi.nii.gz")
    deriv = tmp_path / "deriv"
    report = batch.run_batch(root, deriv)
    assert report.fitted == 1 and report.failed == 1
    rows = {r["series"]: r for r in batch.read_summary(deriv / batch.SUMMARY_NAME)}
    assert rows["sub-02"]["status"] == "failed"
    assert "broken symbolic link" in rows["sub-02"]["error"]


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       scheduler_kwargs=batch.LOOPBACK_HTTP,
                                       silence_logs=logging.ERROR)
    yield cluster
    cluster.close()


def test_dask_cluster_equals_run(bids_root, reference, tmp_path, dask_cluster):
    deriv = tmp_path / "deriv"
    r = invoke(bids_root, "-o", deriv, "-q", "--scheduler", dask_cluster.scheduler_address)
    assert r.exit_code == batch.EXIT_SOME_FAILED, r.output
    assert "Dask scheduler" in r.output
    check_complete_run(deriv, reference)
    # 2 worker processes on this host: workers × numba threads ≤ cores
    rec = json.loads(batch.record_path(batch.Series("01", None, Path("x")), deriv).read_text())
    assert rec["threads"] == max(1, batch.available_cores() // 2)
    # resumed on the cluster after deleting one subject
    shutil.rmtree(deriv / "sub-03")
    r = invoke(bids_root, "-o", deriv, "-q", "--scheduler", dask_cluster.scheduler_address)
    assert "fitted now    1" in r.output and "reused        3" in r.output, r.output
    check_complete_run(deriv, reference, fitted={"sub-01": "earlier-run",
                                                 "sub-02_ses-1": "earlier-run",
                                                 "sub-02_ses-2": "earlier-run"})
    assert not any(p.name.endswith(".partial") for p in deriv.rglob("*"))
    assert os.listdir(deriv / "sub-03" / "dwi")


def test_thread_summary_says_what_ran(tmp_path, dask_cluster):
    """``--threads`` above a worker's cores is capped there, and the summary says so (it
    reported the asked-for count before)."""
    import numba

    root = tmp_path / "bids"
    io.write_phantom(root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", phantom(SHAPE, seed=1))
    most = numba.config.NUMBA_NUM_THREADS
    asked = most + 1
    report = batch.run_batch(root, tmp_path / "deriv", _options_with_threads(asked),
                             scheduler=dask_cluster.scheduler_address)
    rec = json.loads(batch.record_path(batch.find_series(root)[0], tmp_path / "deriv")
                     .read_text())
    assert rec["threads"] == most  # what the fit really used
    assert f"2 workers × {most} numba thread" in report.threads
    assert f"{asked} asked for, capped" in report.threads


def _options_with_threads(threads):
    """RunOptions asking for ``threads`` without the local machine check (Dask runs elsewhere)."""
    return RunOptions.build({"threads": threads})


def test_workers_option_starts_its_own_cluster(bids_root, reference, tmp_path):
    pytest.importorskip("distributed")
    deriv = tmp_path / "deriv"
    r = invoke(bids_root, "-o", deriv, "-q", "--workers", "2")
    assert r.exit_code == batch.EXIT_SOME_FAILED, r.output
    assert "Dask LocalCluster of 2 worker processes" in r.output
    check_complete_run(deriv, reference)


def test_threads_beyond_the_machine_is_refused_before_any_work(bids_root, tmp_path):
    r = invoke(bids_root, "-o", tmp_path / "deriv", "--threads", "100000")
    assert r.exit_code == 1 and "threads must be between 1 and" in r.output
    assert not (tmp_path / "deriv").exists()


def test_registered_as_fastivim_batch():
    r = CliRunner().invoke(cli.main, ["batch", "--help"])
    assert r.exit_code == 0 and "BIDS_ROOT" in r.output


def test_batch_with_uncertainty_writes_and_checks_the_sd_maps(bids_root, tmp_path):
    deriv = tmp_path / "deriv"
    r = invoke(bids_root, "-o", deriv, "-q", "--method", "full", "--uncertainty")
    assert r.exit_code == batch.EXIT_SOME_FAILED, r.output
    d = io.bids_dir(deriv, "01")
    sd = d / "sub-01_model-ivim_Dsd.nii.gz"
    assert sd.is_file() and (d / "sub-01_model-ivim_S0sd.json").is_file()
    rec = json.loads(batch.record_path(batch.Series("01", None, Path("x")), deriv).read_text())
    assert rec["uncertainty"] is True and rec["method"] == "full"
    # a series missing one of the maps it was asked for is not complete: it is fitted again
    sd.unlink()
    r = invoke(bids_root, "-o", deriv, "-q", "--method", "full", "--uncertainty")
    assert "fitted now    1" in r.output and "reused        3" in r.output, r.output
    assert sd.is_file()
    # other options than the record's: every series is fitted again
    r = invoke(bids_root, "-o", deriv, "-q", "--method", "full")
    assert "fitted now    4" in r.output, r.output
