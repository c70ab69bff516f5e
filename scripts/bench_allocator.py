#!/usr/bin/env python3
"""Meta-training step time with and without the glibc allocator tuning of `training.cpu_allocator`.

Each (method, tuning) cell runs in its own child process (1 thread): 2 warm-up steps, then STEPS timed
steps of Omniglot 5-way 1-shot (alphabet split), meta-batch 8; it reports ms per step, the user and
system CPU time per step, minor page faults per step and the peak RSS. Cells alternate tuned / untuned so
that load changes hit both.

    .venv/bin/python scripts/bench_allocator.py --data-root ../shared/data
    .venv/bin/python scripts/bench_allocator.py --methods protonet,maml --steps 20 --md-out /tmp/alloc.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "meta_transformer": ["model.options={d_model: 128, n_layers: 4, n_heads: 4, dropout: 0.0}"],
    "maml": ["model.options={inner_steps: 1, inner_lr: 0.4}"],
}

CHILD = r"""
import json, resource, sys, time, torch
from training.cpu_allocator import tune_cpu_allocator
tuned = tune_cpu_allocator()
from training.config import load_config
from training.registry import build_episodes, build_model
torch.set_num_threads(1)
name, steps, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cfg = load_config(f"training/configs/omniglot_5w1s_{name}.yaml", overrides)
model, eps = build_model(cfg), build_episodes(cfg, "train")
opt = torch.optim.Adam(model.parameters(), 1e-3)
def step(i):
    loss, _ = model.loss(eps.batch(i * 8, 8)); opt.zero_grad(); loss.backward(); opt.step()
for i in range(2):
    step(i)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(steps):
    step(i + 2)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT " + json.dumps(dict(tuned=tuned, ms=(time.perf_counter() - t0) / steps * 1e3,
      user_ms=(r1.ru_utime - r0.ru_utime) / steps * 1e3, sys_ms=(r1.ru_stime - r0.ru_stime) / steps * 1e3,
      faults=(r1.ru_minflt - r0.ru_minflt) / steps, peak_mib=r1.ru_maxrss / 1024)))
"""


def run(method: str, tuned: bool, steps: int, data_root: str | None) -> dict:
    """One child process; returns its RESULT line as a dict."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", METAFORMER_MALLOC_TUNE="1" if tuned else "0")
    if data_root:
        env["METAFORMER_DATA_ROOT"] = str(Path(data_root).resolve())
    overrides = ["data.options.split_scheme=alphabets", *OPTIONS.get(method, [])]
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(steps), json.dumps(overrides)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"cell {method} tuned={tuned} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def known_methods() -> list[str]:
    """The methods a cell can run: those with a training/configs/omniglot_5w1s_<method>.yaml (what the child loads)."""
    return sorted(p.name[len("omniglot_5w1s_"):-len(".yaml")]
                  for p in (ROOT / "training" / "configs").glob("omniglot_5w1s_*.yaml"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the cells and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="protonet,meta_transformer,maml",
                    help=f"comma-separated subset of {','.join(known_methods())}")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per cell (>= 1)")
    ap.add_argument("--data-root", default=None, help="folder holding omniglot/images_background.zip")
    ap.add_argument("--md-out", default=None)
    a = ap.parse_args(argv)
    # checked here: in a child, a bad value becomes a traceback about its config file or a division by zero
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known_methods()]
    if unknown or not methods:
        problem = f"unknown method(s) {', '.join(unknown)}" if unknown else "--methods is empty"
        ap.error(f"{problem}; choose a comma-separated subset of {', '.join(known_methods())}")
    if a.steps < 1:
        ap.error(f"--steps must be >= 1 timed steps per cell, got {a.steps}")
    if a.data_root and not Path(a.data_root).is_dir():
        ap.error(f"--data-root {a.data_root} is not a folder; pass the folder holding omniglot/images_background.zip")
    load0 = os.getloadavg()
    t0 = time.time()
    rows = ["| method | allocator | ms / step | user ms | sys ms | page faults / step | peak RSS (MiB) | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        base = run(m, False, a.steps, a.data_root)
        tuned = run(m, True, a.steps, a.data_root)
        for label, r in (("glibc default", base), ("tuned", tuned)):
            rows.append(f"| {m} | {label} | {r['ms']:.0f} | {r['user_ms']:.0f} | {r['sys_ms']:.0f} | {r['faults']:.0f} | "
                        f"{r['peak_mib']:.0f} | {base['ms'] / r['ms']:.2f}x |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    head = (f"`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`: Omniglot 5-way 1-shot 15 queries, meta-batch 8, 1 thread, "
            f"{a.steps} timed steps after 2 warm-up steps, one child process per cell. Load average at start "
            f"{tuple(round(x, 1) for x in load0)}, end {tuple(round(x, 1) for x in os.getloadavg())}; {time.time() - t0:.0f} s.")
    table = head + "\n\n" + "\n".join(rows) + "\n"
    print("\n" + table)
    if a.md_out:
        Path(a.md_out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
