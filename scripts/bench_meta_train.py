#!/usr/bin/env python3
r"""MAML meta-training speed of the metaformer heads side by side with learn2learn, higher, TorchOpt and a
plain PyTorch loop, on the same network, batch and initial weights, checking that the meta-gradients agree.

Setups (those of ../shared/bench/peers_maml.py, whose child processes run the peers):
  omniglot : 5-way 1-shot, 15 queries/class, 1x28x28, Finn et al. conv-4 (BatchNorm with batch statistics),
             meta-batch 32, inner lr 0.4, cross-entropy;
  sinusoid : MLP 1-40-40-1, K = 10 support / 10 query, meta-batch 25, inner lr 0.01, MSE;
each with 1 and 5 inner steps, second order (so) and first order (fo).

Every cell runs in a fresh child process (peak RSS = that cell alone): the peers in the peers' venv
(``--peers-python``, default /tmp/peers/venv/bin/python, built by ../shared/bench/setup_venv.sh, because
learn2learn / higher / TorchOpt are not installed in .venv), metaformer in this interpreter. A child
(1) computes the meta-gradient at the shared initial weights on the shared batch (saved for the check),
(2) runs ``--warmup`` more meta-train steps (meta-gradient + Adam), (3) times ``--timed`` steps; median.
The meta-gradients are compared with the plain loop in float32 and in float64.

``--device cuda`` runs every cell on the GPU: ours with the head and the batch on the device, the peers through
scripts/peers_on_device.py, which runs peers_maml.py's own implementations with the network and batch moved there;
the clock stops after the device has finished each step, and the table adds each cell's peak GPU memory and its
speed against learn2learn. The float64 reference stays the plain loop on the CPU.

Usage: .venv/bin/python scripts/bench_meta_train.py [--configs omniglot,sinusoid] [--steps-list 1,5]
       [--orders so,fo] [--timed 3] [--threads 2] [--md-out docs/bench_meta_train.md]
       .venv/bin/python scripts/bench_meta_train.py --device cuda --configs omniglot --peers-python python3 \
           --peers-script path/to/peers_maml.py --json-out gpu_meta_train.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
PEERS_SCRIPT = ROOT.parent / "shared" / "bench" / "peers_maml.py"
DEVICE_PEERS = Path(__file__).resolve().with_name("peers_on_device.py")
PEER_IMPLS = ["plain", "l2l", "higher", "torchopt_func", "torchopt_metasgd"]
OUR_IMPLS = ["metaformer_loop", "metaformer_batched"]
CONFIGS = {
    "omniglot": dict(n_way=5, k_shot=1, k_query=15, inner_lr=0.4, meta_batch=32),
    "sinusoid": dict(k_shot=10, k_query=10, inner_lr=0.01, meta_batch=25),
}


def build_peer_model(config: str) -> nn.Sequential:
    """The peers' network (same module layout and state-dict keys as peers_maml.build_model)."""
    if config == "omniglot":
        layers: list[nn.Module] = []
        cin = 1
        for _ in range(4):
            layers += [nn.Conv2d(cin, 64, 3, padding=1), nn.BatchNorm2d(64, track_running_stats=False), nn.ReLU(),
                       nn.MaxPool2d(2)]
            cin = 64
        layers += [nn.Flatten(), nn.Linear(64, CONFIGS["omniglot"]["n_way"])]
        return nn.Sequential(*layers)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def make_batch(config: str, num_tasks: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Synthetic data of the real shape, as in peers_maml.make_batch: (xs, ys, xq, yq)."""
    c = CONFIGS[config]
    if config == "omniglot":
        n, k, q = c["n_way"], c["k_shot"], c["k_query"]
        xs = torch.randn(num_tasks, n * k, 1, 28, 28, generator=gen)
        xq = torch.randn(num_tasks, n * q, 1, 28, 28, generator=gen)
        ys = torch.arange(n).repeat_interleave(k).expand(num_tasks, -1).contiguous()
        yq = torch.arange(n).repeat_interleave(q).expand(num_tasks, -1).contiguous()
        return [xs, ys, xq, yq]
    k, q = c["k_shot"], c["k_query"]
    amp = torch.rand(num_tasks, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=gen) * math.pi
    xs = torch.rand(num_tasks, k, 1, generator=gen) * 10 - 5
    xq = torch.rand(num_tasks, q, 1, generator=gen) * 10 - 5
    return [xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)]


class SequentialBackbone(nn.Module):
    """The peers' network without its last Linear, as a backbone with ``out_dim``."""

    def __init__(self, layers: nn.Sequential, out_dim: int) -> None:
        """Wrap ``layers`` (module names kept, so state-dict keys map one to one)."""
        super().__init__()
        self.seq = layers
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *item] -> [B, out_dim]."""
        return self.seq(x)


def initial_setup(config: str, seed: int) -> tuple[nn.Sequential, list[torch.Tensor]]:
    """The network at its initial weights and the meta-batch that every implementation of a setup gets."""
    torch.manual_seed(seed)
    model = build_peer_model(config)
    return model, make_batch(config, CONFIGS[config]["meta_batch"], torch.Generator().manual_seed(seed + 1))


def episode_batch(config: str, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> Any:
    """The meta-batch as the EpisodeBatch that metaformer's heads take (every task full, no padding)."""
    from metaformer.data import EpisodeBatch

    t = xs.shape[0]
    reg = config == "sinusoid"
    return EpisodeBatch(xs, ys, torch.ones(ys.shape[:2], dtype=torch.bool), xq, yq,
                        torch.ones(yq.shape[:2], dtype=torch.bool),
                        torch.full((t,), 0 if reg else CONFIGS["omniglot"]["n_way"], dtype=torch.int64),
                        [[] if reg else [str(i) for i in range(CONFIGS["omniglot"]["n_way"])] for _ in range(t)])


