"""The fastivim command through Click's CliRunner, and once as a real subprocess."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from fastivim import cli, io
from fastivim.simulate import phantom

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=float)


@pytest.fixture(scope="module")
def ph():
    return phantom((10, 10, 3), snr=50, seed=5)


@pytest.fixture()
def work(tmp_path, ph, monkeypatch):
    """A folder holding dwi.nii.gz + dwi.bval (a small noisy phantom); the command runs there."""
    io.write_phantom(tmp_path / "dwi.nii.gz", ph)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def files_under(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))


def test_run_default_output(work, ph):
    r = invoke("run", "dwi.nii.gz")
    assert r.exit_code == 0, r.output
    assert "using b-values from" in r.stderr and "dwi.bval" in r.stderr
    out = work / "dwi_ivim"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in io.map_paths(out))
    ref = nib.load(work / "dwi.nii.gz")
    for name in ("D", "D_star", "f", "S0", "R2", "RMSE", "quality_mask", "status"):
        img = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert img.header["sform_code"] == ref.header["sform_code"] == 2
        assert img.header["qform_code"] == ref.header["qform_code"] == 1
        assert img.header.get_xyzt_units()[0] == "mm"
    rec = json.loads((out / "fastivim.json").read_text())
    assert rec["command"] == "fastivim run dwi.nii.gz"
    assert rec["input"] == str(work / "dwi.nii.gz")
    assert rec["method"] == "segmented" and rec["b_values"] == B.tolist()
    # the table: medians in the quality mask, counts, time
    q = nib.load(out / "quality_mask.nii.gz").get_fdata() > 0
    d_med = np.median(nib.load(out / "D.nii.gz").get_fdata()[q]) * 1e3
    assert f"{d_med:.4g}" in r.stdout
    assert f"voxels fitted        {rec['voxels']['fitted']:,} of 300" in r.stdout
    assert f"passing quality      {int(q.sum()):,}" in r.stdout
    assert "voxels/s" in r.stdout
    # close to the truth where it passed quality (noise: medians, not single voxels)
    err = np.median(np.abs(nib.load(out / "D.nii.gz").get_fdata()[q] / ph.D[q] - 1))
    assert err < 0.15


def test_run_options_are_used(work):
    np.savetxt(work / "b.txt", B)  # one value per line
    mask = ph_mask = nib.load(work / "dwi_truth" / "mask.nii.gz")
    r = invoke("run", "dwi.nii.gz", "--bvals", "b.txt", "--mask", "dwi_truth/mask.nii.gz",
               "--method", "full", "--bounds", "f=0,0.5", "--bounds", "D=0.0002,0.004",
               "--b-threshold", "150", "--threads", "1", "-o", "out", "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # -q: no bar, no notes
    rec = json.loads((work / "out" / "fastivim.json").read_text())
    assert rec["method"] == "full" and rec["b_threshold"] == 150.0
    assert rec["bounds"]["f"] == [0.0, 0.5] and rec["bounds"]["D"] == [0.0002, 0.004]
    assert rec["threads"] == 1
    assert rec["mask_source"] == str(work / "dwi_truth" / "mask.nii.gz")
    assert rec["voxels"]["fitted"] == int(np.asarray(ph_mask.dataobj).sum())
    assert np.nanmax(nib.load(work / "out" / "f.nii.gz").get_fdata()) <= 0.5
    del mask


def test_no_mask_fits_every_voxel(work):
    r = invoke("run", "dwi.nii.gz", "--no-mask", "-q")
    assert r.exit_code == 0, r.output
    rec = json.loads((work / "dwi_ivim" / "fastivim.json").read_text())
    assert rec["voxels"]["fitted"] == 300 and rec["mask_source"] == "none"


def test_bids_output(work):
    r = invoke("run", "dwi.nii.gz", "--bids", "deriv", "--subject", "01", "--session", "02",
               "-q")
    assert r.exit_code == 0, r.output
    assert not (work / "dwi_ivim").exists()  # --bids alone writes only the BIDS layout
    d = work / "deriv" / "sub-01" / "ses-02" / "dwi"
    assert (d / "sub-01_ses-02_model-ivim_Dstar.nii.gz").is_file()
    assert (d / "sub-01_ses-02_model-ivim_qualitymask.json").is_file()
    desc = json.loads((work / "deriv" / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "fastivim"
    r = invoke("run", "dwi.nii.gz", "--bids", "deriv")
    assert r.exit_code == 2 and "--bids needs --subject" in r.output


def test_config_file_and_command_line_precedence(work):
    r = invoke("dump-defaults")
    assert r.exit_code == 0 and "method: segmented" in r.stdout
    text = r.stdout.replace("method: segmented", "method: full").replace(
        "overwrite: false", "overwrite: true")
    (work / "c.yaml").write_text(text)
    r = invoke("run", "--config", "c.yaml", "dwi.nii.gz", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((work / "dwi_ivim" / "fastivim.json").read_text())["method"] == "full"
    r = invoke("run", "--config", "c.yaml", "dwi.nii.gz", "--method", "segmented", "-q")
    assert r.exit_code == 0, r.output  # overwrite: true came from the file
    assert json.loads((work / "dwi_ivim" / "fastivim.json").read_text())["method"] == "segmented"


def test_progress_bar_on_large_volume_and_quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    io.write_phantom(tmp_path / "big.nii.gz", phantom((64, 64, 16), snr=30, seed=1))
    r = invoke("run", "big.nii.gz", "--no-mask")
    assert r.exit_code == 0, r.output
    assert "fitting" in r.stderr and "vox" in r.stderr
    r = invoke("run", "big.nii.gz", "--no-mask", "--overwrite", "-q")
    assert r.exit_code == 0 and r.stderr == ""


# ------------------------------------------------------------------------------- bad input

def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


BAD_CASES = {
    "missing file": (["run", "nope.nii.gz"], "nope.nii.gz: no such image"),
    "not a NIfTI": (["run", "junk.nii.gz"], "junk.nii.gz: not a NIfTI file"),
    "unreadable bvals": (["run", "dwi.nii.gz", "--bvals", "nofile.txt"],
                         "nofile.txt: no such b-value file"),
    "3D image": (["run", "vol3d.nii.gz", "--bvals", "dwi.bval"], "vol3d.nii.gz: a 3D image"),
    "count mismatch": (["run", "dwi.nii.gz", "--bvals", "short.bval"],
                       "short.bval: 8 b-values given but the signal has 10 samples"),
    "non-numeric bvals": (["run", "dwi.nii.gz", "--bvals", "text.bval"],
                          "text.bval: b-value 'ten' is not a number"),
    "negative bvals": (["run", "dwi.nii.gz", "--bvals", "neg.bval"],
                       "neg.bval: b-values must be >= 0"),
    "NaN bvals": (["run", "dwi.nii.gz", "--bvals", "nan.bval"], "nan.bval: b-values contain NaN"),
    "too few distinct": (["run", "dwi.nii.gz", "--bvals", "three.bval"],
                         "three.bval: IVIM needs at least 4 distinct b-values"),
    "mask grid": (["run", "dwi.nii.gz", "--mask", "small_mask.nii.gz"],
                  "small_mask.nii.gz: mask grid 5×5×3 does not match the image grid 10×10×3"),
    "empty mask": (["run", "dwi.nii.gz", "--mask", "empty_mask.nii.gz"],
                   "empty_mask.nii.gz: mask is empty"),
    "output exists": (["run", "dwi.nii.gz", "-o", "taken"],
                      "D.nii.gz: output exists (use --overwrite"),
    "unwritable output": (["run", "dwi.nii.gz", "-o", "afile/out"],
                          "cannot create output directory"),
    "malformed config": (["run", "--config", "bad.yaml", "dwi.nii.gz"],
                         "bad.yaml: unknown key 'treads'"),
    "config wrong type": (["run", "--config", "badtype.yaml", "dwi.nii.gz"],
                          "badtype.yaml: 'b_threshold' must be a finite number >= 0, got 'high'"),
    "segmented without high b": (["run", "dwi.nii.gz", "--b-threshold", "900"],
                                 "needs at least 2 distinct b-values >= b_threshold"),
}


@pytest.fixture()
def bad_inputs(work):
    (work / "junk.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _write(work / "vol3d.nii.gz", np.ones((4, 4, 4), np.float32))
    (work / "short.bval").write_text("0 10 20 30 50 80 100 200")
    (work / "text.bval").write_text("0 ten 20 30 50 80 100 200 400 800")
    (work / "neg.bval").write_text("0 10 20 30 50 80 100 200 400 -800")
    (work / "nan.bval").write_text("0 10 20 30 50 80 100 200 400 nan")
    (work / "three.bval").write_text("0 0 0 0 0 400 400 400 800 800")
    ref = nib.load(work / "dwi.nii.gz")
    _write(work / "small_mask.nii.gz", np.ones((5, 5, 3), np.uint8), ref.affine)
    _write(work / "empty_mask.nii.gz", np.zeros((10, 10, 3), np.uint8), ref.affine)
    (work / "taken").mkdir()
    (work / "taken" / "D.nii.gz").write_text("someone else's map")
    (work / "afile").write_text("x")
    (work / "bad.yaml").write_text("treads: 2\n")
    (work / "badtype.yaml").write_text("b_threshold: high\n")
    return work


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_clean_line(bad_inputs, case):
    args, message = BAD_CASES[case]
    before = files_under(bad_inputs)
    r = invoke(*args)
    assert r.exit_code == 1, (case, r.exit_code, r.output)
    # notes ("fastivim: using b-values from ...") may precede; the error is one line
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("fastivim: ")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert r.stdout == ""
    assert files_under(bad_inputs) == before  # nothing written, not even a directory
    assert (bad_inputs / "taken" / "D.nii.gz").read_text() == "someone else's map"


def test_bad_command_line_options(work):
    r = invoke("run", "dwi.nii.gz", "--bounds", "f=0.5")
    assert r.exit_code == 2 and "expected KEY=LO,HI" in r.output
    r = invoke("run", "dwi.nii.gz", "--bounds", "Dstar=0,1")
    assert r.exit_code == 2 and "unknown key 'Dstar'" in r.output
    r = invoke("run", "dwi.nii.gz", "--mask", "m.nii", "--no-mask")
    assert r.exit_code == 2 and "exclude each other" in r.output
    r = invoke("run", "dwi.nii.gz", "--bounds", "f=0.6,0.2")
    assert r.exit_code == 1 and "lower bound 0.6 is above upper bound 0.2" in r.stderr
    assert not (work / "dwi_ivim").exists()


def test_interrupted_write_leaves_no_finished_map(work, monkeypatch):
    from fastivim.io import write as io_write

    real = io_write.LayoutWriter.stage
    seen = []

    def interrupt_after_three(self, final, payload):
        seen.append(final)
        if len(seen) > 3:
            raise KeyboardInterrupt
        return real(self, final, payload)

    monkeypatch.setattr(io_write.LayoutWriter, "stage", interrupt_after_three)
    r = invoke("run", "dwi.nii.gz", "-q")
    assert r.exit_code == 130
    assert not (work / "dwi_ivim").exists()
    assert not list(work.rglob("*.partial"))


# ------------------------------------------------------------------------------- other commands

def test_simulate_and_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("simulate", "ph.nii.gz", "--shape", "8,8,2", "--snr", "40")
    assert r.exit_code == 0, r.output
    assert nib.load(tmp_path / "ph.nii.gz").shape == (8, 8, 2, 10)
    assert (tmp_path / "ph.bval").read_text().split() == [f"{b:g}" for b in B]
    assert (tmp_path / "ph_truth" / "D_star.nii.gz").is_file()
    r = invoke("demo", "--dir", "demo", "--shape", "16,16,2", "-q")
    assert r.exit_code == 0, r.output
    assert "error against the truth" in r.stdout
    for name in ("D ", "D_star", "f "):
        assert f"  {name}" in r.stdout
    assert (tmp_path / "demo" / "phantom_ivim" / "fastivim.json").is_file()
    r = invoke("demo", "--dir", "demo")
    assert r.exit_code == 1 and "not empty" in r.stderr


def test_report_hook(work, monkeypatch):
    import fastivim

    monkeypatch.setitem(sys.modules, "fastivim.report", None)  # not installed
    monkeypatch.delattr(fastivim, "report", raising=False)  # nor imported earlier
    r = invoke("run", "dwi.nii.gz", "-q", "--report")
    assert r.exit_code == 1 and "pip install fastivim[report]" in r.stderr
    assert (work / "dwi_ivim" / "fastivim.json").is_file()  # the maps were written first
    calls = []
    fake = types.ModuleType("fastivim.report")
    fake.report_from_output = lambda d: calls.append(Path(d)) or Path(d) / "report.html"
    monkeypatch.setitem(sys.modules, "fastivim.report", fake)
    monkeypatch.setattr(fastivim, "report", fake, raising=False)
    r = invoke("report", "dwi_ivim")
    assert r.exit_code == 0, r.output
    assert calls == [Path("dwi_ivim")] and "report.html" in r.stdout
    r = invoke("report", ".")
    assert r.exit_code == 1 and "no fastivim.json" in r.stderr


def test_real_subprocess(work):
    exe = Path(sys.executable).with_name("fastivim")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fastivim.cli"]
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    bad = subprocess.run(cmd + ["run", "missing.nii.gz"], capture_output=True, text=True,
                         cwd=work, env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == f"Error: {work / 'missing.nii.gz'}: no such image"
    good = subprocess.run(cmd + ["run", "dwi.nii.gz", "-q"], capture_output=True, text=True,
                          cwd=work, env=env)
    assert good.returncode == 0, good.stderr
    assert "passing quality" in good.stdout
    assert (work / "dwi_ivim" / "D.nii.gz").is_file()
    again = subprocess.run(cmd + ["run", "dwi.nii.gz"], capture_output=True, text=True,
                           cwd=work, env=env)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().endswith("output exists (use --overwrite to replace it)")


# ------------------------------------------------------------------------------- first touch

def test_first_compile_is_announced_on_stderr_but_not_under_quiet(work, monkeypatch):
    """What the compile watcher reports (fastivim.compile logger) reaches stderr as notes,
    outside the fit's timing and the voxels/s figure; nothing under -q."""
    import time

    from fastivim import compiling, pipeline

    real = pipeline.load_kernel

    def compiling_load(*args):
        compiling._say("compiling the segmented method's fitting kernel for this machine, once")
        time.sleep(0.3)
        compiling._say("compiled the segmented method's fitting kernel in 0.3 s")
        return real(*args)

    monkeypatch.setattr(pipeline, "load_kernel", compiling_load)
    r = invoke("run", "dwi.nii.gz")
    assert r.exit_code == 0, r.output
    assert "fastivim: compiling the segmented method's fitting kernel for this machine, once" \
        in r.stderr
    assert "fastivim: compiled the segmented method's fitting kernel in 0.3 s" in r.stderr
    assert "compiling" not in r.stdout
    rec = json.loads((work / "dwi_ivim" / "fastivim.json").read_text())
    assert rec["timings"]["load_kernel"] >= 0.3 > rec["timings"]["fit"]
    r = invoke("run", "dwi.nii.gz", "--overwrite", "-q")
    assert r.exit_code == 0 and r.stderr == ""
    monkeypatch.setattr(pipeline, "load_kernel", real)  # a cached kernel: no note
    r = invoke("run", "dwi.nii.gz", "--overwrite")
    assert r.exit_code == 0 and "fastivim: compil" not in r.stderr


