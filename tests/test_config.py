"""Config files (fastivim.config) and the options object they build (fastivim.options)."""

from dataclasses import fields
from pathlib import Path

import pytest

import fastivim
from fastivim import config as cfg
from fastivim import options


def test_dump_defaults_round_trips(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(cfg.dump_defaults())
    loaded = cfg.load_config(f)
    want = cfg.defaults()
    want["bounds"] = fastivim.resolve_bounds(want["bounds"])
    assert set(loaded) == set(want)
    assert loaded == want
    assert all(f"# {o.help}" in f.read_text() for o in cfg.OPTIONS)


@pytest.mark.parametrize("text, message", [
    ("methd: full\n", "unknown key 'methd'"),
    ("threads: four\n", "'threads' must be a positive integer or null, got 'four'"),
    ("overwrite: 1\n", "'overwrite' must be true or false"),
    ("method: fast\n", "'method' must be 'segmented' or 'full'"),
    ("b_threshold: [1]\n", "'b_threshold' must be a finite number"),
    ("bounds: {Dstar: [0, 1]}\n", "unknown key 'bounds.Dstar'"),
    ("bounds: {f: [0.5, 0.1]}\n", "lower bound 0.5 is above upper bound 0.1"),
    ("bounds: {f: 3}\n", "'bounds.f' must be \\[lower, upper\\]"),
    ("subject: 01\n", "'subject' must be a quoted label"),
    ("method: [unclosed\n", "not valid YAML at line"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message) as err:
        cfg.load_config(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    conf_dir = tmp_path / "study" / "conf"
    conf_dir.mkdir(parents=True)
    f = conf_dir / "c.yaml"
    f.write_text("bvals: ../data/dwi.bval\nmask: /abs/mask.nii.gz\nout_dir: out\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the result must not depend on it
    loaded = cfg.load_config(f)
    assert loaded["bvals"] == conf_dir / "../data/dwi.bval"
    assert loaded["mask"] == Path("/abs/mask.nii.gz")
    assert loaded["out_dir"] == conf_dir / "out"
    assert "relative to the\n# folder of this file" in cfg.dump_defaults()


def test_every_default_is_the_options_default():
    """One place for each default: the table, RunOptions() and FitOptions() agree."""
    run = options.RunOptions()
    fit_keys = {f.name for f in fields(options.FitOptions)}
    assert {"method", "b_threshold", "bounds", "model", "uncertainty", "seed"} == fit_keys
    for o in options.OPTIONS:
        got = getattr(run.fit, o.key) if o.key in fit_keys else getattr(run, o.key)
        assert got == o.default, o.key
    assert dict(run.fit.bounds) == fastivim.DEFAULT_BOUNDS
    assert fastivim.fit.B_THRESHOLD == run.fit.b_threshold


@pytest.mark.parametrize("given, want", [("01", "01"), ("sub-01", "01"), ("sub-ab1", "ab1")])
def test_subject_label_with_or_without_prefix(given, want):
    o = options.RunOptions.build(bids="d", subject=given, session="ses-" + want)
    assert o.subject == want and o.session == want


@pytest.mark.parametrize("kw, message", [
    ({"method": "fast"}, "unknown method 'fast'; valid methods are segmented, full"),
    ({"b_threshold": -1}, "b_threshold must be a finite number >= 0"),
    ({"bounds": {"f": (0.5, 0.1)}}, "lower bound 0.5 is above upper bound 0.1"),
    ({"threads": 0}, "'threads' must be a positive integer"),
    ({"subject": "sub_01", "bids": "d"}, "'subject' must be a letters-and-digits label"),
    ({"mask": "m.nii", "no_mask": True}, "exclude each other"),
    ({"subject": "01"}, "need --bids"),
    ({"nope": 1}, "unknown option 'nope'"),
])
def test_options_refuse_bad_values(kw, message):
    with pytest.raises(options.OptionError, match=message):
        options.RunOptions.build(kw)


def test_options_are_frozen():
    o = options.RunOptions.build(method="full")
    with pytest.raises(AttributeError):
        o.method = "segmented"
    with pytest.raises(TypeError):
        o.fit.bounds["f"] = (0, 1)
    assert o.replace(method="segmented").fit.method == "segmented" and o.fit.method == "full"
