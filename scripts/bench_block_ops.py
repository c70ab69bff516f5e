"""Milliseconds per call of the fused Conv-4 block ops against the torch ops they replace, on the activation
shapes of an Omniglot 5-way 15-query task (75 images, 64 channels).

Rows: ``bn_relu_pool`` (BatchNorm with batch statistics + ReLU + 2x2 max-pool) forward, backward and double
backward on the 28x28, 14x14 and 7x7 maps against ``max_pool2d(relu(batch_norm(x)))`` and its autograd;
the fused stem ``conv3x3_bn_relu_pool`` forward and backward on 75 28x28 images against ``F.conv2d``
followed by the fused tail (what Conv-4's first block runs without the stem); a second-order inner step through
the stem on a 5-image support with its conv as ``conv3x3_patches`` against ``F.conv2d``. Each block-kernel set
(the best the CPU has, AVX2 + FMA via ``METAFORMER_SIMD=avx2``, the generic loops via ``METAFORMER_SIMD=0``)
runs in its own child process, since the choice is made once per process; a set the CPU lacks is reported once
under the set it fell back to.

Usage: .venv/bin/python scripts/bench_block_ops.py [--threads 1] [--repeats 30] [--md-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after one warm-up call."""
    import statistics

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(repeats: int, threads: int) -> dict:
    """All rows in this process: {"kernels": ..., "rows": [(name, fused ms, torch ms), ...]}."""
    import torch
    import torch.nn.functional as F

    from metaformer.ops import batch_norm_relu_pool
    from metaformer.ops.conv_bn_relu_pool import conv3x3_patches
    from training.cpu_allocator import tune_cpu_allocator

    torch.set_num_threads(threads)
    tune_cpu_allocator()
    op = torch.ops.metaformer
    rows = []
    g = torch.Generator().manual_seed(0)
    for size in (28, 14, 7):
        x = torch.randn(75, 64, size, size, generator=g)
        w = (torch.rand(64, generator=g) + 0.5).requires_grad_(True)
        b = torch.randn(64, generator=g).requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        out, mean, invstd, code = op.bn_relu_pool(x, w.detach(), b.detach(), 1e-5)
        go = torch.randn(out.shape, generator=g)
        u = torch.randn(x.shape, generator=g)

        def composite(t):  # noqa: ANN001, ANN202
            return F.max_pool2d(F.relu(F.batch_norm(t, None, None, w, b, True)), 2)

        def composite_grads():  # noqa: ANN202
            return torch.autograd.grad(composite(xg), (xg, w, b), go, create_graph=True)

        def composite_double():  # noqa: ANN202
            gx, gw, gb = composite_grads()
            return torch.autograd.grad((gx * u).sum() + gw.sum() + gb.sum(), (xg, w, b), retain_graph=False)

        with torch.no_grad():
            rows.append((f"bn_relu_pool forward [75, 64, {size}, {size}]",
                         timed_ms(lambda: op.bn_relu_pool(x, w.detach(), b.detach(), 1e-5), repeats),
                         timed_ms(lambda: composite(x), repeats)))
        rows.append((f"bn_relu_pool backward [75, 64, {size}, {size}]",
                     timed_ms(lambda: op.bn_relu_pool_backward(go, x, w.detach(), mean, invstd, code), repeats),
                     timed_ms(lambda: torch.autograd.grad(composite(xg), (xg, w, b), go), repeats)))
        rows.append((f"bn_relu_pool double backward [75, 64, {size}, {size}] (torch: forward+backward+double)",
                     timed_ms(lambda: op.bn_relu_pool_double_backward(u, w.detach(), b.detach(), go, x, w.detach(),
                                                                      mean, invstd, code), repeats),
                     timed_ms(composite_double, repeats)))
    img = torch.rand(75, 1, 28, 28, generator=g)
    cw = (torch.randn(64, 1, 3, 3, generator=g) * 0.3).requires_grad_(True)
    cb = torch.randn(64, generator=g).requires_grad_(True)
    gm = (torch.rand(64, generator=g) + 0.5).requires_grad_(True)
    bt = torch.randn(64, generator=g).requires_grad_(True)
    out, mean, invstd, code = op.conv3x3_bn_relu_pool(img, cw.detach(), None, gm.detach(), bt.detach(), 1e-5)
    go = torch.randn(out.shape, generator=g)

    def unfused():  # noqa: ANN202
        return batch_norm_relu_pool(F.conv2d(img, cw, cb, padding=1), None, None, gm, bt, True)

    with torch.no_grad():
        rows.append(("stem forward [75, 1, 28, 28] -> [75, 64, 14, 14] (torch: conv2d + fused tail)",
                     timed_ms(lambda: op.conv3x3_bn_relu_pool(img, cw.detach(), None, gm.detach(), bt.detach(), 1e-5),
                              repeats),
                     timed_ms(unfused, repeats)))
    rows.append(("stem forward + backward (weight gradients)",
                 timed_ms(lambda: torch.autograd.grad(
                     op.conv3x3_bn_relu_pool(img, cw, cb, gm, bt, 1e-5)[0], (cw, cb, gm, bt), go), repeats),
                 timed_ms(lambda: torch.autograd.grad(unfused(), (cw, cb, gm, bt), go), repeats)))

    # a second-order support pass of the stem: conv + fused tail, a create_graph gradient, an inner step, the
    # query loss through it (the double backward), on a 5-image support; the conv as patches vs F.conv2d
    sx = torch.rand(5, 1, 28, 28, generator=g)
    sgo = torch.randn(5, 64, 14, 14, generator=g)

    def inner_step(conv):  # noqa: ANN001, ANN202
        def run():  # noqa: ANN202
            params = (cw, cb, gm, bt)
            y = batch_norm_relu_pool(conv(sx, cw, cb), None, None, gm, bt, True)
            grads = torch.autograd.grad((y * sgo).sum(), params, create_graph=True)
            fast = [p - 0.4 * gp for p, gp in zip(params, grads)]
            y2 = batch_norm_relu_pool(conv(sx, fast[0], fast[1]), None, None, fast[2], fast[3], True)
            return torch.autograd.grad((y2 * sgo).sum(), params)
        return run

    rows.append(("stem second-order inner step, 5 images (fused: conv as patches @ weight; torch: F.conv2d)",
                 timed_ms(inner_step(conv3x3_patches), repeats),
                 timed_ms(inner_step(lambda x_, w_, b_: F.conv2d(x_, w_, b_, padding=1)), repeats)))
    return {"kernels": str(op.cpu_kernels()), "rows": rows}