def test_simplified_run_header_names_the_model(work):
    r = invoke("run", "dwi.nii.gz", "--model", "simplified", "-q")
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert "segmented fit of the simplified model of dwi.nii.gz" in first
    r = invoke("run", "dwi.nii.gz", "--overwrite", "-q")
    assert "simplified" not in r.stdout.splitlines()[0]


def test_bids_run_writes_the_batch_record_and_takes_prefixed_labels(work, monkeypatch):
    r = invoke("run", "dwi.nii.gz", "--bids", "deriv", "--subject", "sub-01", "--session",
               "ses-02", "-q")
    assert r.exit_code == 0, r.output
    d = work / "deriv" / "sub-01" / "ses-02" / "dwi"
    rec = json.loads((d / "sub-01_ses-02_model-ivim_fastivim.json").read_text())
    assert rec["input"] == str(work / "dwi.nii.gz") and rec["command"].startswith("fastivim run")
    assert rec["settings"]["method"] == "segmented" and rec["settings"]["mask"] == "auto"
    # the same record batch writes: batch would reuse this series as complete
    from fastivim import batch
    from fastivim.options import RunOptions

    series = batch.Series("01", "02", work / "dwi.nii.gz")
    assert batch.completed_record(series, work / "deriv", RunOptions()) == rec
    assert batch.completed_record(series, work / "deriv",
                                  RunOptions.build(method="full")) is None


