"""Concurrent users of the app (issue 9, part 2), through gradio_client against a server started in this process.

1. Five sessions at once, each with its own recipe (w8a8-rtn, w4a8-rtn, w8a8-smoothquant, a hand-edited table, and one
   that stays on the shipped model): every result equals the same job run alone, no session sees another's settings,
   the quantized-copy cache never holds more than its bound, at most ``HEAVY`` jobs run at once, RSS growth is printed.
2. Cancelling a long job frees its worker: with both heavy workers busy, a queued job starts once one is cancelled
   and finishes while the other long job is still running (asserted on job states, never on wall time).

Equality is exact (pixels, metric strings, figure numbers, tables) except the measured seconds: the initial noise
comes from a per-call ``torch.Generator`` seeded by the request, DDIM adds no noise, integer GEMMs are exact and the
float kernels on a fixed thread count are deterministic, and images travel as lossless PNG. Any cross-talk between
sessions (a shared RNG, a hook on the shared FP model, a cache keyed without the session) breaks exact equality.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
import weakref
from contextlib import contextmanager

import numpy as np
import pytest
import requests
from PIL import Image

from ditlab import jobs, outliers as outliers_mod, recipe_editing
from ditlab import workbench
from ditlab.testing import tiny_dit_pipeline

app = pytest.importorskip("app")
import gradio.networking  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

pytestmark = pytest.mark.slow

HEAVY_WORKERS = app.HEAVY["concurrency_limit"]
EDITED_ROW = "transformer_blocks.1.ff.net.2"  # the hand-edited session's table edit (W4 on one row)
SESSIONS = {  # name → (first recipe, second recipe, outliers layer); "edited" hand-edits the first recipe's table
    "rtn8": ("w8a8-rtn", "w4a16-rtn", "transformer_blocks.0.attn1.to_q"),
    "rtn4": ("w4a8-rtn", "w8a8-rtn-static", "transformer_blocks.0.ff.net.2"),
    "smooth": ("w8a8-smoothquant", "w4a8-hadamard", "transformer_blocks.1.attn1.to_v"),
    "edited": ("w8a8-rtn", "w4a8-hadanorm", "transformer_blocks.1.ff.net.0.proj"),
}


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class CountingJobs(jobs.Jobs):
    """app.JOBS that also counts how many jobs run at the same moment (exact, not sampled)."""

    def __init__(self):
        super().__init__()
        self.running = self.peak = self.total = 0
        self._count = threading.Lock()

    @contextmanager
    def run(self, session, name="job"):
        with self._count:
            self.running += 1
            self.total += 1
            self.peak = max(self.peak, self.running)
        try:
            with super().run(session, name) as event:
                yield event
        finally:
            with self._count:
                self.running -= 1


class CountingCache(jobs.QuantCache):
    """app.QUANTIZED that records its largest size after every insertion and keeps weak references to every copy made."""

    def __init__(self, max_entries: int):
        super().__init__(max_entries)
        self.peak = self.made = 0
        self._refs: list = []  # weak references to every copy made (Quantized is not hashable: no WeakSet)

    def get(self, session, pipe, recipe, quantize):
        def counted(p, r):
            q = quantize(p, r)
            self.made += 1
            self._refs.append(weakref.ref(q))
            return q
        return super().get(session, pipe, recipe, counted)

    def alive(self) -> int:
        return sum(r() is not None for r in self._refs)

    def put(self, session, pipe, recipe, value):
        super().put(session, pipe, recipe, value)
        with self._lock:
            self.peak = max(self.peak, len(self._items))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(tiny_dit_pipeline(tmp_path_factory.mktemp("conc") / "tiny-dit"))


def _patient_url_ok(url: str) -> bool:
    """gradio's launch-time reachability check with room for a loaded machine (gradio gives up after one 3 s timeout)."""
    import httpx

    for _ in range(10):
        try:
            if httpx.head(url, timeout=30).status_code < 400:
                return True
        except httpx.HTTPError:
            time.sleep(1)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port, with small analysis settings, a private cache and instrumented JOBS / QUANTIZED."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITLAB_CACHE", str(tmp_path_factory.mktemp("conc-cache")))
        mp.setitem(workbench.APP_CALIBRATION, "n_samples", 2)
        mp.setitem(workbench.APP_CALIBRATION, "steps", 4)
        mp.setattr(app, "JOBS", CountingJobs())
        mp.setattr(app, "QUANTIZED", CountingCache(app.QUANTIZED.max_entries))
        mp.setattr(gradio.networking, "url_ok", _patient_url_ok)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/", mp
        finally:
            app.demo.close()


