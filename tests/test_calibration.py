"""Calibration statistics against a direct computation on a tiny random DiT; CFG branches; cache; NaN handling."""

import copy
import dataclasses
import json
import threading

import pytest
import torch

from ditlab import calib_cache, calibration
from ditlab.calib_collect import LayerAccumulator
from ditlab.calibration import calibrate, model_fingerprint, timestep_groups
from ditlab.errors import CalibrationError, ConfigError
from ditlab.models import load_pipeline
from ditlab.sampling import sample
from ditlab.testing import tiny_dit_pipeline

RUN = dict(labels=[1, 7, 3], n_samples=3, steps=4, guidance=3.0, seed=11)  # batch 2·3 rows per step (cond | uncond)
TOKEN_LAYER = "transformer_blocks.1.ff.net.2"  # (B, T, K) input, K = 4·64
VECTOR_LAYER = "transformer_blocks.0.norm1.linear"  # (B, K) input (adaLN)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_pipeline(tiny_dit_pipeline(tmp_path_factory.mktemp("calib") / "dit"))


@pytest.fixture(scope="module")
def stats(tiny):
    return calibrate(tiny, **RUN, use_cache=False, progress=False)


@pytest.fixture(scope="module")
def captured(tiny):
    """{layer: [(timestep, X (B, T, K) float32)]} captured by hand during the same sampling run."""
    out = {TOKEN_LAYER: [], VECTOR_LAYER: []}
    state = {}

    class Step:
        def before(self, ctx):
            state["t"] = ctx.timestep

        def after(self, ctx, latents, eps):
            pass

    def grab(name):
        def hook(module, args):
            x = args[0].detach().float()
            out[name].append((state["t"], x if x.dim() == 3 else x[:, None, :]))
        return hook

    modules = dict(tiny.transformer.named_modules())
    handles = [modules[n].register_forward_pre_hook(grab(n)) for n in out]
    try:
        sample(tiny, RUN["labels"], steps=RUN["steps"], guidance=RUN["guidance"], seed=RUN["seed"], hooks=[Step()], decode_images=False, progress=False)
    finally:
        for h in handles:
            h.remove()
    return out


def _all_equal(a, b, names=None):
    """Every tensor field and per-timestep entry of two CalibStats is identical (over ``names``, default all)."""
    if names is None:
        assert list(a) == list(b)
    for name in names or a:
        sa, sb = a[name], b[name]
        assert sa.n_rows == sb.n_rows
        for f in ("absmax", "minimum", "maximum", "mean", "std", "centered_std", "centered_absmax", "xtx", "rows", "row_info", "sample_means"):
            assert torch.equal(getattr(sa, f), getattr(sb, f)), (name, f)
        assert sa.per_timestep.keys() == sb.per_timestep.keys()
        for t, branches in sa.per_timestep.items():
            for br, d in branches.items():
                for k, v in d.items():
                    assert torch.equal(v, sb.per_timestep[t][br][k]), (name, t, br, k)


@pytest.mark.parametrize("layer", [TOKEN_LAYER, VECTOR_LAYER])
def test_global_statistics_match_direct_computation(stats, captured, layer):
    xs = [x for _, x in captured[layer]]
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()  # (rows, K)
    centered = torch.cat([(x.double() - x.double().mean(1, keepdim=True)).reshape(-1, x.shape[-1]) for x in xs])
    s = stats[layer]
    assert s.n_rows == flat.shape[0] == len(xs) * 6 * xs[0].shape[1]
    assert torch.equal(s.absmax, flat.abs().amax(0).float())  # max is exact
    assert torch.equal(s.minimum, flat.amin(0).float()) and torch.equal(s.maximum, flat.amax(0).float())
    torch.testing.assert_close(s.mean, flat.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.std, flat.std(0, unbiased=False).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.centered_std, centered.std(0, unbiased=False).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.centered_absmax, centered.abs().amax(0).float(), rtol=1e-6, atol=1e-6)  # fp32 token mean
    xtx = flat.t() @ flat
    assert s.xtx.dtype == torch.float64
    assert ((s.xtx - xtx).abs().max() / xtx.abs().max()) < 1e-6  # fp32 per-call GEMM, float64 sum
    torch.testing.assert_close(s.hessian(), 2 * xtx / flat.shape[0], rtol=1e-5, atol=1e-6 * float(xtx.abs().max()) / flat.shape[0])
    if layer == VECTOR_LAYER:  # T = 1: the token mean is the row itself
        assert torch.equal(s.centered_std, torch.zeros_like(s.centered_std))
    else:
        assert bool((s.centered_std > 0).all()) and not torch.allclose(s.centered_std, s.std)


