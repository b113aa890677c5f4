"""Plotly figures from the analysis result dataclasses (no torch modules in, ``go.Figure`` out).

Outliers (``ditlab.outliers.OutlierResult`` / ``OutlierMap``), sensitivity (``ditlab.sensitivity.SensitivityResult``)
and allocation (``ditlab.allocation.Allocation`` / ``ParetoResult``). Every builder is a pure function of its result;
the app shows the figures, the docs render their own PNGs (``benchmarks/bench_sensitivity.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .errors import ConfigError

COLORS = {"none": "#444444", "smoothquant": "#1f77b4", "hadamard": "#ff7f0e", "hadanorm": "#2ca02c", "viditq": "#9467bd"}
LABELS = {"none": "no transform", "smoothquant": "SmoothQuant", "hadamard": "Hadamard", "hadanorm": "HadaNorm", "viditq": "ViDiT-Q SDCB"}
KIND_COLORS = {"qkv": "#1f77b4", "out": "#17becf", "fc1": "#2ca02c", "fc2": "#98df8a", "adaLN": "#d62728", "attn": "#1f77b4", "ff": "#2ca02c"}
METRIC_TITLES = {"sqnr_db": "SQNR of ε vs FP (dB, higher = less sensitive)", "ssim": "SSIM of final images vs FP",
                 "psnr": "PSNR of final images vs FP (dB)", "agreement": "classifier agreement with FP", "class_acc": "class accuracy"}


def _title(res) -> str:
    return f"{res.layer} ({res.kind}) · t={res.timestep} (step {res.step}) · {res.branch} · {res.rows}×{res.in_features}"


def outlier_channels_figure(res) -> go.Figure:
    """Sorted per-channel absmax of X' for every transform (log y): a flat curve = no outlier channels."""
    fig = go.Figure()
    for v in res.views:
        fig.add_trace(go.Scatter(y=v.channel_absmax, mode="lines", name=LABELS.get(v.name, v.name), line={"color": COLORS.get(v.name)}))
    fig.update_layout(title=f"Per-channel absmax (sorted) — {_title(res)}", xaxis_title="channel rank", yaxis_title="max |X'|", yaxis_type="log")
    return fig


def outlier_hist_figure(res) -> go.Figure:
    """Histograms of the values of X' per transform (log counts); heavy tails = outliers."""
    fig = go.Figure()
    for v in res.views:
        centers = 0.5 * (v.hist_edges[1:] + v.hist_edges[:-1])
        scale = max(float(np.abs(v.hist_edges).max()), 1e-30)  # x normalised by each transform's range: shapes compare
        fig.add_trace(go.Scatter(x=centers / scale, y=v.hist_counts, mode="lines", line={"shape": "hvh", "color": COLORS.get(v.name)},
                                 name=f"{LABELS.get(v.name, v.name)} (kurtosis {v.kurtosis:.1f})"))
    fig.update_layout(title="Value histograms (x / max |x|)", xaxis_title="x / max|x|", yaxis_title="count", yaxis_type="log")
    return fig


def outlier_error_figure(res) -> go.Figure:
    """A8 and A4 per-token quantization error of every transform: layer-output error (bars) and input-side error."""
    names = [LABELS.get(v.name, v.name) for v in res.views]
    fig = go.Figure()
    for bits, color in ((8, "#6baed6"), (4, "#08519c")):
        fig.add_trace(go.Bar(x=names, y=[v.err_out[bits] for v in res.views], name=f"A{bits} output error", marker_color=color))
    for bits, color in ((8, "#fdae6b"), (4, "#d94801")):
        fig.add_trace(go.Scatter(x=names, y=[v.err_in[bits] for v in res.views], mode="markers", marker={"size": 10, "color": color, "symbol": "diamond"},
                                 name=f"A{bits} input error ‖Q(X')−X'‖/‖X'‖"))
    fig.update_layout(title="Relative quantization error (per-token dynamic)", yaxis_type="log", barmode="group", yaxis_title="relative Frobenius error")
    return fig


