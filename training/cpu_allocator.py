"""Keep glibc from returning large tensor buffers to the OS between steps (CPU training and evaluation).

PyTorch's CPU allocator takes every buffer from malloc. glibc serves blocks above its mmap threshold
(at most 32 MiB with the default dynamic threshold) with a fresh mmap and unmaps them on free, so every
step of a batched Conv-4 learner faults its activations in again, page by page. Measured on Omniglot
5-way 1-shot, meta-batch 8, 1 thread (one step after two warm-up steps, a machine with one other job):
ProtoNet spent 875 of 2149 ms per step in the kernel (283k page faults per step), the Meta-Transformer
623 of 1753 ms. With the mmap and trim thresholds raised, freed buffers are reused from the heap: 1157 and
1221 ms per step. Over 60 ProtoNet steps: 1.05 s per step, resident memory flat at 1741 MiB from step 20
on (no growth), against 1.8 s per step and a peak of 1287 MiB untuned: the heap keeps its high-water
mark plus fragmentation. The per-task MAML loop works on small batches and gains little (1522 vs 1585 ms,
within noise).
Called by the command-line entry points (train, eval, demo, predict) and the benchmark suite's cells,
never on import: a library must not change process-wide allocator settings behind its user's back.
Set METAFORMER_MALLOC_TUNE=0, or glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, to opt out.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping

_tuned = False


def tune_cpu_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where it does not apply or is opted out."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("METAFORMER_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user tuned glibc already; theirs wins
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1 or mallopt(M_TRIM_THRESHOLD, threshold) != 1:
        return False
    _tuned = True
    return True
