"""Benchmark of the fused inner-loop update against torch._foreach, a Python loop and a plain copy_.

Prints, side by side in one run, microseconds per call and GB/s (bytes read and written: parameters,
gradients and outputs; for copy_ the source and destination) for:
  (a) the conv-4 parameter list (18 tensors, about 112k parameters) with T = 1 and T = 32 tasks,
  (b) the sinusoid MLP list (1-40-40-1) with T = 25,
  (c) 16M and 64M parameters (T = 1),
The out-of-place rows include allocating the outputs (fresh pages, first touched by the update); the
in-place row (`inner_update_`) and copy_ write into existing memory.
and CUDA rows when a GPU is present. `--quick` runs fewer repetitions (the README smoke run).

    python scripts/bench_inner_update.py [--quick] [--device cpu|cuda|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from metaformer.ops import backend, inner_update, inner_update_


def conv4_shapes(in_channels: int = 1, hidden: int = 64, n_way: int = 5) -> list[tuple[int, ...]]:
    """Parameter shapes of conv-4 (4 x [conv weight, conv bias, BN weight, BN bias]) plus its 5-way classifier."""
    shapes: list[tuple[int, ...]] = []
    cin = in_channels
    for _ in range(4):
        shapes += [(hidden, cin, 3, 3), (hidden,), (hidden,), (hidden,)]
        cin = hidden
    return shapes + [(n_way, hidden), (n_way,)]


def mlp_shapes(sizes: tuple[int, ...] = (1, 40, 40, 1)) -> list[tuple[int, ...]]:
    """Parameter shapes of a fully connected net with the given layer sizes."""
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        shapes += [(b, a), (b,)]
    return shapes


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, min_seconds: float) -> float:
    """Median seconds per call over `repeats` batches, each running at least min_seconds / repeats."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(min_seconds / repeats / once))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def bench_case(name: str, shapes: list[tuple[int, ...]], tasks: int, device: torch.device, repeats: int,
               min_seconds: float) -> list[dict]:
    """Time the four implementations of `params - lr * grads` on one parameter list; return table rows."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn((tasks, *s), generator=gen).to(device) for s in shapes]
    grads = [torch.randn((tasks, *s), generator=gen).to(device) for s in shapes]
    numel = sum(p.numel() for p in params)
    lr = 0.01
    dst = [torch.empty_like(p) for p in params]

    def fused() -> object:
        return inner_update(params, grads, lr)

    def fused_inplace() -> object:
        inner_update_(params, grads, lr)
        return params

    def foreach() -> object:
        return torch._foreach_add(params, torch._foreach_mul(grads, -lr))

    def foreach_inplace() -> object:
        torch._foreach_add_(params, grads, alpha=-lr)
        return params

    def loop() -> object:
        return [p - lr * g for p, g in zip(params, grads)]

    def copy() -> object:
        for d, p in zip(dst, params):
            d.copy_(p)
        return dst

    # Sanity check that the rows compute the same thing before timing them.
    for a, b in zip(fused(), loop()):
        torch.testing.assert_close(a, b)
    update_bytes = 3 * numel * 4
    rows = []
    for impl, fn, nbytes in [("fused op", fused, update_bytes), ("fused op, in place", fused_inplace, update_bytes),
                             ("torch._foreach", foreach, update_bytes),
                             ("torch._foreach, in place", foreach_inplace, update_bytes),
                             ("python loop", loop, update_bytes), ("copy_ (limit)", copy, 2 * numel * 4)]:
        with torch.no_grad():
            sec = time_call(fn, device, repeats, min_seconds)
        rows.append({"case": name, "device": device.type, "tensors": len(shapes), "tasks": tasks, "params": numel,
                     "impl": impl, "us_per_call": sec * 1e6, "gb_per_s": nbytes / sec / 1e9})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run every case on the chosen devices and print one markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions and no 64M case: a smoke run")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine; run on a GPU machine "
                 "or use --device cpu")
    repeats, min_seconds = (3, 0.3) if args.quick else (7, 2.0)
    cases = [("conv-4", conv4_shapes(), 1), ("conv-4", conv4_shapes(), 32), ("sinusoid MLP", mlp_shapes(), 25),
             ("16M", [(16 * 2**20,)], 1)]
    if not args.quick:
        cases.append(("64M", [(64 * 2**20,)], 1))
    print(f"backend: {backend()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"cpu {platform.processor() or platform.machine()}"
          + (f"  gpu {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    rows = []
    for device in devices:
        for name, shapes, tasks in cases:
            rows += bench_case(name, shapes, tasks, device, repeats, min_seconds)
    print("| case | device | T | params | impl | us/call | GB/s | vs python loop |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["case"] == row["case"] and r["tasks"] == row["tasks"]
                    and r["device"] == row["device"] and r["impl"] == "python loop")
        print(f"| {row['case']} | {row['device']} | {row['tasks']} | {row['params']:,} | {row['impl']} | "
              f"{row['us_per_call']:.1f} | {row['gb_per_s']:.1f} | {base['us_per_call'] / row['us_per_call']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
