"""Quality-control report: parameter maps, histograms, signal decay with the fit, summary table.

Nobody trusts IVIM maps without looking at them. This module draws, from an
:class:`~fastivim.IVIMResult` and the signal it was fitted to:

* :func:`plot_maps` — D, D_star, f, S0, R² and the quality mask on a few representative slices;
* :func:`plot_histograms` — D, D_star, f inside the quality mask (median marked) and R²;
* :func:`plot_decay` — measured signal of sample voxels with the fitted curve, linear and log;
* :func:`summary` / :func:`summary_html` — medians, IQRs, voxel counts, method, bounds, timings;

and :func:`make_report` writes them all as ``report.html`` (figures embedded, so the file is
self-contained) with the PNGs beside it. :func:`report_from_output` does the same from the output
directory of ``fastivim run`` (what ``fastivim report OUT_DIR`` and ``fastivim run --report``
call).

Every figure is a :class:`matplotlib.figure.Figure` drawn on an Agg canvas: pyplot, and with it
the global backend, is never touched. matplotlib is the optional extra ``fastivim[report]``; it
is imported only when a figure is drawn, and its absence raises :class:`ImportError` saying how to
install it. ``import fastivim`` never imports this module.

Colour ranges are fixed (see :data:`DISPLAY`, from the map table :data:`fastivim.model.MAPS`), so
maps of different subjects compare at a
glance; values beyond a range take the end colour (the colour bar shows an arrow):

========  ===================  ==========  ==========================================
map       range                scale       colour map
========  ===================  ==========  ==========================================
D         0 – 3 ×10⁻³ mm²/s    linear      viridis
D_star    2 – 100 ×10⁻³ mm²/s  log         plasma
f         0 – 0.5              linear      cividis
S0        0 – 99th percentile  linear      gray (S0 is in the input's arbitrary units)
R²        0.5 – 1              linear      YlGnBu (reversed)
quality   not fitted / failed / passed     black / orange / green
========  ===================  ==========  ==========================================

Voxels that were not fitted (outside the mask) or whose fit failed (NaN) are black.
"""

from __future__ import annotations

import base64
import html
import io as _io
import math
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from ._atomic import check_owned, partial_path
from .io.layout import REPORT_FILES
from .kernels import status as st
from .model import MAPS, ivim_signal

#: Resolution of every figure (pixels per inch); sizes below are in inches.
DPI = 100

#: Slices shown by :func:`plot_maps` when none are given.
N_SLICES = 4

#: Sample voxels drawn by :func:`plot_decay` when none are given.
N_VOXELS = 6

_BAD_COLOUR = "black"
_QUALITY_COLOURS = ("#000000", "#e66101", "#1b9e77")  # not fitted, failed, passed
_QUALITY_LABELS = ("not fitted", "failed", "passed")


#: Display of each map that has one (keys are :class:`~fastivim.IVIMResult` attributes), from
#: the map table :data:`fastivim.model.MAPS`.
DISPLAY = {m.attr: m.display for m in MAPS if m.display is not None}

#: Rows of :func:`plot_maps`, top to bottom (``quality_mask`` is the categorical row); a map the
#: result does not hold (D_star of the simplified model) is left out.
MAP_ROWS = ("D", "D_star", "f", "S0", "r_squared", "quality_mask")

#: Uncertainty rows, drawn after :data:`MAP_ROWS` when the result holds them.
SD_ROWS = ("D_sd", "D_star_sd", "f_sd", "S0_sd")


def map_rows(result) -> tuple:
    """The rows :func:`plot_maps` draws for ``result``: :data:`MAP_ROWS` and :data:`SD_ROWS`
    that it holds."""
    return tuple(n for n in MAP_ROWS + SD_ROWS
                 if n == "quality_mask" or getattr(result, n, None) is not None)


# ------------------------------------------------------------------------------ matplotlib

def _one_line_cause(exc) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


def _mpl():
    """Import what the figures need, or raise ImportError with the install hint."""
    try:
        import matplotlib
        from matplotlib import colors, ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"the report needs matplotlib ({_one_line_cause(exc)}): "
                          f"pip install fastivim[report]") from None
    return matplotlib, Figure, FigureCanvasAgg, colors, ticker