def _client(url: str) -> Client:
    """A new session; generous HTTP timeouts (the server shares 2 cores with the jobs it runs)."""
    return Client(url, verbose=False, httpx_kwargs={"timeout": 300})


# ---------------------------------------------------------------- one session's script and its comparable results
def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _figure_data(plot) -> list:
    """The traces of a gr.Plot output (plotly JSON), the numbers a user sees."""
    fig = json.loads(plot["plot"]) if isinstance(plot, dict) and "plot" in plot else plot
    fig = json.loads(fig) if isinstance(fig, str) else fig
    return fig["data"]


def _compare_result(out) -> dict:
    fp, q, diff, metrics, divergence, status = out
    rows = [row[:2] for row in metrics["data"] if not str(row[0]).startswith("seconds")]  # measured times differ
    return {"fp": _png(fp), "q": _png(q), "diff": _png(diff), "metrics": rows, "divergence": _figure_data(divergence), "status": status}


def _outliers_result(out) -> dict:
    fig, table, omap, msg = out
    return {"fig": _figure_data(fig), "table": table["data"], "map": _figure_data(omap), "msg": msg}


def _hand_edit(table: dict) -> dict:
    """The table with EDITED_ROW set to 4 weight bits, as a user would type it."""
    edited = json.loads(json.dumps(table))
    col, name = edited["headers"].index("w_bits"), edited["headers"].index("name")
    rows = [r for r in edited["data"] if r[name] == EDITED_ROW]
    assert len(rows) == 1
    rows[0][col] = 4
    return edited


def run_session(url: str, name: str, tiny: str, timesteps: list[int], seed: int, record: dict) -> None:
    """One user's jobs; results go to ``record[name]``. Jobs of one session overlap (compare + outliers submitted
    together), sessions overlap with each other when several run_session threads run."""
    client = _client(url)
    out: dict = {}
    if name == "shipped":  # never loads a model: must keep seeing the shipped model whatever the others load
        out["preset"] = client.predict("w8a8-rtn", api_name="/apply_preset")
        out["preset2"] = client.predict("w4a8-rtn", api_name="/apply_preset")
        record[name] = out
        return
    first, second, layer = SESSIONS[name]
    loaded = client.predict("local folder", tiny, api_name="/load_model")
    assert loaded[-1].startswith("✓"), loaded[-1]
    table, recipe, *_, msg = client.predict(first, api_name="/apply_preset")
    assert msg.startswith("✓"), msg
    if name == "edited":  # a hand edit in the table, then a bulk edit on top of it (the table's edits are kept)
        table, recipe, *_, msg = client.predict(_hand_edit(table), recipe, "fc1", "W4A8 g32", api_name="/bulk_edit")
        assert msg.startswith("✓"), msg
    out["table"], out["recipe"] = table, json.loads(recipe)
    compare = client.submit(recipe, ["0", "1"], 1, seed, 3, 4.0, "cpu-int", api_name="/compare")
    outl = client.submit(layer, timesteps[seed % len(timesteps)], ("cond", "uncond")[seed % 2], api_name="/outliers")
    out["compare"], out["outliers"] = _compare_result(compare.result(timeout=600)), _outliers_result(outl.result(timeout=600))
    out["compare2"] = _compare_result(client.predict(second, ["2", "3"], 1, seed + 10, 2, 4.0, "cpu-int", api_name="/compare"))
    record[name] = out


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, np.ndarray):
        assert a.shape == b.shape and np.array_equal(a, b), f"{where}: {int((a != b).sum()) if a.shape == b.shape else 'shape'} pixels differ"
    else:
        assert a == b, f"{where}: {str(a)[:200]} != {str(b)[:200]}"


