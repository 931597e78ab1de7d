"""`fastivim run` refuses inputs that would fool the fit, before any work, in one line.

Each case comes from trying the command the way a careful user or bad luck would: files in the
wrong unit, acquisitions that are not IVIM, files from other software (complex data, RGB,
headers that lie about their size, a NaN affine), sidecars with a byte-order mark, config files
with YAML's number quirks. Every refusal: exit status 1 (2 for a malformed command line), a
single ``Error:`` line that names the file and the problem, no traceback, no raw library warning,
and nothing written.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import assert_refused, invoke

from fastivim.simulate import phantom

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=float)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every command runs inside its test's folder (default outputs land in the current one)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def signal():
    return phantom((6, 5, 2), snr=50, seed=3).signal.astype(np.float32)


def _affine():
    return np.diag([2.0, 2.0, 3.0, 1.0])


def write_dwi(folder: Path, data, b=B, name="dwi.nii.gz", affine=None) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), path)
    (folder / (name.split(".")[0] + ".bval")).write_text(" ".join(f"{v:g}" for v in b) + "\n")
    return path


def nothing_written(folder: Path, before: set) -> bool:
    return {p.relative_to(folder) for p in folder.rglob("*")} == before


def snapshot(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


# -- units and acquisitions ---------------------------------------------------------------------

@pytest.mark.parametrize("factor, words", [(1e6, "s/m²"), (1e-3, "ms/µm²")])
def test_b_values_in_the_wrong_unit(tmp_path, signal, factor, words):
    dwi = write_dwi(tmp_path, signal, b=B * factor)
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "-q")
    assert_refused(r, "dwi.bval", words)
    assert nothing_written(tmp_path, before)


def test_dti_shell_is_not_ivim(tmp_path):
    b = np.array([0, 0, 995, 997, 1000, 1003, 1005, 998.0])
    data = np.abs(np.random.default_rng(0).normal(100, 5, (4, 4, 2, b.size))).astype(np.float32)
    dwi = write_dwi(tmp_path, data, b=b)
    r = invoke("run", dwi, "-q")
    assert_refused(r, "dwi.bval", "not an IVIM acquisition")


@pytest.mark.parametrize("bound, words", [("D_star=0,0", "can never exceed D"),
                                          ("D_star=10,100", "µm²/ms")])
def test_bounds_that_cannot_be_met(tmp_path, signal, bound, words):
    dwi = write_dwi(tmp_path, signal)
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "--bounds", bound, "-q")
    assert r.exit_code in (1, 2), r.output
    assert words in r.stderr
    assert nothing_written(tmp_path, before)


# -- files from other software ------------------------------------------------------------------

def test_complex_nifti_is_refused(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal.astype(np.complex64))
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "-q")
    assert_refused(r, "dwi.nii.gz", "complex", "magnitude")
    assert "ComplexWarning" not in r.stderr
    assert nothing_written(tmp_path, before)


def test_rgb_nifti_is_refused(tmp_path):
    rgb = np.zeros((4, 4, 2, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    dwi = write_dwi(tmp_path, rgb)
    r = invoke("run", dwi, "-q")
    assert_refused(r, "dwi.nii.gz", "RGB")


def _nifti1_bytes(dims, datatype=16, bitpix=32, payload=b"", affine=None) -> bytes:
    """A raw NIfTI-1 single file: a 348-byte header that says ``dims``, then ``payload``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    raw = bytearray(hdr.binaryblock)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    raw[40:56] = struct.pack("<8h", *dim)
    raw[70:72] = struct.pack("<h", datatype)
    raw[72:74] = struct.pack("<h", bitpix)
    raw[108:112] = struct.pack("<f", 352.0)  # vox_offset
    if affine is not None:
        raw[254:256] = struct.pack("<h", 1)  # sform_code
        raw[280:328] = struct.pack("<12f", *np.asarray(affine, dtype=np.float32)[:3].ravel())
    return bytes(raw) + b"\0" * 4 + payload


@pytest.mark.parametrize("dims, words", [
    ((400, 400, 400, 10), "holds"),        # 2.56 GB declared, a few KB stored
    ((32000, 32000, 32000, 10), "holds"),  # beyond any memory
    ((10, -4, 3, 10), "dimension"),        # negative size
])
def test_header_that_lies_about_its_size(tmp_path, dims, words):
    path = tmp_path / "dwi.nii.gz"
    path.write_bytes(gzip.compress(_nifti1_bytes(dims, payload=b"\0" * 40_000)))
    (tmp_path / "dwi.bval").write_text(" ".join(f"{v:g}" for v in B))
    r = invoke("run", path, "-q")
    assert_refused(r, "dwi.nii.gz", words)


def test_nan_affine_is_refused_before_the_fit(tmp_path, signal):
    affine = _affine()
    affine[0, 0] = np.nan
    path = tmp_path / "dwi.nii"
    data = np.ascontiguousarray(signal)
    raw = _nifti1_bytes(data.shape, payload=data.astype("<f4").tobytes(order="F"),
                        affine=affine)
    path.write_bytes(raw)
    (tmp_path / "dwi.bval").write_text(" ".join(f"{v:g}" for v in B))
    before = snapshot(tmp_path)
    r = invoke("run", path, "-q")
    assert_refused(r, "dwi.nii", "affine")
    assert nothing_written(tmp_path, before)


def test_bvecs_with_nan_are_refused_before_any_output(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    bvecs = np.ones((3, B.size))
    bvecs[1, 4] = np.nan
    np.savetxt(tmp_path / "dwi.bvec", bvecs)
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "--bvecs", tmp_path / "dwi.bvec", "--bids", tmp_path / "deriv",
               "--subject", "01", "-o", tmp_path / "out", "-q")
    assert_refused(r, "dwi.bvec")
    assert nothing_written(tmp_path, before)