def test_ctrl_c_exits_130_and_sigterm_143_after_cleaning_up(tmp_path):
    """A real process, interrupted while it fits: exit 130 (SIGINT) / 143 (SIGTERM), nothing
    left behind."""
    import signal
    import time

    io.write_phantom(tmp_path / "big.nii.gz", phantom((96, 96, 24), snr=30, seed=1))
    exe = Path(sys.executable).with_name("fastivim")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fastivim.cli"]
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen(cmd + ["run", "big.nii.gz", "--method", "full", "--no-mask",
                                       "-o", "out"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()  # the b-value note: the image is read, the fit starts
        assert "using b-values" in first, first
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (sig, proc.returncode, err)
        assert "Traceback" not in err and "Aborted" not in err
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.rglob("*.partial"))


def test_demo_removes_its_temporary_folder_unless_kept(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = invoke("demo", "--shape", "12,12,2", "-q")
    assert r.exit_code == 0, r.output
    assert list(tmp_path.iterdir()) == [] and "removed" in r.stdout
    r = invoke("demo", "--shape", "12,12,2", "-q", "--keep")
    assert r.exit_code == 0, r.output
    kept = list(tmp_path.iterdir())
    assert len(kept) == 1 and f"files: {kept[0] / 'phantom_ivim'}" in r.stdout
    assert (kept[0] / "phantom_ivim" / "fastivim.json").is_file()