def _figure(width, height):
    """A constrained-layout Figure on its own Agg canvas (no pyplot, no global backend)."""
    _, Figure, FigureCanvasAgg, _, _ = _mpl()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The PNG bytes of a figure at its own size and :data:`DPI` (no tight cropping)."""
    _, _, FigureCanvasAgg, _, _ = _mpl()
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi,
                metadata={"Software": f"fastivim {__version__} (matplotlib)"})
    return buf.getvalue()


# ------------------------------------------------------------------------------- selection

def _fitted(result) -> np.ndarray:
    """Voxels the fit was run on (status other than outside-mask)."""
    return np.asarray(result.status) != st.OUTSIDE_MASK


def representative_slices(result, n: int = N_SLICES) -> list:
    """Indices along the last spatial axis of up to ``n`` slices spread over the fitted voxels.

    The slices sit at fractions 1/(n+1), …, n/(n+1) of the extent of slices that hold a fitted
    voxel (all slices when none does), so the same volume always gives the same slices; every
    slice of that extent when it has ``n`` or fewer.
    """
    shape = result.shape
    if len(shape) < 3:
        return [0]
    nz = shape[-1]
    fitted = _fitted(result).reshape(-1, nz).any(axis=0)
    zs = np.flatnonzero(fitted)
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, nz - 1)
    n = max(1, int(n))
    if n >= hi - lo + 1:
        return list(range(lo, hi + 1))
    picks = np.round(lo + (hi - lo) * np.arange(1, n + 1) / (n + 1)).astype(int)
    return sorted(set(int(z) for z in picks))


def sample_voxels(result, n: int = N_VOXELS, seed: int = 0) -> list:
    """Choose ``n`` voxels to plot, reproducibly; return ``[(index_tuple, label), ...]``.

    About two thirds come from the quality mask at evenly spaced R² percentiles (5th to 95th,
    worst fit first); the rest are fitted voxels that failed the quality checks, drawn with a
    seeded generator. Either group fills in when the other runs short. Vectorised: a sort of
    the quality voxels' R², never a Python loop over voxels.
    """
    status = np.asarray(result.status).ravel()
    quality = np.flatnonzero(status == st.OK)
    failed = np.flatnonzero((status != st.OK) & (status != st.OUTSIDE_MASK))
    n = int(n)
    n_fail = min(failed.size, n // 3)
    n_q = min(quality.size, n - n_fail)
    n_fail = min(failed.size, n - n_q)
    picks = []
    if n_q:
        r2 = np.asarray(result.r_squared).ravel()[quality]
        order = np.argsort(r2, kind="stable")
        pct = np.linspace(5, 95, n_q) if n_q > 1 else np.array([50.0])
        ranks = np.round(pct / 100 * (quality.size - 1)).astype(int)
        for p, r in zip(pct, ranks, strict=True):
            picks.append((int(quality[order[r]]), f"passed, R² {_ordinal(p)} percentile"))
    if n_fail:
        rng = np.random.default_rng(seed)
        for i in np.sort(rng.choice(failed.size, n_fail, replace=False)):
            code = int(status[failed[i]])
            picks.append((int(failed[i]), f"failed: {st.STATUS_MEANINGS[code]}"))
    shape = result.shape
    return [(tuple(int(v) for v in np.unravel_index(i, shape)), label) for i, label in picks]


def _ordinal(p: float) -> str:
    k = int(round(p))
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


# ------------------------------------------------------------------------------- figures

def _s0_vmax(result, name="S0") -> float:
    """99th percentile of a map in arbitrary units (S0, or S0_sd) in the quality mask."""
    m = np.asarray(getattr(result, name))
    s0 = m[np.asarray(result.quality_mask)]
    s0 = s0[np.isfinite(s0)]
    if s0.size == 0:
        s0 = m[np.isfinite(m)]
    v = float(np.percentile(s0, 99)) if s0.size else 1.0
    return v if v > 0 else 1.0


def _range(name, result, ranges):
    d = DISPLAY[name]
    if ranges and name in ranges:
        return tuple(float(v) for v in ranges[name])
    return d.vmin, (d.vmax if d.vmax is not None else _s0_vmax(result, name) * d.scale)


def _log_ticks(ax_or_cbar_axis, lo, hi):
    _, _, _, _, ticker = _mpl()
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax_or_cbar_axis.set_major_locator(ticker.FixedLocator(ticks))
    ax_or_cbar_axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_or_cbar_axis.set_minor_formatter(ticker.NullFormatter())


def _log_axis_ticks(axis, *values):
    """Plain-number ticks (300, 500, 1000) on a log axis: denser when it spans a decade or less."""
    _, _, _, _, ticker = _mpl()
    v = np.concatenate([np.ravel(x) for x in values if x is not None])
    v = v[np.isfinite(v) & (v > 0)]
    decades = math.log10(v.max() / v.min()) if v.size else 1.0
    subs = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if decades <= 1 else (
        (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,))
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_maps(result, slices=None, voxel_size=None, ranges=None):
    """Parameter maps on a few slices: one row per map, one column per slice.

    Parameters
    ----------
    result : IVIMResult
        Maps of 2 or 3 spatial dimensions (X, Y[, Z]).
    slices : sequence of int, optional
        Indices along Z; default :func:`representative_slices`.
    voxel_size : (dx, dy[, dz]) in mm, optional
        Sets the in-plane aspect ratio (default square voxels).
    ranges : dict, optional
        ``{name: (lo, hi)}`` in display units over :data:`DISPLAY`, e.g. ``{"f": (0, 0.3)}``.

    Returns
    -------
    matplotlib.figure.Figure
        Rows D, D*, f, S0, R², quality mask; each with a colour bar in its units. Slices are
        drawn with x to the right and y up (``origin="lower"``).
    """
    _, _, _, colors, _ = _mpl()
    shape = result.shape
    if len(shape) not in (2, 3):
        raise ValueError(f"maps need 2 or 3 spatial dimensions, got shape {shape}")
    if slices is None:
        slices = representative_slices(result)
    slices = [int(z) for z in slices]
    if len(shape) == 3:
        for z in slices:
            if not 0 <= z < shape[2]:
                raise ValueError(f"slice {z} outside 0..{shape[2] - 1}")
    rows = map_rows(result)
    nx, ny = shape[0], shape[1]
    dx, dy = (1.0, 1.0) if voxel_size is None else (float(voxel_size[0]), float(voxel_size[1]))
    aspect = dy / dx
    panel_w = 2.1
    panel_h = float(np.clip(panel_w * (ny * dy) / (nx * dx), 1.2, 3.5))
    ncol = len(slices)
    # one slice (or a 2-D map): the maps side by side in a grid, each with its colour bar,
    # rather than a one-column strip six maps tall
    grid = ncol == 1
    if grid:
        gcols = 3
        grows = -(-len(rows) // gcols)
        fig = _figure((panel_w + 1.0) * gcols + 0.3, (panel_h + 0.45) * grows + 0.6)
        flat = fig.subplots(grows, gcols, squeeze=False).ravel()
        for ax in flat[len(rows):]:
            ax.set_visible(False)
        axes = flat[: len(rows)].reshape(-1, 1)
    else:
        fig = _figure(panel_w * ncol + 1.9, panel_h * len(rows) + 0.6)
        axes = fig.subplots(len(rows), ncol, squeeze=False)
    nz_total = shape[2] if len(shape) == 3 else 1

    def cut(arr, z):
        a = np.asarray(arr)
        return (a[:, :, z] if a.ndim == 3 else a).T

    for row, name in enumerate(rows):
        if name == "quality_mask":
            cmap = colors.ListedColormap(_QUALITY_COLOURS)
            norm = colors.BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3)
            fitted = _fitted(result)
            level = np.where(np.asarray(result.quality_mask), 2, np.where(fitted, 1, 0))
            data = {z: cut(level, z) for z in slices}
            label = "quality mask"
        else:
            d = DISPLAY[name]
            lo, hi = _range(name, result, ranges)
            cmap = _cmap(d.cmap)
            norm = (colors.LogNorm(lo, hi) if d.log else colors.Normalize(lo, hi))
            data = {z: cut(getattr(result, name), z).astype(np.float64) * d.scale
                    for z in slices}
            label = d.axis_label
        im = None
        for col, z in enumerate(slices):
            ax = axes[row, col]
            im = ax.imshow(data[z], origin="lower", cmap=cmap, norm=norm, aspect=aspect,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if grid:
                ax.set_title(DISPLAY[name].label if name in DISPLAY else "quality",
                             fontsize=11)
            elif row == 0:
                ax.set_title(f"slice z = {z}" if len(shape) == 3 else "", fontsize=10)
            if col == 0 and not grid:
                ax.set_ylabel(DISPLAY[name].label if name in DISPLAY else "quality",
                              fontsize=11)
        if name == "quality_mask":
            cb = fig.colorbar(im, ax=axes[row, :], ticks=[0, 1, 2], fraction=0.05, pad=0.02,
                              aspect=12)
            cb.ax.set_yticklabels(_QUALITY_LABELS, fontsize=8)
            cb.set_label(label, fontsize=9)
        else:
            extend = _extend(name, result, lo, hi)
            cb = fig.colorbar(im, ax=axes[row, :], fraction=0.05, pad=0.02, aspect=12,
                              extend=extend)
            if DISPLAY[name].log:
                _log_ticks(cb.ax.yaxis, lo, hi)
            cb.ax.tick_params(labelsize=8)
            cb.set_label(label, fontsize=9)
    if len(shape) != 3:
        where = "the 2-D map"
    elif nz_total == 1:
        where = "the single slice"
    elif ncol == 1:
        where = f"slice z = {slices[0]} of {nz_total} (last axis)"
    else:
        where = f"slices {', '.join(map(str, slices))} of {nz_total} (last axis)"
    fig.suptitle(f"Parameter maps: {where}", fontsize=12)
    return fig


def _cmap(name):
    matplotlib, _, _, _, _ = _mpl()
    return matplotlib.colormaps[name].with_extremes(bad=_BAD_COLOUR)


def _extend(name, result, lo, hi) -> str:
    """Colour-bar arrows for the ends that some fitted value lies beyond."""
    d = DISPLAY[name]
    v = np.asarray(getattr(result, name))
    v = v[np.isfinite(v)] * d.scale
    if v.size == 0:
        return "neither"
    below, above = bool(v.min() < lo), bool(v.max() > hi)
    return {(False, False): "neither", (True, False): "min", (False, True): "max",
            (True, True): "both"}[(below, above)]


def plot_histograms(result, ranges=None, bins: int = 60):
    """Histograms of D, D_star and f inside the quality mask (median marked) and of R².

    Parameters
    ----------
    result : IVIMResult
    ranges : dict, optional
        ``{name: (lo, hi)}`` in display units over :data:`DISPLAY`; the x-axis of each panel.
    bins : int

    Returns
    -------
    matplotlib.figure.Figure
        A 2 × 2 grid. Values outside a panel's range are counted in its legend, not drawn.
        The R² panel shows every fitted voxel, with the quality-mask voxels over them.
    """
    fig = _figure(10.0, 7.0)
    axes = fig.subplots(2, 2).ravel()
    q = np.asarray(result.quality_mask)
    n_q = int(q.sum())
    for ax, name in zip(axes[:3], ("D", "D_star", "f"), strict=True):
        if getattr(result, name) is None:  # D_star of the simplified model
            ax.text(0.5, 0.5, f"no {name} map ({result.model} model)", ha="center",
                    va="center", transform=ax.transAxes, color="#666666")
            ax.set_axis_off()
            continue
        d = DISPLAY[name]
        lo, hi = _range(name, result, ranges)
        v = np.asarray(getattr(result, name))[q].astype(np.float64) * d.scale
        edges = np.geomspace(lo, hi, bins + 1) if d.log else np.linspace(lo, hi, bins + 1)
        _hist_panel(ax, v, edges, d, color="#3b75af")
        if d.log:
            ax.set_xscale("log")
            _log_ticks(ax.xaxis, lo, hi)
        ax.set_xlim(lo, hi)
        ax.set_xlabel(d.axis_label)
        ax.set_ylabel("voxels")
        ax.set_title(f"{d.label} in the quality mask (n = {n_q:,})", fontsize=10)
    ax = axes[3]
    d = DISPLAY["r_squared"]
    r2 = np.asarray(result.r_squared, dtype=np.float64)
    fitted = _fitted(result) & np.isfinite(r2)
    all_r2 = r2[fitted]
    if ranges and "r_squared" in ranges:
        lo, hi = _range("r_squared", result, ranges)
    else:  # R² piles up near 1: start the axis at the 1st percentile, rounded down to 0.1
        p1 = float(np.percentile(all_r2, 1)) if all_r2.size else 0.0
        lo, hi = min(max(math.floor(p1 * 10) / 10, 0.0), 0.9), 1.0
    edges = np.linspace(lo, hi, bins + 1)
    top = 0
    if all_r2.size:
        counts, _, _ = ax.hist(all_r2[(all_r2 >= lo) & (all_r2 <= hi)], bins=edges,
                               color="#bbbbbb", label=f"all fitted (n = {all_r2.size:,})")
        top = counts.max()
    _hist_panel(ax, r2[q], edges, d, color="#3b75af", label_prefix="quality mask", top=top)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(d.axis_label)
    ax.set_ylabel("voxels")
    ax.set_title("R² of the fit", fontsize=10)
    fig.suptitle("Distributions", fontsize=12)
    return fig


def _hist_panel(ax, v, edges, d, color, label_prefix=None, top=0):
    lo, hi = edges[0], edges[-1]
    v = v[np.isfinite(v)]
    if v.size == 0:
        ax.text(0.5, 0.5, "no voxel passed the quality checks", ha="center", va="center",
                transform=ax.transAxes, fontsize=10, color="#666666")
        return
    inside = v[(v >= lo) & (v <= hi)]
    n_out = v.size - inside.size
    label = f"{label_prefix} (n = {v.size:,})" if label_prefix else f"n = {v.size:,}"
    if n_out:
        label += f"; {n_out:,} outside the axis"
    counts, _, _ = ax.hist(inside, bins=edges, color=color, label=label)
    ax.set_ylim(0, 1.35 * max(top, counts.max(), 1))  # headroom: the legend sits above the bars
    med = float(np.median(v))
    ax.axvline(med, color="#d62728", lw=1.5, ls="--",
               label=f"median {med:.3g}" + ("" if d.units in ("unitless", "fraction")
                                             else f" {d.units}"))
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)


def plot_decay(result, dwi, b_values=None, voxels=None, n: int = N_VOXELS, seed: int = 0):
    """Measured signal of sample voxels with the fitted curve, on linear and log axes.

    Parameters
    ----------
    result : IVIMResult
    dwi : array_like (..., n_b) or fastivim.io.DWI
        The signal that was fitted, spatial shape ``result.shape``.
    b_values : array_like (n_b,), optional
        s/mm²; default ``result.b_values``.
    voxels : sequence of index tuples, optional
        Voxels to draw; default :func:`sample_voxels` (``n``, ``seed``).

    Returns
    -------
    matplotlib.figure.Figure
        One panel pair per voxel (two voxels per row); the fitted curve is
        :func:`fastivim.ivim_signal` at the fitted parameters, which the panel title lists.
    """
    data = _signal_array(dwi, result.shape)
    b = np.asarray(result.b_values if b_values is None else b_values, dtype=np.float64)
    if b.shape != (data.shape[-1],):
        raise ValueError(f"{b.size} b-values for a signal of {data.shape[-1]} samples")
    if voxels is None:
        picks = sample_voxels(result, n=n, seed=seed)
    else:
        picks = []
        for v in voxels:
            v = tuple(int(i) for i in np.atleast_1d(v))
            code = int(np.asarray(result.status)[v])
            picks.append((v, "passed" if code == st.OK else
                          f"status {code}: {st.STATUS_MEANINGS[code]}"))
    ncols = 2
    nrows = max(1, math.ceil(len(picks) / ncols))
    fig = _figure(13.0, 2.9 * nrows + 0.5)
    fig.suptitle("Signal decay of sample voxels: measured (points) and fitted (line)",
                 fontsize=12)
    if not picks:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no fitted voxel to show", ha="center", va="center", fontsize=12,
                transform=ax.transAxes, color="#666666")
        ax.set_axis_off()
        return fig
    subfigs = np.atleast_1d(fig.subfigures(nrows, ncols, wspace=0.04, hspace=0.04)).ravel()
    b_fine = np.linspace(0.0, float(b.max()), 200)
    idx = tuple(np.array([p[0][k] for p in picks]) for k in range(len(result.shape)))
    measured = np.asarray(data[idx], dtype=np.float64)  # (n_picks, n_b)
    simplified = getattr(result, "model", "ivim") == "simplified"
    # the simplified model has no perfusion term beyond b = 0: D_star -> inf draws exactly
    # S0 at b = 0 and S0 (1 - f) exp(-b D) above it
    params = {k: (np.full(len(picks), np.inf) if k == "D_star" and simplified else
                  np.asarray(getattr(result, k), dtype=np.float64)[idx])
              for k in ("S0", "f", "D_star", "D", "r_squared")}
    for i, sf in enumerate(subfigs):
        if i >= len(picks):
            sf.set_visible(False)
            continue
        voxel, label = picks[i]
        p = {k: v[i] for k, v in params.items()}
        ok = all(np.isfinite(p[k]) for k in ("S0", "f", "D")) and (
            simplified or np.isfinite(p["D_star"]))
        if ok:
            dstar = "" if simplified else f", D* = {p['D_star'] * 1e3:.3g}"
            line2 = (f"D = {p['D'] * 1e3:.3g}{dstar} (×10⁻³ mm²/s), "
                     f"f = {p['f']:.3f}, S0 = {p['S0']:.4g}, R² = {p['r_squared']:.3f}")
        else:
            line2 = "no fitted parameters (NaN)"
        sf.suptitle(f"voxel {voxel}, {label}\n{line2}", fontsize=9)
        ax_lin, ax_log = sf.subplots(1, 2)
        y = measured[i]
        if ok and simplified:
            fit = p["S0"] * np.where(b_fine > 0, (1 - p["f"]) * np.exp(-b_fine * p["D"]), 1.0)
        else:
            fit = ivim_signal(b_fine, p["S0"], p["f"], p["D_star"], p["D"]) if ok else None
        for ax, log in ((ax_lin, False), (ax_log, True)):
            ax.plot(b, y, "o", ms=4, color="#1f77b4", label="measured")
            if fit is not None:
                ax.plot(b_fine, fit, "-", lw=1.5, color="#d62728", label="fit")
            ax.set_xlabel("b (s/mm²)", fontsize=9)
            ax.tick_params(labelsize=8)
            if log:
                ax.set_yscale("log", nonpositive="mask")
                _log_axis_ticks(ax.yaxis, y, fit)
                ax.set_ylabel("signal (input units, log)", fontsize=9)
            else:
                top = np.nanmax(np.r_[y, fit if fit is not None else []]) if np.isfinite(
                    y).any() else 1.0
                ax.set_ylim(0, 1.08 * top if top > 0 else 1.0)
                ax.set_ylabel("signal (input units)", fontsize=9)
        ax_lin.legend(fontsize=8, loc="upper right")
    return fig


def _signal_array(dwi, shape) -> np.ndarray:
    data = getattr(dwi, "data", dwi)
    data = np.asanyarray(data)
    if data.shape[:-1] != tuple(shape):
        raise ValueError(f"signal of spatial shape {data.shape[:-1]} does not match the "
                         f"maps' {tuple(shape)}")
    return data


# ------------------------------------------------------------------------------- summary

def summary(result, record=None) -> dict:
    """Numbers of the report's table.

    Parameters
    ----------
    result : IVIMResult
    record : dict, optional
        The run record (``fastivim.json``); its input, command, mask source and timings are
        carried over when present.

    Returns
    -------
    dict
        ``stats`` (median, q25, q75, n of D, D_star, f, S0, r_squared inside the quality mask;
        stored units), ``voxels`` (total, fitted, quality, status counts), ``method``,
        ``b_threshold``, ``bounds``, ``b_values`` and, from the record, ``input``,
        ``command``, ``mask_source``, ``timings``, ``threads``, ``version``.
    """
    from .fit import SUMMARY_MAPS

    out = {
        **result.summary(tuple(SUMMARY_MAPS) + SD_ROWS),  # maps the result lacks are skipped
        "method": result.method,
        "model": getattr(result, "model", "ivim"),
        "prior": getattr(result, "prior", None),
        "noise_sigma": getattr(result, "noise_sigma", None),
        "b_threshold": float(result.b_threshold),
        "bounds": {k: (float(lo), float(hi)) for k, (lo, hi) in result.bounds.items()},
        "b_values": [float(v) for v in result.b_values],
        "shape": list(result.shape),
    }
    record = record or {}
    for key in ("input", "command", "mask_source", "timings", "threads", "version"):
        if key in record:
            out[key] = record[key]
    return out


def _fmt_bound(v: float, scale: float) -> str:
    return "∞" if math.isinf(v) else f"{v * scale:g}"


def summary_html(s: dict) -> str:
    """The summary of :func:`summary` as HTML tables."""
    e = html.escape
    rows = []
    for name, x in s["stats"].items():
        d = DISPLAY[name]
        if x["median"] is None:
            cells = "<td>–</td><td>–</td>"
        else:
            cells = (f"<td>{x['median'] * d.scale:.4g}</td>"
                     f"<td>{x['q25'] * d.scale:.4g} – {x['q75'] * d.scale:.4g}</td>")
        rows.append(f"<tr><th>{e(d.label)}</th><td>{e(d.units)}</td>{cells}"
                    f"<td>{x['n']:,}</td></tr>")
    params = ("<table><tr><th>parameter</th><th>units</th><th>median</th>"
              "<th>IQR (25% – 75%)</th><th>voxels</th></tr>" + "".join(rows) + "</table>")
    vox = s["voxels"]
    pct = 100.0 * vox["quality"] / vox["fitted"] if vox["fitted"] else 0.0
    status_rows = "".join(
        f"<tr><td>{code}</td><td>{e(st.STATUS_MEANINGS.get(int(code), '?'))}</td>"
        f"<td>{n:,}</td></tr>"
        for code, n in sorted(vox["status_counts"].items(), key=lambda kv: int(kv[0])))
    bounds = ", ".join(
        f"{DISPLAY[k].label} {_fmt_bound(lo, DISPLAY[k].scale)} – "
        f"{_fmt_bound(hi, DISPLAY[k].scale)}"
        + (f" {DISPLAY[k].units}" if DISPLAY[k].units not in ("fraction", "input units")
           else "")
        for k, (lo, hi) in s["bounds"].items())
    info = [
        ("input", s.get("input")),
        ("shape", " × ".join(map(str, s["shape"]))),
        ("command", s.get("command")),
        ("method", f"{s['method']} (b threshold {s['b_threshold']:g} s/mm²)"
                   + (f", {s['model']} model" if s.get("model", "ivim") != "ivim" else "")
                   + (f", {s['prior']} prior" if s.get("prior") else "")
                   + (f", noise sigma {s['noise_sigma']:.4g}" if s.get("noise_sigma") else "")),
        ("bounds", bounds),
        ("b-values (s/mm²)", ", ".join(f"{b:g}" for b in s["b_values"])),
        ("mask", s.get("mask_source")),
        ("voxels", f"{vox['total']:,} in the volume, {vox['fitted']:,} fitted, "
                   f"{vox['quality']:,} passed the quality checks ({pct:.1f}% of fitted)"),
    ]
    t = s.get("timings")
    if t:
        parts = [f"{k.replace('_', ' ')} {t[k]:.2f} s"
                 for k in ("read", "mask", "load_kernel", "fit", "write", "total") if k in t]
        if "voxels_per_second" in t:
            parts.append(f"{t['voxels_per_second']:,.0f} voxels/s in the fit")
        if s.get("threads"):
            parts.append(f"{s['threads']} threads")
        info.append(("run timings", "; ".join(parts)))
    if "report_seconds" in s:
        info.append(("report", f"{s['report_seconds']:.2f} s to draw"))
    info.append(("software", f"fastivim {s.get('version', __version__)}"))
    info_html = "<table>" + "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in info if v is not None
    ) + "</table>"
    status_html = ("<table><tr><th>status</th><th>meaning</th><th>voxels</th></tr>"
                   + status_rows + "</table>")
    return (f"<h2>Summary</h2>{info_html}<h3>Parameters inside the quality mask</h3>{params}"
            f"<h3>Fit status</h3>{status_html}")


# ------------------------------------------------------------------------------- report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1350px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
p.note { color: #555; font-size: 0.9em; max-width: 70em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


#: The fitted curve of the decay figure, by model (HTML).
_DECAY_EQUATIONS = {
    "ivim": "S(b) = S0 (f e<sup>−b D*</sup> + (1 − f) e<sup>−b D</sup>)",
    "simplified": "S(0) = S0, S(b) = S0 (1 − f) e<sup>−b D</sup> for b ≥ b_threshold (the "
                  "simplified model)",
}


def _notes(s0_vmax: float, model: str = "ivim") -> dict:
    shown = {m.attr for m in MAPS if m.produced_by(model)}
    return {
        "maps": ("Fixed colour ranges: " + "; ".join(
                     f"{d.label} {d.vmin:g}–{d.vmax:g}"
                     + ("" if d.units in ("fraction", "unitless") else f" {d.units}")
                     + (" (log scale)" if d.log else "")
                     for attr, d in DISPLAY.items() if d.vmax is not None and attr in shown)
                 + f"; S0 0 to its 99th percentile in the quality mask ({s0_vmax:.4g}). "
                 "Values beyond a range take the end colour (arrow on the colour bar). "
                 "Black: not fitted or failed (NaN). Quality mask: passed = status "
                 "0 (converged, inside the bounds, D* &gt; D). Slices are spread evenly over "
                 "the slices that hold fitted voxels; x to the right, y up."),
        "histograms": ("D, D* and f of the voxels in the quality mask; the dashed line is the "
                       "median. R²: every fitted voxel (grey) with the quality-mask voxels "
                       "over it (blue)."),
        "decay": ("Sample voxels chosen reproducibly: about two thirds from the quality mask "
                  "at evenly spaced R² percentiles (5th to 95th), the rest among the voxels "
                  "that failed the quality checks (seeded draw). The line is the model "
                  f"{_DECAY_EQUATIONS.get(model, _DECAY_EQUATIONS['ivim'])} at the fitted "
                  "parameters."),
    }


def make_report(result, dwi, b_values, out_dir, record=None, voxel_size=None,
                title=None, prefix: str = "") -> Path:
    """Draw every figure and write ``report.html`` with the PNGs beside it.

    Parameters
    ----------
    result : IVIMResult
        Maps of 1, 2 or 3 spatial dimensions (the maps figure needs 2 or 3).
    dwi : array_like (..., n_b), fastivim.io.DWI or None
        The fitted signal; None leaves out the signal-decay figure.
    b_values : array_like (n_b,) or None
        s/mm² of ``dwi``'s last axis; None uses ``result.b_values``.
    out_dir : str or Path
        Created if missing. Files: :data:`REPORT_FILES` (existing ones are replaced; the PNG
        of a figure that is not drawn is removed).
    record : dict, optional
        Run record (``fastivim.json``) for the summary's input, command, mask and timings.
    voxel_size : sequence of float, optional
        mm, for the maps' aspect ratio.
    title : str, optional
    prefix : str
        Put before every file name (a BIDS series' ``sub-01_model-ivim_``).

    Returns
    -------
    Path
        The ``report.html`` written. Figures are embedded in it (self-contained) and also
        saved as PNG files beside it.
    """
    _mpl()  # fail early, before any file, when matplotlib is missing
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname in REPORT_FILES.values():  # a link at a report name: refused before drawing
        check_owned(out_dir / (prefix + fname))
        check_owned(partial_path(out_dir / (prefix + fname)))
    figures = {}
    skipped = {}
    if len(result.shape) in (2, 3):
        figures["maps"] = plot_maps(result, voxel_size=voxel_size)
    else:
        skipped["maps"] = f"maps need 2 or 3 spatial dimensions (shape {result.shape})"
    figures["histograms"] = plot_histograms(result)
    if dwi is not None:
        figures["decay"] = plot_decay(result, dwi, b_values)
    else:
        skipped["decay"] = "the signal was not available"
    pngs = {name: figure_png(fig) for name, fig in figures.items()}
    s = summary(result, record)
    s["report_seconds"] = time.perf_counter() - t0
    doc = _html(s, pngs, figures, skipped, _s0_vmax(result),
                title or f"fastivim QC report: {Path(s.get('input', 'IVIM fit')).name}",
                prefix)
    target = out_dir / (prefix + REPORT_FILES["html"])
    from .io.write import Staging, deferred_signals

    # all files staged first (O_EXCL, never through a link), then renamed in together: a full
    # disk leaves neither a new PNG nor the HTML
    with Staging(out_dir) as staging:
        for name, payload in pngs.items():
            staging.write(out_dir / (prefix + REPORT_FILES[name]), payload)
        staging.write(target, doc.encode("utf-8"))
        for name in skipped:
            check_owned(out_dir / (prefix + REPORT_FILES[name]))
        with deferred_signals():
            for name in skipped:  # a figure of an earlier report must not pass for this one's
                (out_dir / (prefix + REPORT_FILES[name])).unlink(missing_ok=True)
            staging.commit()
    return target


def _html(s, pngs, figures, skipped, s0_vmax, title, prefix: str = "") -> str:
    e = html.escape
    notes = _notes(s0_vmax, s.get("model", "ivim"))
    heads = {"maps": "Parameter maps", "histograms": "Distributions",
             "decay": "Signal decay and fit"}
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", summary_html(s)]
    for name in ("maps", "histograms", "decay"):
        parts.append(f"<h2 id=\"{name}\">{heads[name]}</h2>")
        if name in pngs:
            w, h = (int(round(v)) for v in figures[name].get_size_inches() * DPI)
            b64 = base64.b64encode(pngs[name]).decode("ascii")
            fname = e(prefix + REPORT_FILES[name])  # the name the PNG is saved under
            parts.append(f"<a href=\"{fname}\"><img src=\"data:image/png;base64,{b64}\" "
                         f"alt=\"{fname}\" width=\"{w}\" height=\"{h}\"></a>")
            parts.append(f"<p class=\"note\">{notes[name]} (Also saved as "
                         f"<code>{fname}</code>.)</p>")
        else:
            parts.append(f"<p class=\"note\">Not drawn: {e(skipped.get(name, ''))}.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------ from a run's out dir

def load_output(out_dir):
    """Read a finished run back: ``(result, record, voxel_size)``; see
    :func:`fastivim.io.load_output` (which also returns the output's layout)."""
    from .io import load_output as _load

    result, record, zooms, _ = _load(out_dir)
    return result, record, zooms


class InputChangedError(ValueError):
    """The recorded input's content is not the content that was fitted."""


def check_input_unchanged(src, record: dict) -> None:
    """Refuse the recorded input ``src`` when its size or SHA-256 differs from the one the run
    record keeps (``inputs.dwi``): the signal-decay figure would draw data that was not fitted.

    A record without the fingerprint (written by :func:`fastivim.io.save_maps`) is not checked.

    Raises
    ------
    InputChangedError
    """
    want = (record.get("inputs") or {}).get("dwi") if isinstance(record.get("inputs"), dict) \
        else None
    if not isinstance(want, dict):
        return
    from .io.read import file_fingerprint

    try:
        have = file_fingerprint(src)
    except (OSError, ValueError):
        return  # unreadable: load_dwi says why
    if have != want:
        raise InputChangedError(f"{src}: the input changed since the fit (its size or SHA-256 "
                                f"differs from the run record's); the maps are drawn, the "
                                f"signal is not")


def report_from_output(out_dir, dwi=None) -> Path:
    """Write ``report.html`` (and its PNGs) beside the maps of a finished run.

    Parameters
    ----------
    out_dir : str or Path
        The output folder of ``fastivim run -o`` (maps and ``fastivim.json``), or a BIDS
        series: its run record ``..._model-ivim_fastivim.json`` or the ``dwi`` folder holding
        it (the report is then ``..._model-ivim_report.html``).
    dwi : str or Path, optional
        The fitted 4D image; default the ``input`` recorded in ``fastivim.json`` (read with
        its recorded b-values). When it cannot be read the report is written without the
        signal-decay figure and a :class:`UserWarning` says why. The recorded input is also
        compared with the size and SHA-256 the record keeps: when its content changed since
        the fit, the report is drawn without the signal-decay figure, with a warning (the maps
        are the run's own, checked against the record's manifest).

    Returns
    -------
    Path
        ``OUT_DIR/report.html`` (or the BIDS series' ``..._model-ivim_report.html``).

    Raises
    ------
    ImportError
        matplotlib is missing (the message says ``pip install fastivim[report]``).
    ValueError
        ``out_dir`` is not a readable run output.
    """
    _mpl()
    from .io import load_output as _load

    result, record, zooms, layout = _load(out_dir)
    signal = None
    src = dwi if dwi is not None else record.get("input")
    if src is None:
        warnings.warn("fastivim.json records no input image: the report has no signal-decay "
                      "figure", stacklevel=2)
    else:
        from .io import load_dwi

        try:
            if dwi is None:
                check_input_unchanged(src, record)
            d = load_dwi(src, bvals=result.b_values if result.b_values.size else None,
                         model=getattr(result, "model", "ivim"))
            if d.spatial_shape != result.shape:
                raise ValueError(f"{src}: image grid {d.spatial_shape} does not match the "
                                 f"maps' {result.shape}")
            signal = d.data
        except (ValueError, OSError) as exc:
            warnings.warn(f"no signal-decay figure: {exc}", stacklevel=2)
    from .io.write import OutputLock

    lock = OutputLock(layout.folder / f".{layout.record.name}.lock")
    lock.acquire()  # not while a run rewrites this output (its commit removes older reports)
    try:
        return make_report(result, signal, result.b_values, layout.folder, record=record,
                           voxel_size=zooms, prefix=layout.prefix)
    finally:
        lock.release()


__all__ = [
    "DISPLAY",
    "REPORT_FILES",
    "figure_png",
    "load_output",
    "make_report",
    "plot_decay",
    "plot_histograms",
    "plot_maps",
    "representative_slices",
    "report_from_output",
    "sample_voxels",
    "summary",
    "summary_html",
]