def test_per_timestep_keeps_cond_and_uncond_apart(stats, captured):
    n = len(RUN["labels"])
    s = stats[TOKEN_LAYER]
    assert list(s.per_timestep) == stats.timesteps and len(stats.timesteps) == RUN["steps"]
    differs = 0
    for t, x in captured[TOKEN_LAYER]:
        for branch, part in (("cond", x[:n]), ("uncond", x[n:])):
            d = s.per_timestep[t][branch]
            assert torch.equal(d["absmax"], part.abs().amax((0, 1)))
            assert float(d["tensor_absmax"]) == float(part.abs().max())
            tokens = part.abs().amax(-1).reshape(-1).double()
            q = torch.tensor(calibration.TOKEN_PERCENTILES, dtype=torch.float64) / 100
            torch.testing.assert_close(d["token_absmax_pct"], torch.quantile(tokens, q).float())
            assert int(d["n_tokens"]) == tokens.numel()
        differs += not torch.equal(s.per_timestep[t]["cond"]["absmax"], s.per_timestep[t]["uncond"]["absmax"])
    assert differs == len(captured[TOKEN_LAYER])  # the null class really changes the inputs: a mixed split would show
    assert torch.equal(s.absmax_at(), s.absmax)
    t0 = stats.timesteps[0]
    assert torch.equal(s.absmax_at([t0], "uncond"), s.per_timestep[t0]["uncond"]["absmax"])


def test_reservoir_rows_are_real_rows_with_their_timestep_branch_and_token(stats, captured):
    n = len(RUN["labels"])
    s = stats[TOKEN_LAYER]
    assert s.rows.shape == (min(512, s.n_rows), s.in_features) and s.row_info.shape == (s.rows.shape[0], 3)
    by_t = dict(captured[TOKEN_LAYER])
    assert set(s.row_info[:, 1].tolist()) == {0, 1}
    for row, (t, branch, token) in zip(s.rows, s.row_info.tolist()):
        half = by_t[t][:n] if branch == 0 else by_t[t][n:]
        assert bool((half[:, token] == row).all(-1).any()), (t, branch, token)
    assert torch.unique(s.rows, dim=0).shape[0] == s.rows.shape[0]  # sampling without replacement


def test_sample_means_are_the_per_sample_token_means(stats, captured):
    """Token layers keep every (call, sample) mean over tokens (fewer than the reservoir size here); one-token
    layers keep none (their centred input is zero)."""
    s = stats[TOKEN_LAYER]
    means = torch.cat([x.mean(1) for _, x in captured[TOKEN_LAYER]])  # (calls·B, K)
    assert s.sample_means.shape == means.shape
    for row in s.sample_means:
        assert bool(torch.isclose(means, row, rtol=1e-6, atol=1e-6).all(-1).any())
    assert torch.unique(s.sample_means, dim=0).shape[0] == means.shape[0]  # each kept once
    assert stats[VECTOR_LAYER].sample_means.shape == (0, stats[VECTOR_LAYER].in_features)