def build_our_head(config: str, peer: nn.Sequential, steps: int, first_order: bool, path: str) -> tuple[Any, dict[str, str]]:
    """A metaformer MAML head on the peers' network with the peers' weights; returns (head, our->peer names).

    Omniglot: metaformer's Conv4 (the same layers in the same order, so ``features.i`` is the peers' layer
    ``i``), which runs each block's BatchNorm + ReLU + max-pool as the fused op; sinusoid: the peers' MLP.
    """
    from metaformer.heads import MAML
    from metaformer.models.backbones import Conv4

    last = len(peer) - 1
    body = nn.Sequential(*[peer[i] for i in range(last)])
    out_dim = peer[last].in_features
    kind = "classification" if config == "omniglot" else "regression"
    n_way = CONFIGS["omniglot"]["n_way"] if kind == "classification" else 1
    if config == "omniglot":
        backbone: nn.Module = Conv4(1, 64, 4)
        result = backbone.features.load_state_dict(body.state_dict(), strict=False)
        if result.unexpected_keys or any(not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                         for k in result.missing_keys):
            raise RuntimeError(f"peer network does not map onto Conv4: {result}")
        prefix = "backbone.features."
    else:
        backbone = SequentialBackbone(body, out_dim)
        prefix = "backbone.seq."
    head = MAML(backbone, n_way, kind=kind, inner_steps=steps, inner_lr=CONFIGS[config]["inner_lr"],
                first_order=first_order, path=path)
    head.net.classifier.load_state_dict(peer[last].state_dict())
    names = {}
    for n, _ in head.net.named_parameters():
        if n.startswith(prefix):
            names[n] = n[len(prefix):]
        else:
            names[n] = n.replace("classifier.", f"{last}.")
    return head, names


