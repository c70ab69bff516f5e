#!/usr/bin/env python3
"""Where a Conv-4 second-order MAML step spends its time on this CPU, and what bf16 autocast does to it.

The setup of scripts/bench_meta_train.py (Omniglot-shaped 5-way 1-shot, 15 queries, the Finn et al. Conv-4
with batch statistics, meta-batch 32, one inner step, second order, the metaformer loop path), on the
weights and batch that script derives from ``--seed``. Prints:

- the CPU's vector ISA as torch sees it and whether oneDNN runs bf16 natively (AVX-512 BF16 / AMX);
- meta-steps per second in fp32 and under bf16 autocast (median of ``--timed`` steps after one warm-up),
  and the bf16 meta-gradient's relative error and cosine similarity against the fp32 one;
- the fp32 step's self CPU time by operator family (convolution, batch norm, max-pool, ReLU, zero-fill,
  the inner-loop update, the rest) from ``torch.profiler``.

Usage: .venv/bin/python scripts/profile_conv4_maml.py [--threads 1] [--timed 3] [--no-bf16] [--json-out F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_meta_train as bench  # noqa: E402  (the benchmark's network and batch, not a copy of them)
from metaformer.data import EpisodeBatch  # noqa: E402
from training.cpu_allocator import tune_cpu_allocator  # noqa: E402
from training.trainer import cpu_has_fast_bf16  # noqa: E402

# Operator families of the profile, matched on the aten name (first match wins).
FAMILIES = (
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batch norm", ("batch_norm",)),
    ("max-pool", ("max_pool",)),
    ("ReLU", ("threshold_backward", "clamp_min", "relu")),
    ("zero-fill", ("fill_", "zero_")),
    ("inner-loop update", ("inner_update",)),
)


def family(name: str) -> str:
    """The operator family of one profiler row."""
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "rest"


def build(seed: int) -> tuple[torch.nn.Module, EpisodeBatch]:
    """The benchmark's MAML head (loop path, 1 step, second order) on its initial weights and meta-batch."""
    peer, (xs, ys, xq, yq) = bench.initial_setup("omniglot", seed)
    head, _ = bench.build_our_head("omniglot", peer, 1, False, "loop")
    return head, bench.episode_batch("omniglot", xs, ys, xq, yq)


def meta_grad(head: torch.nn.Module, batch: EpisodeBatch, bf16: bool) -> tuple[float, torch.Tensor]:
    """One meta-gradient: (seconds, flat gradient)."""
    for p in head.parameters():
        p.grad = None
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        head.meta_backward(batch)
    dt = time.perf_counter() - t0
    return dt, torch.cat([p.grad.flatten().float() for p in head.parameters()])


def timed(head: torch.nn.Module, batch: EpisodeBatch, bf16: bool, n: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``n`` meta-gradients after one warm-up, and the last gradient."""
    meta_grad(head, batch, bf16)
    times, grad = [], None
    for _ in range(n):
        dt, grad = meta_grad(head, batch, bf16)
        times.append(dt)
    return statistics.median(times), grad


def profile_families(head: torch.nn.Module, batch: EpisodeBatch) -> dict[str, float]:
    """Self CPU seconds of one fp32 meta-step per operator family."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        meta_grad(head, batch, False)
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or "inner_update" in ev.key:
            fam = family(ev.key)
            out[fam] = out.get(fam, 0.0) + ev.self_cpu_time_total / 1e6
    return out


def main() -> None:
    """Run the comparison and the profile; print a short report (and write JSON if asked)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timed", type=int, default=3, help="timed meta-steps per precision (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast timing (slow without AMX)")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tuned = tune_cpu_allocator()
    head, batch = build(a.seed)
    res: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_native_bf16": cpu_has_fast_bf16(),
                 "threads": torch.get_num_threads(), "allocator_tuned": tuned, "torch": torch.__version__,
                 "meta_batch": batch.support_x.shape[0]}
    print(f"torch {torch.__version__}, CPU ISA {res['cpu_capability']}, oneDNN native bf16: "
          f"{res['onednn_native_bf16']}, {res['threads']} thread(s), allocator tuned: {tuned}", flush=True)
    t32, g32 = timed(head, batch, False, a.timed)
    res["fp32_s_per_step"] = t32
    print(f"fp32: {t32:.2f} s per meta-step ({res['meta_batch'] / t32:.2f} tasks/s)", flush=True)
    if not a.no_bf16:
        t16, g16 = timed(head, batch, True, a.timed)
        rel = float((g16 - g32).norm() / g32.norm())
        cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
        res.update(bf16_s_per_step=t16, bf16_vs_fp32_speed=t32 / t16, bf16_grad_rel_err=rel, bf16_grad_cos=cos)
        print(f"bf16 autocast: {t16:.2f} s per meta-step ({t32 / t16:.2f}x fp32's speed); meta-gradient vs fp32: "
              f"relative error {rel:.3f}, cosine {cos:.4f}", flush=True)
    fams = profile_families(head, batch)
    total = sum(fams.values())
    res["fp32_profile_s"] = fams
    print(f"fp32 meta-step under the profiler: {total:.2f} s of self CPU time")
    for fam, sec in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:18s} {sec:6.2f} s  {100 * sec / total:5.1f}%")
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
