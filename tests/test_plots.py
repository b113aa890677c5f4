"""Figure builders: the expected traces, built from result dataclasses made without a model."""

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from ditlab import allocation, outliers, plots
from ditlab.config import LayerConfig
from ditlab.errors import ConfigError
from ditlab.sensitivity import SensitivityResult


@pytest.fixture(scope="module")
def outlier_result():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64)
    x[..., 2] *= 20
    linear = torch.nn.Linear(64, 32)
    flat, cen = x.reshape(-1, 64), (x - x.mean(1, keepdim=True)).reshape(-1, 64)

    class Stats:
        absmax, mean, std = flat.abs().amax(0), flat.mean(0), flat.std(0, unbiased=False)
        centered_std, centered_absmax = cen.std(0, unbiased=False), cen.abs().amax(0)

    views = outliers.analyse(x, linear, Stats, branch="cond", batch_size=2)
    return outliers.OutlierResult("blk.fc1", "fc1", 999, 0, "cond", 0, 16, 64, 0.5, views)


def sens_result():
    rows = []
    for u, kind in (("a", "qkv"), ("b", "fc1"), ("c", "adaLN")):
        for g in range(4):
            for w in (2, 4, 8):
                rows.append({"unit": u, "kind": kind, "layers": u, "params": 64, "group": g, "steps": f"{2 * g}–{2 * g + 1}", "w_bits": w,
                             "a_bits": 8, "sqnr_db": 6.0 * w + g, "ssim": 1 - 0.1 / w, "agreement": 1.0, "psnr": 30.0, "class_acc": 1.0,
                             "bytes": 64 * w, "config": json.dumps(LayerConfig(w_bits=w).to_dict())})
    df = pd.DataFrame(rows)
    return SensitivityResult(df[df.w_bits == 4].reset_index(drop=True), "w4a8-rtn", {}, [[0, 1], [2, 3], [4, 5], [6, 7]]), df


def test_outlier_figures(outlier_result):
    res = outlier_result
    fig = plots.outlier_channels_figure(res)
    assert [t.name for t in fig.data] == [plots.LABELS[n] for n in outliers.TRANSFORMS]
    np.testing.assert_array_equal(fig.data[0].y, res.views[0].channel_absmax)
    assert len(plots.outlier_hist_figure(res).data) == 5
    err = plots.outlier_error_figure(res)
    assert [type(t).__name__ for t in err.data] == ["Bar", "Bar", "Scatter", "Scatter"]
    assert list(err.data[1].y) == [v.err_out[4] for v in res.views]
    heat = plots.outlier_heat_figure(res, "hadanorm")
    assert isinstance(heat.data[0], go.Heatmap) and heat.data[0].z.shape == (8, 64)
    assert isinstance(plots.outlier_heat_figure(res, "none", surface=True).data[0], go.Surface)
    over = plots.outlier_figure(res)
    kinds = [type(t).__name__ for t in over.data]
    assert kinds.count("Heatmap") == 5 and kinds.count("Bar") == 2 and kinds.count("Scatter") == 10
    with pytest.raises(ConfigError, match="transform"):
        plots.outlier_heat_figure(res, "gptq")


def test_outlier_map_figure():
    frame = pd.DataFrame([[1.0, 10.0], [100.0, 2.0]], index=["l0", "l1"], columns=[999, 499])
    fig = plots.outlier_map_figure(outliers.OutlierMap(frame, "max_median", "cond"))
    np.testing.assert_allclose(fig.data[0].z, [[0.0, 1.0], [2.0, np.log10(2.0)]])
    assert list(fig.data[0].y) == ["l0", "l1"] and list(fig.data[0].x) == ["999", "499"]


def test_sensitivity_allocation_pareto_figures():
    res, cells = sens_result()
    fig = plots.sensitivity_figure(res, "sqnr_db")
    assert list(fig.data[0].y) == ["a", "b", "c"] and len(fig.data[0].x) == 4
    np.testing.assert_array_equal(fig.data[0].z[0], [24.0, 25.0, 26.0, 27.0])
    alloc = allocation.solve(cells, 5.0, metric="sqnr", split=None)
    bars = plots.allocation_figure(alloc)
    assert sorted(t.name for t in bars.data) == ["adaLN", "fc1", "qkv"]
    par = allocation.pareto(cells, [2.0, 4.0, 6.0, 8.0], metric="sqnr", split=None)
    pf = plots.pareto_figure(par, pd.DataFrame({"avg_w_bits": [4.0], "psnr": [30.0]}))
    assert len(pf.data) == 2 and list(pf.data[0].x) == list(par.frame.avg_w_bits)
    with pytest.raises(ConfigError, match="metric"):
        plots.sensitivity_figure(res, "fid")
