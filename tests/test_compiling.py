"""Compiling: one compile per method for every input dtype, said each time, ahead of time on
request (``fastivim compile``), and ``python -m fastivim``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fastivim
from fastivim import cli, compiling
from fastivim.kernels import bayes, block, simplified, spatial, uncertainty
from fastivim.methods import _blocks

TINY_KERNEL = textwrap.dedent(
    """
    from numba import njit

    @njit(cache=True)
    def tiny(x):
        return x + 1.0
    """
)


def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def watched_tiny(tmp_path):
    """A cached numba kernel in a throwaway module, watched like fastivim's own kernels."""
    from numba.core import event

    path = tmp_path / "tinymod.py"
    path.write_text(TINY_KERNEL)
    made = []

    def make(name):
        mod = _load_module(path, name)
        watcher = compiling._watcher_class()([mod.tiny])
        event.register("numba:compile", watcher)
        made.append(watcher)
        return mod.tiny

    yield make
    for w in made:
        event.unregister("numba:compile", w)


def test_a_compile_is_reported_with_its_measured_time_and_remembered(watched_tiny):
    notes = []
    tiny = watched_tiny("tinymod_a")
    with compiling.compile_notes(notes.append):
        assert tiny(1.0) == 2.0
    assert len(notes) == 2, notes
    assert notes[0].startswith("compiling tinymod_a.tiny for this machine, once")
    assert "cache" in notes[0]
    assert "last compile" not in notes[0]  # nothing measured before
    assert notes[1].startswith("compiled tinymod_a.tiny in ") and notes[1].endswith(
        "s (kept in the cache for later runs)")
    times = json.loads((Path(tiny._cache.cache_path) / compiling.TIMES_FILE).read_text())
    assert times["tinymod_a.tiny"] >= 0
    # a cached call compiles nothing: nothing said
    notes.clear()
    with compiling.compile_notes(notes.append):
        tiny(2.0)
    assert notes == []


def test_the_next_compile_quotes_the_last_measured_time(watched_tiny):
    first = watched_tiny("tinymod_b")
    with compiling.compile_notes(None):
        first(1.0)
    seconds = compiling.last_compile_seconds(first)
    assert seconds is not None
    # the same kernel in a fresh process finds its cache: emulate a new kernel version by
    # flushing the cache, then it compiles again and quotes the previous figure
    again = watched_tiny("tinymod_b")
    again._cache.flush()
    notes = []
    with compiling.compile_notes(notes.append):
        again(1.0)
    assert f"its last compile here took {seconds:.1f} s" in notes[0]


