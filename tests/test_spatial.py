"""The spatial method: lesions kept, accuracy and calibration against the truth of a lesion
phantom, volumes of every shape (a single slice, anisotropic voxels, holes, the field of
view's edge), refusals, determinism on any thread count, and the CLI with the affine's voxel
sizes. Tests that fit volumes are ``jit_only``: without the JIT (``make test-nojit``) each fit
would take minutes."""

from __future__ import annotations

import json

import nibabel as nib
import numba
import numpy as np
import pytest
from click.testing import CliRunner

import fastivim
import fastivim.kernels.status as status
from fastivim import cli
from fastivim.methods import spatial as sp
from fastivim.simulate import B_SCHEMES, lesion_contrast, lesion_phantom

SD_MAPS = ("D_sd", "D_star_sd", "f_sd", "S0_sd")
MAPS = ("S0", "f", "D_star", "D", "r_squared", "rmse") + SD_MAPS
VOX = (1.5, 1.5, 4.0)


@pytest.fixture(scope="module")
def ph():
    return lesion_phantom((64, 64, 3), b_values=B_SCHEMES["clinical11"], snr=25, seed=3,
                          voxel_size=VOX)


@pytest.fixture(scope="module")
def fits(ph):
    return {m: fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method=m,
                                 voxel_sizes=VOX)
            for m in ("segmented", "full", "bayesian", "spatial")}


def _rmse(res, ph, p, where):
    e = getattr(res, p)[where].astype(np.float64) - ph.truth()[p][where]
    e[~np.isfinite(e)] = np.inf  # a failed voxel is not forgiven
    return float(np.sqrt(np.mean(e**2)))


def _same(a, b):
    for name in MAPS + ("status",):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_spatial_beats_least_squares_and_bayesian_on_the_truth(ph, fits):
    body = ph.mask
    for p, target in (("f", 0.35), ("D_star", 0.45), ("D", 0.5)):
        ls = min(_rmse(fits["segmented"], ph, p, body), _rmse(fits["full"], ph, p, body))
        assert _rmse(fits["spatial"], ph, p, body) <= target * ls, p
        assert _rmse(fits["spatial"], ph, p, body) < _rmse(fits["bayesian"], ph, p, body), p


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_a_lesion_is_not_erased(ph, fits):
    assert ph.lesions.max() >= 5
    for p in ("f", "D"):
        kept = lesion_contrast(getattr(fits["spatial"], p), ph.truth()[p], ph)
        assert np.all(np.isfinite(kept)), p
        assert np.median(kept) >= 0.75, (p, kept)
        assert kept.min() > 0.2, (p, kept)  # no lesion is smoothed away


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_intervals_cover_the_truth_and_sds_are_always_given(ph, fits):
    res = fits["spatial"]
    assert res.method == "spatial" and res.prior == "empirical"
    assert res.noise_sigma == pytest.approx(ph.sigma, rel=0.1)
    body = ph.mask
    for name in SD_MAPS:
        sd = getattr(res, name)
        assert sd is not None and sd.shape == ph.mask.shape, name
        assert np.all(np.isfinite(sd[body])) and np.all(sd[body] > 0), name
        assert np.all(np.isnan(sd[~body])), name
    for p in ("f", "D"):
        est = getattr(res, p)[body].astype(np.float64)
        sd = getattr(res, p + "_sd")[body].astype(np.float64)
        cover = np.mean(np.abs(est - ph.truth()[p][body]) <= 1.96 * sd)
        assert 0.85 <= cover <= 0.995, (p, cover)


def test_fit_voxels_refuses_spatial_it_needs_a_volume(ph):
    with pytest.raises(ValueError, match="needs a volume"):
        fastivim.fit_voxels(ph.signal[ph.mask], ph.b_values, method="spatial")


@pytest.mark.parametrize("shape", [(40,), (4, 4, 2, 2)])
def test_a_volume_is_2d_or_3d(shape):
    signal = np.ones(shape + (8,), dtype=np.float32)
    b = [0, 10, 20, 50, 100, 200, 400, 800]
    with pytest.raises(ValueError, match="2-D or 3-D"):
        fastivim.fit_ivim(signal, b, method="spatial")