# ---------------------------------------------------------------- the tests
def test_concurrent_sessions_equal_solo_runs_and_stay_bounded(server, tiny, tmp_path):
    url, mp = server
    timesteps = workbench.calibration_timesteps(app.api.load(tiny))
    names = ["shipped", *SESSIONS]
    jobs, cache = app.JOBS, app.QUANTIZED
    rss0, _ = _rss_mb()

    concurrent: dict = {}
    errors: list = []

    def guarded(name, seed):
        try:
            run_session(url, name, tiny, timesteps, seed, concurrent)
        except BaseException as exc:  # noqa: BLE001 - reported below with the session's name
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded, args=(n, i)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    assert not errors, errors
    assert set(concurrent) == set(names)
    rss1, hwm1 = _rss_mb()
    jobs_concurrent, peak_running = jobs.total, jobs.peak

    # The same jobs alone, one session at a time, from scratch: a fresh calibration cache and no captured activations.
    mp.setenv("DITLAB_CACHE", str(tmp_path / "solo-cache"))
    mp.setattr(outliers_mod, "_CACHE", type(outliers_mod._CACHE)())
    solo: dict = {}
    for i, name in enumerate(names):
        run_session(url, name, tiny, timesteps, i, solo)
        _assert_equal(concurrent[name], solo[name], name)

    # No settings leak: each table shows its own recipe; the shipped session still sees the shipped model.
    for key, preset in (("preset", "w8a8-rtn"), ("preset2", "w4a8-rtn")):
        assert concurrent["shipped"][key][0]["data"] == recipe_editing.recipe_table(app.PIPE, app.api.PRESETS[preset]).values.tolist()
    tiny_pipe = app.api.load(tiny)
    for name, (first, *_rest) in SESSIONS.items():
        table = concurrent[name]["table"]
        expected = recipe_editing.recipe_table(tiny_pipe, app.api.PRESETS[first])
        assert table["headers"] == list(expected.columns)
        if name != "edited":  # exactly the preset's table: nobody else's edit shows up
            assert table["data"] == expected.values.tolist(), name
            assert concurrent[name]["recipe"] == json.loads(app.api.PRESETS[first].to_json())
        else:  # the own edits and only those: the hand-edited row and the bulk-edited fc1 rows differ from the preset
            changed = {row[0] for row, ref in zip(table["data"], expected.values.tolist()) if row != ref}
            fc1 = set(expected.loc[expected["kind"] == "fc1", "name"])
            assert changed == {EDITED_ROW} | fc1, changed
    assert concurrent["edited"]["recipe"]["overrides"], "the hand edit must reach the recipe"
    assert concurrent["edited"]["recipe"] != concurrent["rtn8"]["recipe"]

    # Bounded memory: the cache never held more than its bound, although more copies than that were made; after the
    # jobs end only the cached copies stay alive; at most HEAVY_WORKERS jobs ever ran at once (and that many did).
    gc.collect()
    assert cache.made > cache.max_entries, f"only {cache.made} quantized copies made: the bound was never exercised"
    assert cache.peak <= cache.max_entries and len(cache) <= cache.max_entries
    assert cache.alive() <= cache.max_entries, f"{cache.alive()} quantized copies alive after gc (bound {cache.max_entries})"
    assert peak_running == HEAVY_WORKERS, f"{peak_running} jobs ran at once (heavy workers: {HEAVY_WORKERS})"
    rss2, hwm2 = _rss_mb()
    print(f"\nconcurrency: {len(names)} sessions, {jobs_concurrent} heavy jobs concurrently + {jobs.total - jobs_concurrent} solo, "
          f"failures 0, peak jobs at once {peak_running}, quantized copies made {cache.made}, cache peak {cache.peak}/{cache.max_entries}, "
          f"alive after gc {cache.alive()}; RSS {rss0:.0f} MB → {rss1:.0f} MB after the concurrent phase (peak {hwm1:.0f}) "
          f"→ {rss2:.0f} MB after the solo phase (peak {hwm2:.0f})")


def test_cancel_frees_the_worker_for_the_queued_job(server, tiny):
    url, _ = server
    jobs = app.JOBS
    long_a, long_b, short = (_client(url) for _ in range(3))
    assert short.predict("local folder", tiny, api_name="/load_model")[-1].startswith("✓")
    # long_a / long_b: the shipped model, 64 images × 100 steps (the slider maximum) — minutes of work unless cancelled
    fp = app.api.PRESETS["fp"].to_json()
    big = (fp, [str(i) for i in range(8)], 8, 0, 100, 4.0, "cpu-int")
    job_a = long_a.submit(*big, api_name="/compare")
    job_b = long_b.submit(*big, api_name="/compare")
    _wait(lambda: {long_a.session_hash, long_b.session_hash} <= jobs.sessions_running(), "both long jobs running")
    job_s = short.submit(fp, ["0"], 1, 0, 2, 4.0, "cpu-int", api_name="/compare")
    _wait(lambda: job_s.status().code == Status.IN_QUEUE, "the short job queued")
    assert short.session_hash not in jobs.sessions_running() and not job_s.done()  # both heavy workers are taken

    assert long_a.predict(api_name="/cancel") == "cancelled 1 job(s) (Compare); the worker is free"
    assert "cancelled" in job_a.result(timeout=300)[-1]
    result = job_s.result(timeout=600)  # the freed worker takes the queued job …
    assert result[-1].startswith("recipe **fp**"), result[-1]
    # … while the other long job still holds the other worker: it is still running, and ends only when cancelled
    assert not job_b.done() and long_b.session_hash in jobs.sessions_running(), "the second long job ended before the short one"
    assert long_b.predict(api_name="/cancel") == "cancelled 1 job(s) (Compare); the worker is free"
    assert "cancelled" in job_b.result(timeout=300)[-1]
    assert not jobs.sessions_running()