def test_reservoir_is_uniform_over_rows():
    """Each of 8 equal batches holds ~1/8 of a 32-row reservoir over many seeds (keep-first/keep-last bias fails)."""
    counts = torch.zeros(8)
    for seed in range(60):
        acc = LayerAccumulator("x", 1, seed=seed, reservoir=32, collect_xtx=False)
        for i in range(8):
            acc.update(torch.arange(i * 64, (i + 1) * 64, dtype=torch.float32).reshape(2, 32, 1), timestep=i, step=i, batch_size=1, cfg=True)
        counts += torch.bincount(acc.rows.reshape(-1).long() // 64, minlength=8)
    expected = 60 * 32 / 8  # 240 per batch, binomial σ ≈ 14.5
    assert float((counts - expected).abs().max()) < 60, counts


def test_deterministic_and_seed_dependent(tiny, stats):
    again = calibrate(tiny, **RUN, use_cache=False, progress=False)
    _all_equal(stats, again)
    other = calibrate(tiny, **{**RUN, "seed": 12}, use_cache=False, progress=False, layers=[TOKEN_LAYER])
    assert not torch.equal(other[TOKEN_LAYER].rows, stats[TOKEN_LAYER].rows)


def test_timestep_subset_stops_sampling_early(tiny, stats):
    calls = []
    handle = tiny.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        sub = calibrate(tiny, **RUN, timesteps=[1], use_cache=False, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 1 only
    t1 = stats.timesteps[1]
    assert sub.timesteps == [t1] and list(sub[TOKEN_LAYER].per_timestep) == [t1]
    assert torch.equal(sub[TOKEN_LAYER].absmax, stats[TOKEN_LAYER].absmax_at([t1]))
    assert sub[TOKEN_LAYER].n_rows == stats[TOKEN_LAYER].n_rows // RUN["steps"]


def test_layer_selection_and_no_xtx(tiny):
    sub = calibrate(tiny, **RUN, layers=["*.ff.net.2", VECTOR_LAYER], collect_xtx=False, use_cache=False, progress=False)
    assert list(sub) == [VECTOR_LAYER, "transformer_blocks.0.ff.net.2", TOKEN_LAYER]
    assert sub[TOKEN_LAYER].xtx is None
    with pytest.raises(CalibrationError, match="collect_xtx"):
        sub[TOKEN_LAYER].hessian()
    with pytest.raises(CalibrationError, match="transformer_blocks.0.attn1.to_q"):
        sub["transformer_blocks.0.attn1.to_q"]
    assert "transformer_blocks.0.attn1.to_q" not in sub and TOKEN_LAYER in sub  # as quantize.stats_for asks
    assert sub.get("transformer_blocks.0.attn1.to_q") is None and sub.get(TOKEN_LAYER) is sub[TOKEN_LAYER]
    with pytest.raises(ConfigError, match="layers"):
        calibrate(tiny, layers=["nope"], use_cache=False, progress=False)
    with pytest.raises(ConfigError, match="timesteps"):
        calibrate(tiny, steps=4, timesteps=[4], use_cache=False, progress=False)


def test_hooks_removed_and_other_threads_ignored(tiny, stats, monkeypatch):
    """Forwards of the shared model from another thread (another app session) never enter the statistics."""

    class Intruder:
        def before(self, ctx):
            x = torch.full((2, 3, 16, 16), 1e4)
            worker = threading.Thread(target=lambda: tiny.transformer(x, timestep=torch.tensor([5, 5]), class_labels=torch.tensor([0, 1])))
            worker.start()
            worker.join()

        def after(self, ctx, latents, eps):
            pass

    def with_intruder(*args, hooks=(), **kwargs):
        return sample(*args, hooks=[*hooks, Intruder()], **kwargs)

    monkeypatch.setattr(calibration, "sample", with_intruder)
    polluted = calibrate(tiny, **RUN, use_cache=False, progress=False)
    _all_equal(stats, polluted)
    assert all(not m._forward_pre_hooks for m in tiny.transformer.modules())


def test_nan_raises_naming_layer_and_timestep(tiny):
    broken = copy.deepcopy(tiny.transformer)
    broken.transformer_blocks[1].norm1.linear.weight.data[0, 0] = float("nan")  # → block 1's modulated input is NaN
    pipe = dataclasses.replace(tiny, transformer=broken)
    first_t = calibrate(tiny, **RUN, timesteps=[0], layers=[VECTOR_LAYER], use_cache=False, progress=False).timesteps[0]
    with pytest.raises(CalibrationError, match=rf"'transformer_blocks\.1\.attn1\.to_q' at timestep {first_t} "):
        calibrate(pipe, **RUN, use_cache=False, progress=False)
    assert all(not m._forward_pre_hooks for m in broken.modules())


def _counting_sample(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    monkeypatch.setattr(calibration, "sample", counted)
    return calls


def test_cache_hit_is_equal_and_does_not_run_the_model(tiny, stats, tmp_path, monkeypatch):
    calls = _counting_sample(monkeypatch)
    run = {**RUN, "layers": [VECTOR_LAYER, TOKEN_LAYER]}
    first = calibrate(tiny, **run, cache_dir=tmp_path, progress=False)
    second = calibrate(tiny, **run, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    _all_equal(stats, first, names=run["layers"])
    _all_equal(first, second)
    assert second.settings == first.settings and second.model_key == first.model_key == model_fingerprint(tiny.transformer)
    calibrate(tiny, **{**run, "steps": 3}, cache_dir=tmp_path, progress=False)  # other settings: a miss
    calibrate(tiny, **run, cache_dir=tmp_path, use_cache=False, progress=False)  # bypass
    assert len(calls) == 3
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path))
    calibrate(tiny, **run, progress=False)  # the default directory comes from $DITLAB_CACHE
    assert len(calls) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_json"])
def test_corrupt_cache_entry_is_recomputed(tiny, stats, tmp_path, monkeypatch, damage):
    first = calibrate(tiny, **RUN, layers=[TOKEN_LAYER], cache_dir=tmp_path, progress=False)
    tensor_path, json_path = calib_cache.entry_paths(tmp_path, first.settings["cache_key"])
    blob = bytearray(tensor_path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
        tensor_path.write_bytes(bytes(blob))
    elif damage == "truncate":
        tensor_path.write_bytes(bytes(blob[: len(blob) // 3]))
    elif damage == "no_sidecar":  # a crash between the two renames
        json_path.unlink()
    else:
        json_path.write_text("{not json")
    calls = _counting_sample(monkeypatch)
    again = calibrate(tiny, **RUN, layers=[TOKEN_LAYER], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    _all_equal(first, again)
    assert json.loads(json_path.read_text())["sha256"]  # a valid entry was written back
    calibrate(tiny, **RUN, layers=[TOKEN_LAYER], cache_dir=tmp_path, progress=False)
    assert len(calls) == 1


def test_crash_mid_write_leaves_no_entry(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    def dies(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    out = calibrate(tiny, **RUN, layers=[TOKEN_LAYER], cache_dir=tmp_path, progress=False)  # still returns the stats
    assert out[TOKEN_LAYER].n_rows > 0
    assert list((tmp_path / "calibration").iterdir()) == []  # no temp file, no half entry


def test_fingerprint_changes_with_weights(tiny):
    other = copy.deepcopy(tiny.transformer)
    assert model_fingerprint(other) == model_fingerprint(tiny.transformer)
    other.transformer_blocks[0].ff.net[2].weight.data[3, 5] += 1e-3
    assert model_fingerprint(other) != model_fingerprint(tiny.transformer)


def test_timestep_groups():
    ts = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    groups = timestep_groups(ts)
    assert groups == [[900, 800, 700], [600, 500, 400], [300, 200], [100, 0]]
    assert timestep_groups(3, n_groups=4) == [[0], [1], [2]]
    assert timestep_groups(25, 4) == [list(range(0, 7)), list(range(7, 13)), list(range(13, 19)), list(range(19, 25))]
    with pytest.raises(ConfigError, match="n_groups"):
        timestep_groups(ts, 0)


def test_text_model_calibrates_with_prompts(tmp_path):
    """PixArt: prompts take the place of labels; cross-attention K inputs (text tokens) differ between branches."""
    from ditlab.testing import tiny_pixart_pipeline

    pipe = load_pipeline(tiny_pixart_pipeline(tmp_path / "pixart"))
    k_layer = "transformer_blocks.0.attn2.to_k"
    s = calibrate(pipe, n_samples=2, steps=2, layers=[k_layer, "transformer_blocks.0.attn1.to_q"], use_cache=False, progress=False)
    assert s.settings["prompts"] == list(calibration.DEFAULT_PROMPTS[:2]) and "labels" not in s.settings
    for t in s.timesteps:
        branches = s[k_layer].per_timestep[t]
        assert set(branches) == {"cond", "uncond"}
        assert not torch.equal(branches["cond"]["absmax"], branches["uncond"]["absmax"])  # prompt vs empty prompt


def test_no_guidance_records_a_single_branch(tiny):
    s = calibrate(tiny, **{**RUN, "guidance": 1.0, "steps": 2}, layers=[TOKEN_LAYER], use_cache=False, progress=False)
    layer = s[TOKEN_LAYER]
    assert all(set(b) == {"cond"} for b in layer.per_timestep.values())
    assert layer.n_rows == 2 * 3 * 64 and set(layer.row_info[:, 1].tolist()) == {0}  # 2 steps × 3 images × 64 tokens