def test_without_logging_set_up_a_compile_is_a_warning():
    """A script that configured no logging still hears of a compile (a CompileWarning)."""
    code = ("from fastivim import compiling\n"
            "compiling._say('compiling the output kernel for this machine, once')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "CompileWarning: compiling the output kernel for this machine, once" in r.stderr
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n" + code)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "INFO:fastivim.compile:compiling the output kernel" in r.stderr
    assert "CompileWarning" not in r.stderr


@pytest.mark.jit_only
def test_one_compiled_signature_serves_every_input_dtype():
    """float64 (get_fdata), float32 and int16 input run the same compiled kernels."""
    ph = fastivim.simulate.phantom((6, 5, 4), snr=30, seed=2)
    inputs = (ph.signal.astype(np.float32), ph.signal.astype(np.float64),
              np.round(ph.signal).astype(np.int16), np.asfortranarray(ph.signal),
              ph.signal.astype(">f8"))
    ro = ph.signal.astype(np.float64)
    ro.flags.writeable = False
    for data in (*inputs, ro):
        for method in ("segmented", "full"):
            fastivim.fit_ivim(data, ph.b_values, method=method, uncertainty=True)
        fastivim.fit_ivim(data, ph.b_values, model="simplified")
    for method in ("bayesian", "spatial"):
        fastivim.fit_ivim(ro, ph.b_values, method=method)
        fastivim.fit_ivim(inputs[0], ph.b_values, method=method)
        fastivim.fit_ivim(inputs[2], ph.b_values, method=method)
    for d in (block.fit_segmented_blocks, block.fit_full_blocks, uncertainty.ls_uncertainty,
              simplified.fit_simplified_volume, bayes.posterior_volume, bayes.em_likelihoods,
              spatial.weighted_means, spatial.spatial_posterior):
        sigs = list(d.signatures)
        assert len(sigs) == 1, (d, sigs)
        assert str(sigs[0][0]) == "array(float64, 2d, C)"


def test_float64_rows_are_views_of_float64_and_exact_copies_of_float32():
    rng = np.random.default_rng(0)
    Y64 = rng.normal(100, 10, (50, 7))
    v = _blocks.float64_rows(Y64, 10, 20)
    assert np.shares_memory(v, Y64) and v.dtype == np.float64
    Y32 = Y64.astype(np.float32)
    buf = _blocks.convert_buffer(Y32, 16)
    c = _blocks.float64_rows(Y32, 3, 13, buf)
    assert np.shares_memory(c, buf) and c.flags.c_contiguous
    np.testing.assert_array_equal(c, Y32[3:13].astype(np.float64))
    assert _blocks.convert_rows(Y64) == 50 and _blocks.convert_rows(Y32) == _blocks.CONVERT_ROWS


def test_float32_blocks_give_the_same_bits_as_one_block(monkeypatch):
    """Converting a float32 matrix a few rows at a time changes no bit of any map."""
    ph = fastivim.simulate.phantom((3000,), snr=25, seed=8)
    Y = ph.signal.astype(np.float32)
    whole = fastivim.fit_voxels(Y, ph.b_values, method="segmented", uncertainty=True)
    monkeypatch.setattr(_blocks, "CONVERT_ROWS", 700)
    parts = fastivim.fit_voxels(Y, ph.b_values, method="segmented", uncertainty=True)
    as64 = fastivim.fit_voxels(Y.astype(np.float64), ph.b_values, method="segmented",
                               uncertainty=True)
    for name in ("S0", "f", "D_star", "D", "rmse", "D_sd", "f_sd"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), name)
        np.testing.assert_array_equal(getattr(as64, name), getattr(whole, name), name)


def test_float64_input_keeps_its_precision():
    """float64 input is not rounded to float32 on the way: a signal that float32 cannot hold
    gives other fits than its float32 rounding."""
    ph = fastivim.simulate.phantom((400,), snr=None, seed=3)
    Y = ph.signal.astype(np.float64) * (1 + 1e-9 * np.arange(ph.signal.shape[-1]))
    a = fastivim.fit_voxels(Y, ph.b_values, method="full")
    b = fastivim.fit_voxels(Y.astype(np.float32), ph.b_values, method="full")
    assert not np.array_equal(a.rmse, b.rmse)


def test_compile_command_prepares_the_named_kernels(monkeypatch):
    seen = []
    monkeypatch.setattr(compiling, "compile_kernels",
                        lambda targets: seen.append(targets) or {t: 0.5 for t in targets})
    r = CliRunner().invoke(cli.main, ["compile", "--method", "segmented", "--uncertainty", "-q"])
    assert r.exit_code == 0, r.output
    assert seen == [("segmented", "uncertainty")]
    assert "segmented    ready in   0.50 s" in r.stdout
    r = CliRunner().invoke(cli.main, ["compile"])
    assert r.exit_code == 0 and seen[-1] == compiling.TARGETS


def test_compile_kernels_runs_each_target_and_refuses_unknown_ones():
    seconds = compiling.compile_kernels(("segmented", "uncertainty", "simplified"))
    assert set(seconds) == {"segmented", "uncertainty", "simplified"}
    with pytest.raises(ValueError, match="unknown compile target"):
        compiling.compile_kernels(("segmentd",))
    assert compiling.targets_for("full", "ivim", True) == ("full", "uncertainty")
    assert compiling.targets_for("bayesian", "ivim", True) == ("bayesian",)
    assert compiling.targets_for("full", "simplified", False) == ("simplified",)


def test_every_cached_kernel_has_a_description():
    from fastivim.kernels import cached_kernels

    for d in cached_kernels():
        assert compiling.kernel_key(d) in compiling.DESCRIPTIONS, compiling.kernel_key(d)


