"""The app's two user-facing latencies, measured end to end over HTTP (gradio_client) against `python app.py`:

1. time to first images: from starting the process until the first screen's FP grid (app.FIRST_SCREEN: 10 classes ×
   5 images, 25 steps) arrives;
2. Compare with the w8a8-viditq preset on 8 images at 20 steps: cold (calibration + quantization + both samplings,
   with an empty calibration cache) and warm (the session's quantized copy cached; both samplings again).

Run:  HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False .venv/bin/python benchmarks/bench_app.py [--threads 2]
Prints a table; nothing is downloaded. The process uses a private, empty DITLAB_CACHE unless --keep-cache is given.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_client(url: str, proc: subprocess.Popen, timeout: float = 300.0):
    from gradio_client import Client

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app exited with code {proc.returncode}")
        try:
            return Client(url, verbose=False)
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    raise SystemExit(f"app did not answer within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the app process")
    ap.add_argument("--keep-cache", action="store_true", help="use the normal calibration cache (warm start) instead of an empty one")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ditlab.config import PRESETS

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "DITLAB_PORT": str(port), "DITLAB_HOST": "127.0.0.1",
           "OMP_NUM_THREADS": str(args.threads)}
    if not args.keep_cache:
        env["DITLAB_CACHE"] = tempfile.mkdtemp(prefix="bench-app-cache-")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = wait_for_client(f"http://127.0.0.1:{port}/", proc)
        t_up = time.perf_counter() - t0
        first = dict(labels=list(range(10)), n_per_label=5, seed=0, steps=25, guidance=4.0)  # = app.FIRST_SCREEN
        _, status = client.predict(*first.values(), api_name="/generate")
        t_first = time.perf_counter() - t0
        recipe = PRESETS["w8a8-viditq"].to_json()
        rows = []
        for label in ("cold", "warm"):
            t = time.perf_counter()
            *_, metrics, _, c_status = client.predict(recipe, list(range(8)), 1, 0, 20, 4.0, "cpu-int", api_name="/compare")
            seconds = time.perf_counter() - t
            if not str(c_status).startswith("recipe"):
                raise SystemExit(f"compare failed: {c_status}")
            m = {row[0]: row[1] for row in metrics["data"]}
            rows.append((label, seconds, m.get("seconds FP"), m.get("seconds quantized"), m.get("PSNR (dB)")))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"# bench_app (torch threads {args.threads}, {'warm' if args.keep_cache else 'empty'} calibration cache)")
    print(f"server answering after launch      {t_up:7.1f} s")
    print(f"first images (50 FP, 25 steps)     {t_first:7.1f} s after launch   [{status}]")
    print("compare w8a8-viditq, 8 images, 20 steps:")
    print(f"  {'run':<5} {'total s':>8} {'FP s':>7} {'quant s':>8} {'PSNR dB':>8}")
    for label, seconds, s_fp, s_q, psnr in rows:
        print(f"  {label:<5} {seconds:8.1f} {s_fp:>7} {s_q:>8} {psnr:>8}")
    print(json.dumps({"server_up_s": round(t_up, 2), "first_images_s": round(t_first, 2),
                      "compare_cold_s": round(rows[0][1], 2), "compare_warm_s": round(rows[1][1], 2)}))


if __name__ == "__main__":
    main()