def _wait(condition, what: str, limit: float = 600) -> None:
    """Polls ``condition`` (a liveness bound, not a timing assertion: it only fails if the state is never reached)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.2)


def test_a_copy_made_while_another_session_calibrates_carries_none_of_its_hooks(tiny, monkeypatch):
    """Session A calibrates (forward hooks on the shared FP model, collecting A's statistics) while session B quantizes
    (a deep copy of that model): B's copy must not inherit A's hooks — they would keep A's accumulators alive in B's
    cached copy and feed them B's activations whenever A's thread runs B's model — and the FP model ends with none."""
    from ditlab import calibration

    pipe = app.api.load(tiny)
    inside, release = threading.Event(), threading.Event()
    real_sample = calibration.sample

    def paused_sample(*args, **kwargs):  # A stops here with its hooks installed
        inside.set()
        assert release.wait(600), "never released"
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(calibration, "sample", paused_sample)
    session_a = threading.Thread(target=lambda: app.api.calibrate(pipe, n_samples=1, steps=2, use_cache=False, progress=False))
    session_a.start()
    try:
        assert inside.wait(600), "calibration never started"
        hooked = sum(len(m._forward_pre_hooks) for m in pipe.transformer.modules())
        assert hooked > 0  # A's hooks are on the shared model now
        q = app.api.quantize(pipe, "w8a8-rtn", calib_settings=None, progress=False)  # session B
    finally:
        release.set()
        session_a.join()
    foreign = [n for n, m in q.pipe.transformer.named_modules() if m._forward_pre_hooks]
    assert foreign == [], f"{len(foreign)} modules of the quantized copy carry another session's hooks, e.g. {foreign[:3]}"
    assert sum(len(m._forward_pre_hooks) for m in pipe.transformer.modules()) == 0


def test_the_queue_refuses_requests_beyond_its_size(server, tiny):
    """With both heavy workers held, requests beyond the queue's max_size are refused (QUEUE_FULL), so waiting work
    — and the memory it would take — is bounded; once the workers are free every accepted request completes."""
    url, _ = server
    size = app.demo._queue.max_size
    fp = app.api.PRESETS["fp"].to_json()
    holders = [_client(url) for _ in range(HEAVY_WORKERS)]
    long_jobs = [h.submit(fp, [str(i) for i in range(8)], 8, 0, 100, 4.0, "cpu-int", api_name="/compare") for h in holders]
    _wait(lambda: {h.session_hash for h in holders} <= app.JOBS.sessions_running(), "the workers held")
    flood = Client(url, verbose=False, httpx_kwargs={"timeout": 300}, download_files=False)  # statuses only
    assert flood.predict("local folder", tiny, api_name="/load_model")[-1].startswith("✓")
    jobs = [flood.submit(fp, ["0"], 1, 0, 1, 4.0, "cpu-int", api_name="/compare") for _ in range(size + 4)]
    _wait(lambda: all(j.done() or j.status().code == Status.IN_QUEUE for j in jobs), "every request queued or refused")
    refused = [j for j in jobs if j.done()]  # nothing can have run: both heavy workers are held
    assert all("Queue is full" in str(j.exception()) for j in refused), [str(j.exception()) for j in refused]
    assert 4 <= len(refused) and len(jobs) - len(refused) <= size, f"{len(refused)} of {len(jobs)} refused (max_size {size})"
    for h, job in zip(holders, long_jobs):  # /cancel is not queued: a direct POST reaches the job while the queue is full
        reply = requests.post(f"{url.rstrip('/')}/gradio_api/run/cancel", json={"data": [], "session_hash": h.session_hash}, timeout=60)
        assert reply.status_code == 200 and reply.json()["data"][0] == "cancelled 1 job(s) (Compare); the worker is free", reply.text
        assert "cancelled" in job.result(timeout=300)[-1]
    for job in jobs:
        if job not in refused:
            assert job.result(timeout=600)[-1].startswith("recipe **fp**")