def test_python_dash_m_fastivim_is_the_command():
    r = subprocess.run([sys.executable, "-m", "fastivim", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: fastivim ")
    assert "compile" in r.stdout and "run" in r.stdout


SECOND_PROCESS_CHILD = r"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from fastivim import compiling
from fastivim.kernels import block
compiling.compile_kernels(("bayesian",))
print(sum(block.fit_full_blocks.stats.cache_hits.values()),
      sum(block.fit_full_blocks.stats.cache_misses.values()))
"""


@pytest.mark.jit_only
@pytest.mark.skipif(compiling.usable_cpus() < 2, reason="one CPU: no second process is started")
def test_bayesian_first_compile_builds_full_in_a_second_process(tmp_path):
    """With an empty cache, the Bayesian target compiles the full kernel (its noise estimate)
    in a second process while this one compiles the Bayesian kernels; this process then loads
    full from the cache (a cache hit, no compile of it here) and says what happened."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", SECOND_PROCESS_CHILD], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    hits, misses = map(int, r.stdout.split()[-2:])
    assert (hits, misses) == (1, 0), r.stderr
    full = compiling.DESCRIPTIONS["fastivim.kernels.block.fit_full_blocks"]
    assert f"compiling {full} in a second process" in r.stderr
    assert f"compiling {full} for this machine" not in r.stderr  # never compiled here
    assert "compiling the Bayesian method's posterior kernel" in r.stderr


def test_no_second_process_when_full_is_compiled_or_one_cpu(monkeypatch):
    started = []
    monkeypatch.setattr(compiling, "start_compile_process", lambda t: started.append(t))
    monkeypatch.setattr(compiling, "is_compiled", lambda d: True)
    compiling._FullElsewhere().start("x")
    monkeypatch.setattr(compiling, "is_compiled", lambda d: False)
    monkeypatch.setattr(compiling, "usable_cpus", lambda: 1)
    compiling._FullElsewhere().start("x")
    assert started == []


def test_a_second_process_that_cannot_start_is_no_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert compiling.start_compile_process("full") is None


class _DoneChild:
    """Stands in for the second process's Popen: already finished, successfully."""

    returncode = 0

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0


def test_full_among_other_targets_compiles_elsewhere_and_is_waited_for_last(monkeypatch):
    monkeypatch.setattr(compiling, "is_compiled", lambda d: False)
    monkeypatch.setattr(compiling, "usable_cpus", lambda: 2)
    monkeypatch.setattr(compiling, "start_compile_process", lambda target: _DoneChild())
    order = []

    def fake_target(target, ph, full):
        order.append(target)
        if target == "full":
            full.wait()
        return 0.0

    monkeypatch.setattr(compiling, "_compile_target", fake_target)
    seconds = compiling.compile_kernels(("segmented", "full", "uncertainty"))
    assert order == ["segmented", "uncertainty", "full"]  # full: compiled elsewhere meanwhile
    assert list(seconds) == ["segmented", "full", "uncertainty"]
    assert seconds["full"] >= 0 and seconds["segmented"] == 0.0
    order.clear()
    monkeypatch.setattr(compiling, "usable_cpus", lambda: 1)
    compiling.compile_kernels(("segmented", "full"))
    assert order == ["segmented", "full"]  # one CPU: in order, here


def _second_compiles_for(cache: Path) -> list:
    """Live processes compiling ``full`` as a second process into ``cache`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"compile_kernels(('full',))" in cmd and f"NUMBA_CACHE_DIR={cache}".encode() in env:
            found.append(int(proc.name))
    return found


@pytest.mark.jit_only
@pytest.mark.skipif(not Path("/proc/self/environ").exists() or compiling.usable_cpus() < 2,
                    reason="needs Linux /proc and two CPUs (a second process)")
def test_ctrl_c_while_full_compiles_elsewhere_stops_the_second_process(tmp_path):
    import signal
    import time

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", SECOND_PROCESS_CHILD], env=env,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # wait until the second process has been started
            if "in a second process" in line:
                break
        assert _second_compiles_for(tmp_path), "no second process found"
        p.send_signal(signal.SIGINT)  # Ctrl-C, to this process only
        assert p.wait(timeout=120) != 0
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while _second_compiles_for(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _second_compiles_for(tmp_path) == [], "the second compile outlived the interrupt"