def outlier_heat_figure(res, transform: str = "none", surface: bool = False) -> go.Figure:
    """|X'| of one sample as a token × channel heatmap (or a 3D surface) for one transform."""
    v = res.view(transform)
    label = "sample" if res.kind == "adaLN" else "token"
    if surface:
        fig = go.Figure(go.Surface(z=v.heat, colorscale="Viridis", colorbar={"title": "|X'|"}))
        fig.update_layout(scene={"xaxis_title": "channel", "yaxis_title": label, "zaxis_title": "|X'|"})
    else:
        fig = go.Figure(go.Heatmap(z=v.heat, colorscale="Viridis", colorbar={"title": "|X'|"}))
        fig.update_layout(xaxis_title="channel", yaxis_title=label)
    fig.update_layout(title=f"|X'| after {LABELS.get(transform, transform)} — {_title(res)}")
    return fig


def outlier_figure(res) -> go.Figure:
    """Overview: |X'| heatmaps of every transform (each scaled to its own max), sorted channel absmax, histograms,
    and the A8/A4 layer-output error, with max/median and kurtosis in the titles — the whole ``OutlierResult``."""
    n = len(res.views)
    if n < 3:
        raise ConfigError.invalid("transforms", n, "at least 3 transforms for the overview (use the single-panel figures)")
    a = -(-n // 3)
    b = -(-(n - a) // 2)
    c = n - a - b
    row2 = [{"colspan": a}] + [None] * (a - 1) + [{"colspan": b}] + [None] * (b - 1) + [{"colspan": c}] + [None] * (c - 1)
    titles = [f"{LABELS.get(v.name, v.name)}<br>max/med {v.max_median:.1f} · kurt {v.kurtosis:.1f}" for v in res.views]
    titles += ["per-channel absmax / max (sorted)", "histogram (x / max|x|)", "A8 / A4 output error"]
    fig = make_subplots(rows=2, cols=n, specs=[[{}] * n, row2], subplot_titles=titles, vertical_spacing=0.18)
    short = [LABELS.get(v.name, v.name).split()[0] for v in res.views]
    for i, v in enumerate(res.views):
        color, name = COLORS.get(v.name), LABELS.get(v.name, v.name)
        fig.add_trace(go.Heatmap(z=v.heat / max(float(v.heat.max()), 1e-30), coloraxis="coloraxis", name=v.name), row=1, col=i + 1)
        fig.add_trace(go.Scatter(y=v.channel_absmax / max(float(v.channel_absmax[0]), 1e-30), mode="lines", line={"color": color}, name=name,
                                 legendgroup=v.name), row=2, col=1)
        centers = 0.5 * (v.hist_edges[1:] + v.hist_edges[:-1])
        fig.add_trace(go.Scatter(x=centers / max(float(np.abs(v.hist_edges).max()), 1e-30), y=v.hist_counts, mode="lines",
                                 line={"shape": "hvh", "color": color}, name=name, legendgroup=v.name, showlegend=False), row=2, col=1 + a)
    for bits, color in ((8, "#6baed6"), (4, "#08519c")):
        fig.add_trace(go.Bar(x=short, y=[v.err_out[bits] for v in res.views], name=f"A{bits} error", marker_color=color), row=2, col=1 + a + b)
    for col in (1, 1 + a, 1 + a + b):
        fig.update_yaxes(type="log", row=2, col=col)
    fig.update_xaxes(tickangle=-30, row=2, col=1 + a + b)
    # the legend (the key to the line colours and the A8/A4 bars) goes under the plots, clear of the colour bar
    fig.update_layout(title=_title(res), coloraxis={"colorscale": "Viridis", "colorbar": {"title": "|X'|/max", "len": 0.45, "y": 0.8}},
                      legend={"orientation": "h", "x": 0.0, "y": -0.12, "xanchor": "left", "yanchor": "top"},
                      margin={"b": 110}, height=760, barmode="group")
    return fig


def outlier_map_figure(omap) -> go.Figure:
    """Model-wide layers × timesteps heatmap of the outlier statistic (color = log10, hover = value)."""
    df = omap.frame
    z = np.log10(np.clip(df.to_numpy(dtype=float), 1e-12, None))
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in df.columns], y=list(df.index), customdata=df.to_numpy(dtype=float), colorscale="Inferno",
                               hovertemplate="%{y}<br>t=%{x}<br>%{customdata:.3g}<extra></extra>", colorbar={"title": f"log10 {omap.metric}"}))
    fig.update_layout(title=f"Outliers across the model ({omap.metric}, {omap.branch} branch)", xaxis_title="timestep (sampling order)",
                      yaxis={"autorange": "reversed", "title": "layer"}, height=max(400, 14 * len(df) + 150))
    return fig