def run_child(cmd: list[str], env: dict[str, str], what: str) -> dict:
    """Run one measuring child and parse the JSON of its last line; a failed child ends the run with its stderr."""
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    try:
        if p.returncode == 0 and lines:
            return json.loads(lines[-1])
    except ValueError:
        pass  # reported below with the child's output
    tail = "\n".join((p.stderr.strip() or p.stdout.strip() or "(no output)").splitlines()[-20:])
    raise SystemExit(f"bench_block_ops.py: the child for {what} failed (exit status {p.returncode}); the end of its "
                     f"output:\n{tail}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run one child per kernel setting and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (>= 1)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per row, median reported (>= 1)")
    ap.add_argument("--md-out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    # checked here: a child's own error would only surface as its exit status
    if a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1 (the median of that many calls), got {a.repeats}")
    if a.child:
        print(json.dumps(measure(a.repeats, a.threads)))
        return
    import torch

    results = {}
    for simd in ("1", "avx2", "0"):
        env = {**os.environ, "METAFORMER_SIMD": simd, "OMP_NUM_THREADS": str(a.threads)}
        cmd = [sys.executable, __file__, "--child", "--threads", str(a.threads), "--repeats", str(a.repeats)]
        res = run_child(cmd, env, f"METAFORMER_SIMD={simd}")
        results.setdefault(res["kernels"], res)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"Command: `.venv/bin/python scripts/bench_block_ops.py {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, {a.threads} thread(s), glibc allocator tuned, commit {commit}, "
        f"{os.cpu_count()} CPUs, load average {tuple(round(x, 1) for x in os.getloadavg())}; median of {a.repeats} calls.",
        "",
        "| op | kernels | fused ms | torch ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for kernels, res in results.items():
        for name, fused, ref in res["rows"]:
            lines.append(f"| {name} | {kernels} | {fused:.2f} | {ref:.2f} | {ref / fused:.1f}x |")
    table = "\n".join(lines)
    print(table)
    if a.md_out:
        Path(a.md_out).write_text(table + "\n")


if __name__ == "__main__":
    main()