def test_bval_with_byte_order_mark_is_read(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    (tmp_path / "dwi.bval").write_bytes("\ufeff".encode() + " ".join(
        f"{v:g}" for v in B).encode() + b"\n")
    r = invoke("run", dwi, "-q", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "D.nii.gz").is_file()


def test_cannot_write_names_the_path(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the output folder should go")
    r = invoke("run", dwi, "-o", blocker / "sub", "-q")
    assert_refused(r, "blocked")
# -- config files and output paths ---------------------------------------------------------------

def test_yaml_exponent_numbers_are_numbers(tmp_path, signal):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: bounds written that way must still work."""
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("bounds:\n  D: [1e-4, 3e-3]\n  D_star: [5e-3, 1e-1]\n")
    r = invoke("run", "--config", cfg, dwi, "-q", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    import json
    rec = json.loads((tmp_path / "out" / "fastivim.json").read_text())
    assert rec["bounds"]["D"] == [1e-4, 3e-3]


@pytest.mark.parametrize("text", ["b_threshold: lots\n", "threads: -3\n", "b_threshold: [1]\n",
                                  "b_threshold: -5\n", "threads: 0\n", "threads: 100000\n",
                                  "method: fast\n"])
def test_config_errors_name_the_file(tmp_path, signal, text):
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = invoke("run", "--config", cfg, dwi, "-q")
    assert_refused(r, "bad.yaml")


def test_empty_output_folder_name_is_refused(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "-o", "", "-q")
    assert r.exit_code in (1, 2)
    assert "Error" in r.stderr
    assert nothing_written(tmp_path, before)




def _warn_then(real, fail):
    """``real`` wrapped to emit a library-style warning first, then fail or go on."""
    import warnings

    def wrapped(*args, **kwargs):
        warnings.warn("invalid value encountered in divide", RuntimeWarning, stacklevel=2)
        if fail:
            raise ValueError("dwi.nii.gz: something the reader refused")
        return real(*args, **kwargs)

    return wrapped


def test_library_warnings_never_reach_stderr_raw(tmp_path, signal, monkeypatch):
    """A refusal is one ``Error:`` line even when a library warned first; a run that succeeds
    shows the warning as a ``fastivim: warning:`` note (and not at all under -q)."""
    import fastivim.pipeline as pipeline

    dwi = write_dwi(tmp_path, signal)
    real = pipeline.load_dwi
    monkeypatch.setattr(pipeline, "load_dwi", _warn_then(real, fail=True))
    assert_refused(invoke("run", dwi), "dwi.nii.gz", "refused")
    monkeypatch.setattr(pipeline, "load_dwi", _warn_then(real, fail=False))
    r = invoke("run", dwi, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "fastivim: warning: invalid value encountered in divide" in r.stderr
    assert "RuntimeWarning" not in r.stderr
    r = invoke("run", dwi, "-o", tmp_path / "out2", "-q")
    assert r.exit_code == 0 and r.stderr == ""


class _InterruptedWhileCollected:
    """Garbage whose finaliser receives Ctrl-C: Python swallows the KeyboardInterrupt there."""

    def __del__(self):
        import signal

        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_during_garbage_collection_still_interrupts(tmp_path, signal, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt lands in a finaliser used to be printed as "Exception
    ignored" and the run went on to exit 0; it now stops the run as interrupted (130)."""
    import time

    import fastivim.pipeline as pipeline

    dwi = write_dwi(tmp_path, signal)
    real = pipeline.load_dwi

    def load_with_gc(*args, **kwargs):
        obj = _InterruptedWhileCollected()
        del obj  # collected here: the signal arrives inside __del__
        time.sleep(2.0)  # a stretch of work, during which the interrupt must land
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_dwi", load_with_gc)
    r = invoke("run", dwi, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 130, r.output
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr
    assert "interrupted" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_full_disk_names_the_file(tmp_path, signal, monkeypatch):
    """"cannot write" errors name the path (a full disk raises an OSError without a file name)
    and leave nothing behind."""
    import errno

    import fastivim._atomic as atomic_mod

    def _full(fd, payload):  # every file fastivim writes goes through this one call
        raise OSError(errno.ENOSPC, "No space left on device")

    dwi = write_dwi(tmp_path, signal)
    before = snapshot(tmp_path)
    monkeypatch.setattr(atomic_mod, "_write_fd", _full)
    r = invoke("run", dwi, "-o", tmp_path / "out", "-q")
    assert_refused(r, str(tmp_path / "out"), "No space left on device")
    assert nothing_written(tmp_path, before)


def test_options_that_exclude_each_other_in_a_config_file_name_it(tmp_path, signal):
    dwi = write_dwi(tmp_path, signal)
    cfg = tmp_path / "cg.yaml"
    cfg.write_text("method: bayesian\nmodel: simplified\n")
    r = invoke("run", "--config", cfg, dwi, "-q")
    assert_refused(r, "cg.yaml", "bayesian")


def test_b_threshold_beyond_the_b_values_is_refused_before_any_work(tmp_path, signal):
    """A b_threshold that leaves the segmented step fewer than 2 high b-values is refused while
    the b-values are read (naming the file), not after the data read and the kernel load."""
    dwi = write_dwi(tmp_path, signal)
    before = snapshot(tmp_path)
    r = invoke("run", dwi, "--b-threshold", "500", "-q", "-o", tmp_path / "new" / "deep")
    assert_refused(r, "dwi.bval", "b_threshold")
    assert nothing_written(tmp_path, before)
