"""The method registry (fastivim.methods): one module per estimator behind one table."""

from __future__ import annotations

import numpy as np
import pytest

import fastivim
from fastivim import methods
from fastivim.methods import REGISTRY, Method, MethodOutput
from fastivim.methods.least_squares import OUTPUT_COLUMNS
from fastivim.model import METHODS as DESCRIPTIONS

B = np.array([0.0, 10, 20, 50, 100, 200, 400, 800])


def test_every_described_method_is_registered_and_every_registered_one_described():
    assert set(REGISTRY) == set(DESCRIPTIONS)
    assert tuple(REGISTRY) == fastivim.METHODS
    for name, m in REGISTRY.items():
        assert m.name == name
        assert m.needs in methods.NEEDS and m.sd in methods.SD_POLICIES


def test_unknown_method_is_a_value_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="segmented"):
        methods.get("nope")


def _constant_method(needs):
    """A fake estimator: S0 = row mean, every other parameter fixed; records what it was given."""
    seen = {}

    def run(Y, req):
        seen["Y"], seen["req"] = Y, req
        n = Y.shape[0]
        out = np.zeros((n, len(OUTPUT_COLUMNS)), dtype=np.float32)
        out[:, 0] = Y.mean(axis=1)
        out[:, 1], out[:, 2], out[:, 3] = 0.1, 0.02, 1e-3
        return MethodOutput(out, np.zeros(n, dtype=np.uint8), None, {})

    return Method(name="segmented", needs=needs, run=run), seen


@pytest.mark.parametrize("needs", methods.NEEDS)
def test_a_new_method_is_one_registry_entry(monkeypatch, needs):
    """fit_ivim runs whatever the registry holds, passing the volume's geometry to it."""
    fake, seen = _constant_method(needs)
    monkeypatch.setitem(REGISTRY, "segmented", fake)
    signal = np.random.default_rng(0).uniform(1, 2, (3, 4, 2, B.size)).astype(np.float32)
    mask = np.ones((3, 4, 2), dtype=bool)
    mask[1, 2, 0] = False
    res = fastivim.fit_ivim(signal, B, mask=mask, method="segmented")
    assert seen["Y"].shape == (mask.sum(), B.size)
    assert seen["req"].spatial == (3, 4, 2)
    assert seen["req"].mask is not None and seen["req"].mask.sum() == mask.sum()
    np.testing.assert_allclose(res.S0[mask], signal[mask].mean(axis=1), rtol=1e-6)
    assert np.isnan(res.S0[1, 2, 0]) and res.status[1, 2, 0] == 6
    assert res.quality_mask.sum() == mask.sum()


def test_fit_voxels_refuses_a_method_that_needs_a_volume(monkeypatch):
    fake, seen = _constant_method("volume")
    monkeypatch.setitem(REGISTRY, "segmented", fake)
    with pytest.raises(ValueError, match="needs a volume"):
        fastivim.fit_voxels(np.ones((5, B.size)), B, method="segmented")
    assert not seen  # refused before any work


def test_fit_voxels_gives_a_voxel_method_no_geometry(monkeypatch):
    fake, seen = _constant_method("voxels")
    monkeypatch.setitem(REGISTRY, "segmented", fake)
    fastivim.fit_voxels(np.ones((5, B.size)), B, method="segmented")
    assert seen["req"].spatial is None