def sensitivity_figure(res, metric: str = "sqnr_db") -> go.Figure:
    """units × timestep groups heatmap of one metric of a ``SensitivityResult`` (clickable cells carry the unit)."""
    table = res.pivot(metric)
    steps = list(dict.fromkeys(res.frame["steps"]))
    reverse = metric in ("sqnr_db", "ssim", "psnr", "agreement", "class_acc")  # high = robust: low values hot
    z = table.to_numpy(dtype=float)
    z = np.where(np.isinf(z), np.nan, z)
    fig = go.Figure(go.Heatmap(z=z, x=[f"g{g}: steps {s}" for g, s in zip(table.columns, steps)], y=list(table.index),
                               colorscale="RdYlGn" if reverse else "RdYlGn_r", colorbar={"title": metric},
                               hovertemplate="%{y}<br>%{x}<br>" + metric + " = %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"Sensitivity at {res.setting}: {METRIC_TITLES.get(metric, metric)}", xaxis_title="timestep group (high noise first)",
                      yaxis={"autorange": "reversed", "title": "quantized unit"}, height=max(400, 14 * len(table) + 150))
    return fig


def allocation_figure(alloc) -> go.Figure:
    """Bits chosen per unit (bars colored by layer kind) of an ``Allocation``."""
    df = alloc.frame
    if "group" in df.columns and df["group"].nunique() > 1 and alloc.recipes is not None:
        raise ConfigError.invalid("allocation", "per-group", "a per-layer allocation (per_group=False)")
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=False):
        fig.add_trace(go.Bar(x=part["unit"], y=part["w_bits"], name=kind, marker_color=KIND_COLORS.get(kind),
                             customdata=part["a_bits"], hovertemplate="%{x}<br>W%{y}A%{customdata}<extra></extra>"))
    fig.update_layout(title=f"Allocated weight bits (average {alloc.avg_w_bits:.2f}, budget {alloc.budget_bits})", yaxis_title="weight bits",
                      xaxis={"tickangle": -60, "categoryorder": "array", "categoryarray": list(df["unit"])})
    return fig


def pareto_figure(par, measured: pd.DataFrame | None = None) -> go.Figure:
    """Predicted damage vs average weight bits of a ``ParetoResult``; optional measured PSNR on a second axis."""
    df = par.frame
    fig = make_subplots(specs=[[{"secondary_y": measured is not None}]])
    fig.add_trace(go.Scatter(x=df["avg_w_bits"], y=df["predicted_damage"], mode="lines+markers", name="predicted damage (Σ d)",
                             customdata=df["bytes"], hovertemplate="%{x:.2f} bits<br>damage %{y:.4g}<br>%{customdata} bytes<extra></extra>"))
    if measured is not None and len(measured):
        fig.add_trace(go.Scatter(x=measured["avg_w_bits"], y=measured["psnr"], mode="markers", marker={"size": 11, "symbol": "diamond"},
                                 name="measured PSNR vs FP"), secondary_y=True)
        fig.update_yaxes(title_text="measured PSNR (dB)", secondary_y=True)
    fig.update_yaxes(title_text="predicted damage (lower is better)", type="log", secondary_y=False)
    fig.update_layout(title="Pareto sweep of the bit allocation", xaxis_title="average weight bits")
    return fig