@pytest.mark.parametrize("sizes", [(1.5, 0.0, 4.0), (1.5, 1.5), (1.5, np.nan, 4.0), ("a", 1, 1)])
def test_bad_voxel_sizes_are_refused(ph, sizes):
    with pytest.raises(ValueError, match="voxel_sizes"):
        fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method="spatial",
                          voxel_sizes=sizes)


def test_simplified_model_refuses_spatial(ph):
    with pytest.raises(ValueError, match="ivim model only"):
        fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method="spatial",
                          model="simplified")


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_bitwise_identical_across_thread_counts_calls_and_seeds(ph):
    sub = (slice(8, 56), slice(8, 56), slice(0, 2))
    signal, mask = ph.signal[sub], ph.mask[sub]
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", seed=7,
                                voxel_sizes=VOX)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", seed=7,
                                voxel_sizes=VOX)
        again = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", seed=7,
                                  voxel_sizes=VOX)
    finally:
        numba.set_num_threads(threads)
    _same(one, two)
    _same(two, again)


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_a_single_slice_is_a_2d_volume(ph):
    sl = ph.signal[:, :, 1]
    m = ph.mask[:, :, 1]
    flat = fastivim.fit_ivim(sl, ph.b_values, mask=m, method="spatial", voxel_sizes=VOX[:2])
    thin = fastivim.fit_ivim(sl[:, :, None], ph.b_values, mask=m[:, :, None], method="spatial",
                             voxel_sizes=VOX)
    assert flat.shape == m.shape
    for name in MAPS + ("status",):
        np.testing.assert_array_equal(getattr(flat, name), getattr(thin, name)[:, :, 0], name)
    assert np.all(np.isfinite(flat.f[m])) and np.all(np.isfinite(flat.f_sd[m]))
    # a slice alone still pools its in-plane neighbours: better f than the per-voxel posterior
    bay = fastivim.fit_ivim(sl, ph.b_values, mask=m, method="bayesian")
    truth = ph.f[:, :, 1][m]
    assert (np.sqrt(np.mean((flat.f[m] - truth) ** 2))
            < np.sqrt(np.mean((bay.f[m] - truth) ** 2)))


