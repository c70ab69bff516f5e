#!/usr/bin/env python3
"""One peer cell of scripts/bench_meta_train.py on a device other than the CPU (a GPU, usually).

``../shared/bench/peers_maml.py`` times learn2learn, higher, TorchOpt and the plain loop on the CPU only: its child
builds the network and loads the shared batch on the CPU. This child imports that script as a module and runs the
very same implementations (``make_impl``: the peers' code is not rewritten here), with the network and the batch
moved to ``--device``, the device synchronised around every timed step, and the device's peak memory reported
beside the process's peak RSS. The meta-gradient is saved on the CPU for the parent's agreement check.

Run by bench_meta_train.py (``--device cuda``), not by hand:
  python scripts/peers_on_device.py --peers-script PATH --device cuda --config omniglot --impl l2l --steps 1 \
      --order so --shared shared.pt --grad-out g.pt --warmup 1 --timed 3
It prints one ``RESULT {json}`` line, like the peers' own children.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from bench_meta_train import grad_on_cpu, synchronize, timed_steps  # scripts/ is this file's folder, first on sys.path


def load_peers_module(path: str) -> ModuleType:
    """The peers' benchmark script imported as a module (its main() is not run)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--peers-script {path}: no such file (copy ../shared/bench/peers_maml.py beside the "
                                "repository, or pass its path)")
    spec = importlib.util.spec_from_file_location("peers_maml", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"--peers-script {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers_maml"] = module
    spec.loader.exec_module(module)
    return module


def run_cell(a: argparse.Namespace) -> dict:
    """Meta-gradient at the shared weights, warm-up and timed meta-train steps of one peer on the device."""
    peers = load_peers_module(a.peers_script)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    shared = torch.load(a.shared, weights_only=True)
    model = peers.build_model(a.config)
    model.load_state_dict(shared["init"])
    model.to(device=device, dtype=dtype)
    batch = tuple((b.to(dtype) if b.is_floating_point() else b).to(device) for b in shared["batch"])
    res: dict = dict(config=a.config, impl=a.impl, steps=a.steps, order=a.order, meta_batch=int(batch[0].shape[0]),
                     threads=torch.get_num_threads(), device=str(device))
    try:
        meta_grad, info = peers.make_impl(a.impl, a.config, model, a.steps, a.order == "fo")
    except NotImplementedError as exc:
        res.update(status="n/a", error=str(exc))
        return res
    except Exception as exc:  # noqa: BLE001 - a peer that does not import is a row of the table, not a crash
        res.update(status="import/setup failed", error=f"{type(exc).__name__}: {exc}")
        return res
    res["info"] = {**info, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else a.device}
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meta_opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = meta_grad(batch)
    synchronize(device)
    res["first_call_s"] = time.perf_counter() - t0
    res["meta_loss"] = float(loss)
    torch.save({n: grad_on_cpu(p) for n, p in model.named_parameters()}, a.grad_out)
    if a.timed == 0:  # gradient-only run (a reference)
        res.update(status="grad-only", peak_rss_mib=peers.maxrss_mib())
        return res

    def step() -> None:
        """One meta-train step: meta-gradient and Adam update."""
        meta_opt.zero_grad(set_to_none=True)
        meta_grad(batch)
        meta_opt.step()

    res.update(timed_steps(step, device, a.warmup, a.timed, res["meta_batch"]), peak_rss_mib=peers.maxrss_mib())
    return res


def main() -> None:
    """Parse the child's arguments, run the cell, print its RESULT line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers-script", required=True, help="path of ../shared/bench/peers_maml.py (or a copy of it)")
    ap.add_argument("--device", default="cuda")
    for opt in ("--config", "--impl", "--order", "--shared", "--grad-out"):
        ap.add_argument(opt, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    try:
        res = run_cell(a)
    except Exception as exc:  # noqa: BLE001 - reported in the table instead of killing the run
        res = dict(status="run failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
