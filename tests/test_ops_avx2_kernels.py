"""The AVX2 + FMA block kernels against the generic ones, and the METAFORMER_SIMD choice of a kernel set.

The kernel set is chosen once per process, so each set runs in a child (``METAFORMER_SIMD=avx2`` and ``0``)
on the same inputs. The BatchNorm+ReLU+max-pool kernels do the generic kernels' arithmetic in the same order:
every output of the forward, backward and double backward is compared bit for bit. The stem's statistics come
from the same plane sums (bit for bit too); its conv planes use fused multiply-adds, so its pooled output and
gradients agree to rounding. Shapes cover what the 8-cell vectors of AVX2 get wrong first: rows shorter than a
vector (1-7 pooled cells), exactly one or two vectors, one cell past a vector, odd heights and widths (a row or
column in no window) and planes that end their buffer (no readable floats after the last row).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaformer.ops import backend

pytestmark = pytest.mark.skipif(backend() != "extension", reason="needs the built extension")

ROOT = Path(__file__).resolve().parents[1]

# (N, C, H, W): pooled widths 1, 3, 5, 6, 7, 8, 8 (+ odd column), 9, 11, 13, 14, 15, 16, 17, 20, 33 and 50, so
# every partial vector of 1-7 cells, alone or after full ones (the backward kernels take rows of >= 5 cells,
# shorter ones the generic loops: both must give the generic bits)
SHAPES = [
    (1, 3, 2, 2), (2, 2, 5, 3), (2, 2, 6, 10), (2, 2, 5, 13), (2, 3, 7, 7), (2, 3, 14, 14), (2, 2, 4, 16),
    (2, 2, 7, 17), (3, 2, 6, 18), (2, 2, 5, 22), (1, 2, 4, 26), (4, 8, 28, 28), (3, 2, 9, 30), (2, 2, 6, 32),
    (1, 2, 3, 34), (2, 3, 9, 41), (1, 2, 6, 66), (1, 1, 6, 100),
]

CHILD = """
import sys, torch
import metaformer.ops  # noqa: F401  (registers the ops)
op = torch.ops.metaformer
shapes = eval(sys.argv[2])


def at_end(t, g):
    # the same values at the very end of a larger buffer: nothing readable after the last plane
    big = torch.randn(t.numel() + 37, generator=g)
    big[37:] = t.reshape(-1)
    return big[37:].view(t.shape)


res = {"kernels": op.cpu_kernels()}
for i, shape in enumerate(shapes):
    g = torch.Generator().manual_seed(i)
    for end in (False, True):
        x = torch.randn(*shape, generator=g) * 2 + 1
        w = torch.rand(shape[1], generator=g) + 0.5
        b = torch.randn(shape[1], generator=g)
        u = torch.randn(shape, generator=g)
        if end:
            x, u = at_end(x, g), at_end(u, g)
        out, mean, invstd, code = op.bn_relu_pool(x, w, b, 1e-5)
        go = torch.randn(out.shape, generator=g)
        if end:
            go = at_end(go, g)
        res[f"bn{i}{end}"] = (out, mean, invstd, code, *op.bn_relu_pool_backward(go, x, w, mean, invstd, code),
                             *op.bn_relu_pool_double_backward(u, w, b, go, x, w, mean, invstd, code),
                             *op.bn_relu_pool_double_backward(None, w, b, go, x, w, mean, invstd, code))
        xi = torch.rand(shape[0], 1 + i % 3, *shape[2:], generator=g) + 0.5
        if end:
            xi = at_end(xi, g)
        cw = torch.randn(6, xi.shape[1], 3, 3, generator=g)  # 6 channels: a block of 4 and a partial one
        gm = torch.rand(6, generator=g) + 0.5
        bt = torch.randn(6, generator=g)
        out, mean, invstd, code = op.conv3x3_bn_relu_pool(xi, cw, None, gm, bt, 1e-5)
        go = torch.randn(out.shape, generator=g)
        res[f"stem{i}{end}"] = (out, mean, invstd, code,
                                *op.conv3x3_bn_relu_pool_backward(go, xi, cw, gm, mean, invstd, code))
torch.save(res, sys.argv[1])
"""


def run_child(simd: str, path: Path, shapes: list) -> dict:
    """The CHILD's results with METAFORMER_SIMD=simd, one thread."""
    env = {**os.environ, "METAFORMER_SIMD": simd, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", CHILD, str(path), repr(shapes)], env=env, cwd=ROOT, check=True)
    return torch.load(path)


def kernels_with(simd: str | None) -> tuple[str, str]:
    """cpu_kernels() and stderr of a child with METAFORMER_SIMD=simd (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "METAFORMER_SIMD"}
    if simd is not None:
        env["METAFORMER_SIMD"] = simd
    code = "import metaformer.ops, torch; print(torch.ops.metaformer.cpu_kernels())"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1], done.stderr


def test_avx2_kernels_equal_the_generic_ones(tmp_path: Path) -> None:
    best, _ = kernels_with(None)
    if best == "generic":
        pytest.skip("this CPU has no AVX2 + FMA")
    fast = run_child("avx2", tmp_path / "avx2.pt", SHAPES)
    generic = run_child("0", tmp_path / "generic.pt", SHAPES)
    assert fast["kernels"] == "avx2" and generic["kernels"] == "generic"
    assert fast.keys() == generic.keys()
    for key in fast:
        if key == "kernels":
            continue
        for j, (a, r) in enumerate(zip(fast[key], generic[key])):
            if key.startswith("bn") or j in (1, 2, 3):  # every fused-tail output; the stem's mean, invstd, code
                assert torch.equal(a, r), (key, j)
            else:  # the stem's pooled output and gradients: conv planes by fused multiply-adds
                torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=f"{key} output {j}")


def test_simd_variable_chooses_the_kernel_set() -> None:
    best, _ = kernels_with(None)
    assert best in ("avx512", "avx2", "generic")
    assert kernels_with("")[0] == best
    assert kernels_with("1")[0] == best
    assert kernels_with("0")[0] == "generic"
    # a set the CPU has is taken; one it lacks falls back to the best it has, with a warning
    for want in ("avx2", "avx512"):
        got, err = kernels_with(want)
        order = ["generic", "avx2", "avx512"]
        if order.index(want) <= order.index(best):
            assert got == want and err == ""
        else:
            assert got == best and f"METAFORMER_SIMD={want} but this CPU" in err
    got, err = kernels_with("avx3")
    assert got == best and "METAFORMER_SIMD=avx3 is not one of 0 (or generic, none), 1, avx2, avx512" in err
    # the name cpu_kernels() reports asks for that set; case and surrounding blanks do not matter
    for spelling in ("generic", "none", " Generic "):
        assert kernels_with(spelling) == ("generic", "")
    if best != "generic":
        assert kernels_with(" AVX2") == ("avx2", "")


def test_heads_use_the_fused_stem_with_the_avx2_kernels() -> None:
    if kernels_with(None)[0] == "generic":
        pytest.skip("this CPU has no AVX2 + FMA")
    code = ("import torch; from metaformer.heads import MAML; from metaformer.models import Conv4; "
            "print(torch.ops.metaformer.cpu_kernels(), MAML(Conv4(1, hidden=6, num_blocks=2), 3).query_stem_fused())")
    for simd, expected in (("avx2", "avx2 True"), ("0", "generic False")):
        env = {**os.environ, "METAFORMER_SIMD": simd, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        assert done.stdout.strip().splitlines()[-1] == expected