def test_neighbourhood_is_a_radius_in_mm():
    offs, _, _ = sp.neighbourhood((1.5, 1.5, 4.0), 4.5)
    mm = offs * np.array([1.5, 1.5, 4.0])
    assert np.all(np.sqrt((mm**2).sum(axis=1)) <= 4.5 + 1e-9)
    assert not np.any(np.all(offs == 0, axis=1))
    # in-plane: 3 voxels each way; through-plane: only the 5 nearest of each adjacent slice
    assert np.abs(offs[:, 0]).max() == 3 and np.abs(offs[:, 2]).max() == 1
    assert np.sum(offs[:, 2] == 1) == 5 and np.sum(offs[:, 2] == 0) == 28
    iso, _, _ = sp.neighbourhood((1.5, 1.5, 1.5), 4.5)
    assert len(iso) > 3 * len(offs)  # isotropic voxels reach three slices each way
    thick, _, _ = sp.neighbourhood((1.5, 1.5, 6.0), 4.5)
    assert np.all(thick[:, 2] == 0)  # 6 mm slices are beyond the radius
    assert len(sp.neighbourhood((1.5, 1.5), 4.5)[0]) == 28  # a 2-D volume


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_anisotropic_voxels_change_the_neighbourhood(ph):
    sub = (slice(8, 56), slice(8, 56), slice(None))
    signal, mask = ph.signal[sub], ph.mask[sub]
    aniso = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial",
                              voxel_sizes=VOX)
    iso = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial",
                            voxel_sizes=(1.5, 1.5, 1.5))
    assert not np.array_equal(aniso.f, iso.f)
    # slices farther apart than the radius share no neighbours: how far does not matter
    apart = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial",
                              voxel_sizes=(1.5, 1.5, 50.0))
    far = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial",
                            voxel_sizes=(1.5, 1.5, 500.0))
    _same(apart, far)
    assert not np.array_equal(apart.f, aniso.f)


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_a_mask_with_holes_ignores_what_lies_outside(ph):
    sub = (slice(8, 56), slice(8, 56), slice(None))
    signal = ph.signal[sub].copy()
    mask = ph.mask[sub].copy()
    rng = np.random.default_rng(0)
    holes = rng.random(mask.shape) < 0.15
    mask &= ~holes
    res = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", voxel_sizes=VOX)
    assert np.all(np.isfinite(res.f[mask])) and np.all(np.isfinite(res.D_sd[mask]))
    assert np.all(np.isnan(res.f[~mask])) and np.all(res.status[~mask] == status.OUTSIDE_MASK)
    signal[~mask] = np.nan  # nothing outside the mask is read
    again = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", voxel_sizes=VOX)
    _same(res, again)


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_voxels_at_the_edge_of_the_field_of_view():
    """A tissue that fills the field of view: the corner and edge voxels (fewer neighbours)
    are fitted, and about as well as the interior ones."""
    full = lesion_phantom((40, 40, 2), b_values=B_SCHEMES["clinical11"], snr=25, seed=4,
                          n_lesions=0)
    inner = (slice(14, 26), slice(8, 32))  # a block inside the body, cut out
    signal = full.signal[inner]
    truth = full.D[inner]
    assert np.all(truth > 0)  # every voxel of the cut is tissue
    res = fastivim.fit_ivim(signal, full.b_values, method="spatial", voxel_sizes=VOX)
    assert np.all(np.isfinite(res.D)) and np.all(np.isfinite(res.D_sd))
    err = np.abs(res.D - truth) / truth
    edge = np.zeros(truth.shape, dtype=bool)
    edge[[0, -1], :, :] = True
    edge[:, [0, -1], :] = True
    assert np.median(err[edge]) < 2.0 * np.median(err[~edge]) + 0.02


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_a_voxel_with_bad_samples_fails_alone(ph):
    sub = (slice(8, 56), slice(8, 56), slice(0, 2))
    signal = ph.signal[sub].copy()
    mask = ph.mask[sub]
    i = tuple(np.argwhere(mask)[len(np.argwhere(mask)) // 2])
    signal[i][3] = np.nan
    res = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", voxel_sizes=VOX)
    assert res.status[i] == status.BAD_INPUT and np.isnan(res.f[i]) and np.isnan(res.f_sd[i])
    others = mask.copy()
    others[i] = False
    assert np.all(np.isfinite(res.f[others]))


@pytest.mark.jit_only  # whole-volume fits: minutes each without the JIT
def test_cli_run_spatial_takes_the_voxel_sizes_from_the_affine(tmp_path, monkeypatch):
    small = lesion_phantom((32, 32, 2), b_values=B_SCHEMES["clinical11"], snr=25, seed=5,
                           voxel_size=VOX)
    affine = np.diag(list(VOX) + [1.0])
    nib.save(nib.Nifti1Image(small.signal, affine), tmp_path / "dwi.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", small.b_values[None], fmt="%g")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.main, ["run", "dwi.nii.gz", "--method", "spatial", "--no-mask",
                                      "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "dwi_ivim"
    want = fastivim.fit_ivim(small.signal, small.b_values, method="spatial", voxel_sizes=VOX)
    for name in ("D", "D_star", "f", "S0") + SD_MAPS:
        got = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(got, getattr(want, name), name)
    rec = json.loads((out / "fastivim.json").read_text())
    assert rec["method"] == "spatial" and rec["prior"] == "empirical"
    iso = fastivim.fit_ivim(small.signal, small.b_values, method="spatial")
    assert not np.array_equal(iso.f, want.f)  # 1 mm voxels would have pooled other voxels


@pytest.mark.jit_only
def test_blocks_and_progress_bar_give_the_same_bits(ph, monkeypatch, capsys):
    """The volume runs in row blocks (Ctrl-C and the progress bar are honoured between them):
    a voxel's result must not depend on the block it falls in."""
    from fastivim.methods import _blocks

    sub = (slice(8, 56), slice(8, 56), slice(None))
    signal, mask = ph.signal[sub], ph.mask[sub]
    whole = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial", voxel_sizes=VOX)
    monkeypatch.setattr(_blocks, "PROGRESS_CHUNK", 997)
    monkeypatch.setattr(_blocks, "MAX_BLOCK", 997)
    assert mask.sum() > 3 * 997
    blocks = fastivim.fit_ivim(signal, ph.b_values, mask=mask, method="spatial",
                               voxel_sizes=VOX, progress=True)
    _same(whole, blocks)
    assert "vox" in capsys.readouterr().err  # the bar was drawn
