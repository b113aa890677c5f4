"""Forward time of the bitsandbytes baselines on the CPU vs fp32 / bf16 nn.Linear; chooses Linear4bit's compute dtype.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bnb_speed.py [--repeats 15] [--threads 2]
Prints a markdown table of best-of-N milliseconds per forward (and relative output error) for linear shapes of the
shipped tiny DiT (batch 8 with CFG = 16 images × 64 tokens) and of DiT-XL/2 (batch 2 with CFG = 4 × 256 tokens).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ditlab.methods.bnb import to_4bit, to_int8

SHAPES = [  # (name, in K, out N, tokens M)
    ("tiny qkv", 192, 192, 1024),
    ("tiny fc1", 192, 768, 1024),
    ("tiny fc2", 768, 192, 1024),
    ("tiny adaLN", 192, 1152, 16),
    ("XL qkv", 1152, 1152, 1024),
    ("XL fc1", 1152, 4608, 1024),
    ("XL fc2", 4608, 1152, 1024),
    ("XL adaLN", 1152, 6912, 4),
]


def best_ms(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)  # warm-up (first-call allocations, bitsandbytes dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)  # best of N: robust to other processes sharing the 2 cores


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cols = ["fp32", "bf16", "int8", "nf4 fp32", "nf4 bf16", "fp4 fp32", "fp4 bf16"]
    print(f"threads={args.threads}, best of {args.repeats} (ms per forward; relative output error in parentheses)\n")
    print("| layer | K→N, M |", " | ".join(cols), "|")
    print("|---|---|" + "---|" * len(cols))
    for name, k, n, m in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(k, n)
        x = torch.randn(m, k)
        ref = linear(x)
        bf16 = nn.Linear(k, n).to(torch.bfloat16)
        bf16.load_state_dict(linear.state_dict())
        modules = {"fp32": linear, "bf16": lambda t: bf16(t.bfloat16()).float(), "int8": to_int8(linear)}
        for qt in ("nf4", "fp4"):
            modules[f"{qt} fp32"] = to_4bit(linear, qt, torch.float32)
            modules[f"{qt} bf16"] = to_4bit(linear, qt, torch.bfloat16)
        cells = []
        for col in cols:
            fn = modules[col]
            err = float((fn(x).float() - ref).norm() / ref.norm())
            cells.append(f"{best_ms(fn, x, args.repeats):.2f} ({err:.3f})")
        print(f"| {name} | {k}→{n}, {m} |", " | ".join(cells), "|")


if __name__ == "__main__":
    main()