def maxrss_mib() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_our_cell(a: argparse.Namespace) -> dict:
    """Child: meta-gradient, warm-up and timed meta-train steps of a metaformer head."""
    from metaformer.ops import backend

    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    shared = torch.load(a.shared, weights_only=True)
    peer = build_peer_model(a.config)
    peer.load_state_dict(shared["init"])
    path = a.impl.split("_", 1)[1]
    head, names = build_our_head(a.config, peer, a.steps, a.order == "fo", path)
    head.to(device=device, dtype=dtype)
    xs, ys, xq, yq = ((b.to(dtype) if b.is_floating_point() else b).to(device) for b in shared["batch"])
    t = xs.shape[0]
    batch = episode_batch(a.config, xs, ys, xq, yq).to(device)
    res = dict(config=a.config, impl=a.impl, steps=a.steps, order=a.order, meta_batch=t, device=str(device),
               threads=torch.get_num_threads(), info={"ops_backend": backend(), "path": head.resolve_path(xs),
                                                       "torch_isa": torch.backends.cpu.get_cpu_capability(),
                                                       "kernels": cpu_kernels()})
    if device.type == "cuda":
        res["info"]["device_name"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss, _ = head.meta_backward(batch)
    synchronize(device)
    res["first_call_s"] = time.perf_counter() - t0
    res["meta_loss"] = float(loss)
    torch.save({names[n]: grad_on_cpu(p) for n, p in head.net.named_parameters()}, a.grad_out)

    def step() -> None:
        """One meta-train step: meta-gradient and Adam update."""
        opt.zero_grad(set_to_none=True)
        head.meta_backward(batch)
        opt.step()

    res.update(timed_steps(step, device, a.warmup, a.timed, t), peak_rss_mib=maxrss_mib())
    return res


def grad_on_cpu(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient copied to the CPU (zeros where it got none), for the agreement check."""
    return p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros_like(p, device="cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Any, device: torch.device, warmup: int, timed: int, tasks: int) -> dict:
    """Warm-up then timed calls of ``step`` (the device drained around each); the median and the device's peak memory."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = dict(status="ok", times_s=times, median_s=med, steps_per_s=1 / med, tasks_per_s=tasks / med)
    if device.type == "cuda":
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def grad_diff(ref: dict, other: dict) -> float:
    """Global ||g - g_ref|| / ||g_ref|| over all parameters."""
    num = sum(float(((other[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float((ref[k].double() ** 2).sum()) for k in ref)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


# Environment that makes torch's own kernels (ATen dispatch, oneDNN convolutions, MKL matmuls) and our block kernels all
# stop at AVX2 + FMA: an AVX-512 machine then stands in for an AVX2-only CPU for every library alike, instead of
# forcing only our kernels down while the peers' convolutions keep AVX-512.
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                               "METAFORMER_SIMD": "avx2"}}


def run_child(cmd: list[str], isa: str = "native") -> dict:
    """Run one cell's child process (with the ISA's environment) and parse its RESULT line."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ISA_ENV[isa]})
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"rc={p.returncode}"]
        return dict(status="crashed", error=tail[0][:300], child_wall_s=time.perf_counter() - t0)
    r = json.loads(lines[-1][len("RESULT "):])
    r["child_wall_s"] = time.perf_counter() - t0
    return r


ORDERS = ("so", "fo")  # second order, first order


def csv_list(value: str) -> list[str]:
    """The non-empty items of a comma-separated option value."""
    return [x.strip() for x in value.split(",") if x.strip()]


def peers_available(a: argparse.Namespace) -> bool:
    """Whether the peers' interpreter and script exist (without them only our implementations run)."""
    return shutil.which(a.peers_python) is not None and Path(a.peers_script).exists()


def argument_problem(a: argparse.Namespace) -> Optional[str]:
    """What is wrong with the parent's cell options (each named with its valid values), or None."""
    lists = (("--configs", a.configs, list(CONFIGS)), ("--orders", a.orders, list(ORDERS)),
             ("--impls", a.impls, PEER_IMPLS + OUR_IMPLS))
    for opt, value, valid in lists:
        items = csv_list(value)
        unknown = [x for x in items if x not in valid]
        if unknown or not items:
            problem = f"unknown value(s) {', '.join(unknown)}" if unknown else "empty"
            return f"{opt}: {problem}; give a comma-separated subset of {','.join(valid)}"
    try:
        steps = [int(x) for x in csv_list(a.steps_list)]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        return f"--steps-list {a.steps_list!r}: give comma-separated inner-step counts >= 1, e.g. 1,5"
    for opt, value, low in (("--threads", a.threads, 1), ("--warmup", a.warmup, 0), ("--timed", a.timed, 1),
                            ("--sine-timed", a.sine_timed, 1)):
        if value < low:
            return f"{opt} must be >= {low}, got {value}"
    if not peers_available(a) and not any(i in OUR_IMPLS for i in csv_list(a.impls)):
        return (f"--impls {a.impls}: only peer implementations, and the peers are not found ({a.peers_python}, "
                f"{a.peers_script}); pass --peers-python / --peers-script, or add {' or '.join(OUR_IMPLS)}")
    return None


def main_parent(a: argparse.Namespace) -> None:
    """Run every (setup, steps, order, implementation) cell and print the table."""
    peers_ok = peers_available(a)
    if not peers_ok:
        print(f"# peers not found ({a.peers_python}, {a.peers_script}): running metaformer and nothing else", flush=True)
    impls = [i for i in csv_list(a.impls) if peers_ok or i in OUR_IMPLS]
    results = []
    load = os.getloadavg()
    print(f"# threads={a.threads} warmup={a.warmup} timed={a.timed} load average at start {load}", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_meta_train_") as tmp:
        for config in csv_list(a.configs):
            model, batch = initial_setup(config, a.seed)
            shared = os.path.join(tmp, f"{config}.pt")
            torch.save({"init": model.state_dict(), "batch": batch}, shared)
            for steps in [int(s) for s in csv_list(a.steps_list)]:
                for order in csv_list(a.orders):
                    grads, ref64 = {}, None
                    if peers_ok:
                        gout = os.path.join(tmp, f"ref64_{config}_{steps}_{order}.pt")
                        r = run_child([a.peers_python, str(a.peers_script), "--child", "--dtype", "float64", "--config", config,
                                       "--impl", "plain", "--steps", str(steps), "--order", order, "--shared", shared,
                                       "--grad-out", gout, "--threads", str(a.threads), "--warmup", "0", "--timed", "0"],
                                      a.isa)
                        if os.path.exists(gout):
                            ref64 = torch.load(gout, weights_only=True)
                    for impl in impls:
                        gout = os.path.join(tmp, f"g_{config}_{steps}_{order}_{impl}.pt")
                        common = ["--config", config, "--impl", impl, "--steps", str(steps), "--order", order,
                                  "--shared", shared, "--grad-out", gout, "--threads", str(a.threads),
                                  "--warmup", str(a.warmup),
                                  "--timed", str(a.timed if config == "omniglot" else a.sine_timed)]
                        if impl in OUR_IMPLS:
                            r = run_child([sys.executable, os.path.abspath(__file__), "--child", "--device", a.device]
                                          + common, a.isa)
                        elif a.device != "cpu":
                            r = run_child([a.peers_python, str(DEVICE_PEERS), "--peers-script", str(a.peers_script),
                                           "--device", a.device] + common, a.isa)
                        else:
                            r = run_child([a.peers_python, str(a.peers_script), "--child"] + common, a.isa)
                        r.update(config=config, impl=impl, steps=steps, order=order)
                        if r.get("status") == "ok" and os.path.exists(gout):
                            grads[impl] = torch.load(gout, weights_only=True)
                        results.append(r)
                        msg = (f"{r['tasks_per_s']:8.1f} tasks/s  peak RSS {r['peak_rss_mib']:6.0f} MiB"
                               + (f"  peak GPU {r['peak_device_mib']:7.1f} MiB" if "peak_device_mib" in r else "")
                               if r.get("status") == "ok" else f"{r.get('status')}: {r.get('error')}")
                        print(f"{config:8s} steps={steps} {order} {impl:18s} {msg}", flush=True)
                    for r in results:
                        if (r["config"], r["steps"], r["order"]) == (config, steps, order) and r["impl"] in grads:
                            if "plain" in grads:
                                r["grad_rel_plain32"] = grad_diff(grads["plain"], grads[r["impl"]])
                            if ref64 is not None:
                                r["grad_rel_plain64"] = grad_diff(ref64, grads[r["impl"]])
    total = time.perf_counter() - t_start
    table = format_table(results, os.getloadavg(), load, total, a)
    print("\n" + table)
    if a.md_out:
        Path(a.md_out).write_text(table + "\n")
    if a.json_out:
        meta = {"command": "scripts/bench_meta_train.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
                "python": sys.version.split()[0], "device": a.device, "device_name": device_names(results),
                "cores": os.cpu_count()}
        Path(a.json_out).write_text(json.dumps({"results": results, "total_s": total, "args": vars(a), **meta}, indent=1))


def cpu_kernels() -> str:
    """Which kernels metaformer's fused Conv-4 block ops run here ("avx512", "avx2", "generic", "none" unbuilt)."""
    try:
        import metaformer.ops  # noqa: F401  (registers the ops)

        return str(torch.ops.metaformer.cpu_kernels())
    except (ImportError, AttributeError, RuntimeError):
        return "none"


def child_kernels(results: list[dict]) -> str:
    """The block kernels our children reported (the parent's own when none ran)."""
    seen = sorted({r["info"]["kernels"] for r in results if r.get("info", {}).get("kernels")})
    return "/".join(seen) or cpu_kernels()


def child_isa(results: list[dict]) -> str:
    """torch's CPU capability as our children reported it."""
    return "/".join(sorted({r["info"]["torch_isa"] for r in results if r.get("info", {}).get("torch_isa")})) or "?"


def allocator_env() -> str:
    """The glibc malloc tuning every process of the run inherits (the same for us and the peers)."""
    keys = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    set_ = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return " ".join(set_) if set_ else "default"


def git_commit() -> str:
    """Short commit of the working tree (with "+dirty" when it has changes), or "unknown"; scripts/benchmark.py passes
    the commit it read before writing its outputs as $METAFORMER_COMMIT / $METAFORMER_DIRTY."""
    if os.environ.get("METAFORMER_COMMIT"):
        return os.environ["METAFORMER_COMMIT"][:7] + ("+dirty" if os.environ.get("METAFORMER_DIRTY") == "1" else "")
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_names(results: list[dict]) -> str:
    """The accelerator the children ran on, as they named it ("CPU" when none did)."""
    return "/".join(sorted({r["info"]["device_name"] for r in results if r.get("info", {}).get("device_name")})) or "CPU"


def format_table(results: list[dict], load_end: tuple, load_start: tuple, total: float, a: argparse.Namespace) -> str:
    """Markdown table of all cells with speed-up against the fastest peer (and, on a GPU, against learn2learn)."""
    gpu = a.device != "cpu"
    lines = [
        f"Command: `.venv/bin/python scripts/bench_meta_train.py {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, device {a.device} ({device_names(results)}), {a.threads} CPU threads, "
        f"metaformer block kernels: {child_kernels(results)}, "
        + (f"every child (ours and the peers') runs with {' '.join(f'{k}={v}' for k, v in ISA_ENV[a.isa].items())} "
           f"(torch dispatch in our children: {child_isa(results)}), "
           if a.isa != "native" else "")
        + f"glibc allocator env: {allocator_env()}, git {git_commit()}, warm-up 1+{a.warmup}, {a.timed} (omniglot) / "
        f"{a.sine_timed} (sinusoid) timed meta-steps (median). "
        f"Load average at start {tuple(round(x, 1) for x in load_start)}, end {tuple(round(x, 1) for x in load_end)}: "
        f"shared machine, use ratios. Total {total:.0f} s.",
        "",
    ]
    return "\n".join(lines + table_rows(results, gpu))


def table_rows(results: list[dict], gpu: bool) -> list[str]:
    """The markdown table of the cells (header first): speed against the fastest peer, on a GPU also against
    learn2learn and the GPU's peak memory, then peak RSS and the meta-gradient agreement."""
    lines = [
        "| setup | steps | order | impl | tasks/s | x fastest peer |" + (" x learn2learn | peak GPU (MiB) |" if gpu else "")
        + " peak RSS (MiB) | meta-grad vs plain fp32 | vs plain fp64 |",
        "|---|---|---|---|---|---|" + ("---|---|" if gpu else "") + "---|---|---|",
    ]
    for r in results:
        cell = [x for x in results if (x["config"], x["steps"], x["order"]) == (r["config"], r["steps"], r["order"])]
        peers = [x["tasks_per_s"] for x in cell if x.get("status") == "ok" and x["impl"] not in OUR_IMPLS]
        l2l = [x["tasks_per_s"] for x in cell if x.get("status") == "ok" and x["impl"] == "l2l"]
        head = f"| {r['config']} | {r['steps']} | {r['order'].upper()} | {r['impl']} |"
        if r.get("status") != "ok":
            lines.append(head + f" {r.get('status')} | |" + (" | |" if gpu else "")
                         + f" | {str(r.get('error', ''))[:90]} | |")
            continue
        ratio = f"{r['tasks_per_s'] / max(peers):.2f}" if peers else "-"
        extra = ""
        if gpu:
            extra = (f" {r['tasks_per_s'] / l2l[0]:.2f} |" if l2l else " - |") + (
                f" {r['peak_device_mib']:.1f} |" if "peak_device_mib" in r else " - |")
        g32 = "(ref)" if r["impl"] == "plain" else (f"{r['grad_rel_plain32']:.1e}" if "grad_rel_plain32" in r else "-")
        g64 = f"{r['grad_rel_plain64']:.1e}" if "grad_rel_plain64" in r else "-"
        lines.append(head + f" {r['tasks_per_s']:.1f} | {ratio} |{extra} {r['peak_rss_mib']:.0f} | {g32} | {g64} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse arguments; run as parent (the table) or as one cell's child."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="omniglot,sinusoid", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--steps-list", default="1,5", help="comma-separated inner-step counts (>= 1)")
    ap.add_argument("--orders", default="so,fo", help="so (second order), fo (first order) or both")
    ap.add_argument("--impls", default=",".join(PEER_IMPLS + OUR_IMPLS),
                    help=f"comma-separated subset of {','.join(PEER_IMPLS + OUR_IMPLS)}")
    ap.add_argument("--warmup", type=int, default=1, help="extra warm-up steps after the gradient-check step")
    ap.add_argument("--timed", type=int, default=3, help="timed steps (omniglot)")
    ap.add_argument("--sine-timed", type=int, default=200, help="timed steps (sinusoid; a 1-step meta-step takes ~2 ms, so fewer make the median follow the machine's noise)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where every cell (ours and the peers') runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers-python", default="/tmp/peers/venv/bin/python")
    ap.add_argument("--peers-script", default=str(PEERS_SCRIPT))
    ap.add_argument("--isa", choices=sorted(ISA_ENV), default="native",
                    help="avx2: every child (ours and the peers') runs torch, oneDNN and our kernels at AVX2 + FMA, "
                         "standing in for an AVX2-only CPU")
    ap.add_argument("--md-out", default="")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--config", "--impl", "--order", "--shared", "--grad-out"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.child:
        problem = argument_problem(a)
        if problem:  # before any child runs: a bad value would otherwise be filtered out or crash mid-run
            ap.error(problem)
        try:
            dev = torch.device(a.device)
        except RuntimeError as exc:
            ap.error(f"--device {a.device}: {exc}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device; run on a GPU machine with "
                     "a CUDA build of torch, or use --device cpu")
        if dev.type not in ("cpu", "cuda"):
            ap.error(f"--device {a.device}: only cpu and cuda are supported")
        if dev.type != "cpu" and a.isa != "native":
            ap.error("--isa caps the CPU kernels; it goes with --device cpu")
    if a.child:
        try:
            res = run_our_cell(a)
        except Exception as e:  # noqa: BLE001 - reported in the table instead of killing the run
            res = dict(status="run failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        print("RESULT " + json.dumps(res), flush=True)
    else:
        main_parent(a)


if __name__ == "__main__":
    main()
