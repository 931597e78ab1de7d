"""All-or-nothing run outputs, tried the way bad luck treats them (issue 9, section 2).

Interrupts inside the commit, two runs into one folder at once, SIGTERM while staging, a batch
stopped by SIGTERM, ``-o .`` over the input, stale files of an older run, leftovers of a killed
run, and Ctrl-C on a large volume under ``-q``. The subprocess tests drive the real command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from fastivim import cli, io
from fastivim.simulate import phantom

MAP_NAMES = ("D", "D_star", "f", "S0", "R2", "RMSE", "quality_mask", "status")


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


@pytest.fixture()
def work(tmp_path, monkeypatch):
    io.write_phantom(tmp_path / "dwi.nii.gz", phantom((10, 10, 3), snr=50, seed=5))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cmd():
    exe = Path(sys.executable).with_name("fastivim")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fastivim.cli"]


def assert_one_run(out: Path):
    """``out`` holds one complete run (record present, every file the one it describes), or no
    file of a run at all. Never a mix."""
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    maps = {f"{n}.nii.gz" for n in MAP_NAMES} | {f"{n}.json" for n in MAP_NAMES}
    assert not {n for n in names if n.endswith(".partial")}, names
    if "fastivim.json" not in names:
        assert not names & maps, f"map files without a run record: {sorted(names & maps)}"
        return None
    record = json.loads((out / "fastivim.json").read_text())
    for n in MAP_NAMES:  # every sidecar describes the run of the record
        side = json.loads((out / f"{n}.json").read_text())
        assert side["FittingMethod"] == record["method"], (n, side["FittingMethod"])
    manifest = record.get("manifest")
    assert manifest, "the record lists its files"
    import hashlib

    for name, want in manifest.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == want["sha256"], name
    return record


# ---------------------------------------------------------------- interrupts in the commit

def _interrupt_the_commit(monkeypatch, after: int):
    """Deliver a real SIGINT to this process from inside the n-th rename of the commit."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == after:
            signal.raise_signal(signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("after", [1, 4, 16])
def test_ctrl_c_during_the_final_renames_never_mixes_two_runs(work, monkeypatch, after):
    assert invoke("run", "dwi.nii.gz", "-q").exit_code == 0  # an older run (segmented)
    calls = _interrupt_the_commit(monkeypatch, after)
    r = invoke("run", "dwi.nii.gz", "--method", "full", "--overwrite", "-q")
    monkeypatch.undo()
    assert len(calls) >= after
    record = assert_one_run(work / "dwi_ivim")  # first: never a mix
    assert r.exit_code == 130, r.output
    assert record is not None and record["method"] == "full"  # the commit was completed


def test_ctrl_c_during_the_renames_of_a_first_run_leaves_no_finished_looking_map(work,
                                                                                 monkeypatch):
    _interrupt_the_commit(monkeypatch, 2)
    r = invoke("run", "dwi.nii.gz", "-q")
    monkeypatch.undo()
    assert_one_run(work / "dwi_ivim")
    assert r.exit_code == 130, r.output


# ---------------------------------------------------------------- concurrency

#: Runs the command with the fit announced and slowed down by 3 s, so that a second run can be
#: started while the first one is certainly fitting (works for any version of the code).
SLOW_FIT = textwrap.dedent("""
    import sys, time
    from fastivim import fit
    real = fit.fit_ivim
    def slow(*a, **k):
        print("FITTING", flush=True)
        time.sleep(3)
        return real(*a, **k)
    fit.fit_ivim = slow  # before the modules that import it by name
    from fastivim.cli import main
    sys.argv = ["fastivim"] + sys.argv[1:]
    main()
""")


@pytest.mark.parametrize("overwrite", [True, False])
def test_two_runs_into_one_folder_one_refuses(work, overwrite):
    args = ["run", "dwi.nii.gz", "-q", "-o", "out"] + (["--overwrite"] if overwrite else [])
    first = subprocess.Popen([sys.executable, "-c", SLOW_FIT, *args, "--method", "full"],
                             cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "FITTING"
    second = subprocess.run(_cmd() + args, cwd=work, capture_output=True, text=True,
                            timeout=120)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert second.returncode == 1, second.stderr
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: "), err
    assert err.startswith(f"Error: out: another fastivim run is writing here (process "
                          f"{first.pid} on "), err
    record = assert_one_run(work / "out")
    assert record["method"] == "full"  # the first run's, whole
    assert not list((work / "out").glob(".*"))  # no lock or partial file left


# ---------------------------------------------------------------- signals in a subprocess

#: Runs the command with the JSON encoding slowed down and announced, so that the test can
#: signal the process while its files are being staged (works for any version of the code).
SLOW_STAGING = textwrap.dedent("""
    import json, sys, time
    real = json.dumps
    n = [0]
    def dumps(*a, **k):
        n[0] += 1
        if n[0] == 4:
            print("STAGING", flush=True)
            time.sleep(30)
        return real(*a, **k)
    json.dumps = dumps
    from fastivim.cli import main
    sys.argv = ["fastivim"] + sys.argv[1:]
    main()
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_staging_cleans_up(work, sig, code):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STAGING, "run", "dwi.nii.gz", "-q"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "STAGING", (line, proc.stderr.read() if proc.poll() else "")
    assert list(work.rglob(".*.partial")), "some files are staged at this point"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert not list(work.rglob("*.partial"))
    assert not (work / "dwi_ivim").exists()
    assert proc.returncode == code, proc.stderr.read()


def test_partial_files_of_a_killed_run_are_removed_by_the_next(work):
    out = work / "dwi_ivim"
    out.mkdir()
    for name in (".D.nii.gz.partial", ".fastivim.json.partial", ".fastivim.json.lock"):
        (out / name).write_bytes(b"left by a run killed with SIGKILL")
    r = invoke("run", "dwi.nii.gz", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert_one_run(out)


SLOW_BATCH = textwrap.dedent("""
    import sys, time
    from fastivim import batch
    real = batch.fit_series
    calls = []
    def fit_series(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the first series is done and in the table
            print("FITTED", flush=True)
            time.sleep(30)
        return real(*a, **k)
    batch.fit_series = fit_series
    from fastivim.cli import main
    sys.argv = ["fastivim"] + sys.argv[1:]
    main()
""")


def test_batch_stopped_by_sigterm_writes_its_summary(tmp_path):
    root = tmp_path / "bids"
    for sub in ("01", "02", "03"):
        dwi = root / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz"
        io.write_phantom(dwi, phantom((8, 8, 2), snr=40, seed=int(sub)))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BATCH, "batch", str(root), "-o",
                             str(tmp_path / "deriv"), "-q"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "FITTED", (line, proc.stderr.read() if proc.poll() else "")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 143, proc.stderr.read()
    from fastivim import batch

    rows = batch.read_summary(tmp_path / "deriv" / batch.SUMMARY_NAME)
    assert [r["status"] for r in rows] == ["ok", "pending", "pending"]


# ---------------------------------------------------------------- inputs are never outputs

def test_output_folder_over_the_input_is_refused(tmp_path, monkeypatch):
    """``cd d; fastivim run D.nii.gz -o . --overwrite`` replaced the input DWI with the D map."""
    d = tmp_path / "d"
    io.write_phantom(d / "D.nii.gz", phantom((8, 8, 2), snr=40, seed=2))
    before = (d / "D.nii.gz").read_bytes()
    monkeypatch.chdir(d)
    for extra in ([], ["--overwrite"]):
        r = invoke("run", "D.nii.gz", "-o", ".", *extra)
        assert r.exit_code == 1, r.output
        assert r.stderr.strip() == ("Error: D.nii.gz: is the input image of this run and would "
                                    "be replaced by an output; write the outputs elsewhere "
                                    "(-o DIR)"), r.stderr
    assert (d / "D.nii.gz").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["D.bval", "D.nii.gz", "D_truth"]


def test_mask_and_bvals_are_never_outputs(work):
    mask = nib.load(work / "dwi_truth" / "mask.nii.gz")
    (work / "o").mkdir()
    nib.save(mask, work / "o" / "status.nii.gz")
    r = invoke("run", "dwi.nii.gz", "--mask", "o/status.nii.gz", "-o", "o", "--overwrite")
    assert r.exit_code == 1 and "o/status.nii.gz: is the mask of this run" in r.stderr
    (work / "o" / "fastivim.json").write_text((work / "dwi.bval").read_text())
    r = invoke("run", "dwi.nii.gz", "--bvals", "o/fastivim.json", "-o", "o", "--overwrite")
    assert r.exit_code == 1 and "is the b-value file of this run" in r.stderr


# ---------------------------------------------------------------- files of an older run

def test_overwrite_removes_the_files_of_the_older_run(work):
    assert invoke("run", "dwi.nii.gz", "-q").exit_code == 0
    out = work / "dwi_ivim"
    for name in ("report.html", "report_maps.png", "report_decay.png"):
        (out / name).write_text("the report of the older run")
    (out / "notes.txt").write_text("the user's own file")
    r = invoke("run", "dwi.nii.gz", "--method", "full", "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert not {n for n in names if n.startswith("report")}, names
    assert "notes.txt" in names  # not a fastivim file: left alone
    assert assert_one_run(out)["method"] == "full"


def test_a_record_that_does_not_match_its_files_is_refused_by_readers(work):
    """A reader that checks the record (report, batch resume) never takes a mix for a run."""
    assert invoke("run", "dwi.nii.gz", "-q").exit_code == 0
    out = work / "dwi_ivim"
    assert invoke("run", "dwi.nii.gz", "-q", "-o", "other", "--method", "full").exit_code == 0
    (out / "f.nii.gz").write_bytes((work / "other" / "f.nii.gz").read_bytes())  # a mix
    with pytest.raises(ValueError, match="f.nii.gz: not the file fastivim.json describes"):
        io.load_output(out)


# ---------------------------------------------------------------- Ctrl-C latency

def test_ctrl_c_is_honoured_within_about_a_second_on_a_large_volume_with_q(tmp_path):
    shape = (128, 128, 128)  # 2.1 million voxels: the full fit takes many seconds
    ph = phantom(shape, snr=30, seed=0)
    img = nib.Nifti1Image(ph.signal, np.eye(4))
    nib.save(img, tmp_path / "big.nii")
    (tmp_path / "big.bval").write_text(" ".join(f"{b:g}" for b in ph.b_values))
    del ph, img
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    script = textwrap.dedent("""
        import sys
        from fastivim import fit
        real = fit.fit_ivim
        def announced(*a, **k):
            print("FITTING", flush=True)
            return real(*a, **k)
        fit.fit_ivim = announced  # before the modules that import it by name
        from fastivim.cli import main
        sys.argv = ["fastivim"] + sys.argv[1:]
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, "run", "big.nii", "--method", "full",
                             "--no-mask", "-q", "-o", "out"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "FITTING", (line, proc.stderr.read() if proc.poll() else "")
    time.sleep(1.0)  # well inside the fit
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    latency = time.perf_counter() - t0
    assert proc.returncode == 130, proc.stderr.read()
    assert latency < 2.0, f"Ctrl-C took {latency:.2f} s to stop the run"
    assert not (tmp_path / "out").exists()


def test_two_batches_into_one_derivatives_folder_one_refuses(tmp_path):
    from fastivim import batch
    from fastivim.io.write import OutputLock

    root = tmp_path / "bids"
    io.write_phantom(root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", phantom((8, 8, 2), seed=1))
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    other = OutputLock(deriv / f".{batch.SUMMARY_NAME}.lock")  # a batch running elsewhere
    other.acquire()
    try:
        r = invoke("batch", root, "-o", deriv, "-q")
        assert r.exit_code == 1, r.output
        assert r.output.count("\n") == 1 and "another fastivim run is writing here" in r.output
        assert not (deriv / batch.SUMMARY_NAME).exists()  # the other batch's table is its own
    finally:
        other.release()
    r = invoke("batch", root, "-o", deriv, "-q")
    assert r.exit_code == 0, r.output
    assert not list(deriv.glob(".*"))


def test_batch_does_not_reuse_a_series_whose_files_do_not_match_its_record(tmp_path):
    root = tmp_path / "bids"
    for sub in ("01", "02"):
        io.write_phantom(root / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz",
                         phantom((8, 8, 2), seed=int(sub)))
    deriv = tmp_path / "deriv"
    assert invoke("batch", root, "-o", deriv, "-q").exit_code == 0
    d1, d2 = deriv / "sub-01" / "dwi", deriv / "sub-02" / "dwi"
    (d1 / "sub-01_model-ivim_f.nii.gz").write_bytes((d2 / "sub-02_model-ivim_f.nii.gz")
                                                    .read_bytes())  # a mix in sub-01
    r = invoke("batch", root, "-o", deriv, "--dry-run")
    plan = {line.split()[0]: line.split()[1] for line in r.output.splitlines()[:2]}
    assert plan == {"sub-01": "fit", "sub-02": "skip"}, r.output


def test_a_file_system_without_locks_still_writes(work, monkeypatch):
    """Some network mounts refuse flock (ENOLCK): the run goes on, unlocked, all or nothing."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    r = invoke("run", "dwi.nii.gz", "-q")
    assert r.exit_code == 0, r.output
    assert assert_one_run(work / "dwi_ivim") is not None
    assert not list((work / "dwi_ivim").glob(".*"))
