"""Float32 precision of the fused BatchNorm+ReLU+max-pool on large planes, on every kernel set.

The op's statistics and backward sums add each plane in float32 lanes, widened into double every
kLaneTerms terms (csrc/bn_relu_pool_avx512.h). When the lanes ran over whole planes, the float32 error grew
with the plane (relative to the largest value; the forward output 1e-7 on 28x28 planes, 3e-6 on 512x512,
1e-5 on 1024x1024), while torch's own float32 batch_norm + relu + max_pool2d stays at 0.5-1.5e-7. A mean far
from zero next to the spread (randn * 3 + 10) is the hard case for the shifted one-pass sums.

The kernel set is chosen once per process, so each set runs in a child (METAFORMER_SIMD = the best set,
avx2, 0). The float64 reference is the composite evaluated at the float32 run's own argmax and ReLU
decisions, so that a near-tie decided the other way in float64 cannot count as an error of the sums.
The children also hold the bit-identity of test_ops_avx2_kernels.py / test_ops_conv_stem.py on planes of
several blocks with a partial last block and a tail of single elements, which their small shapes never reach.
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

# 262135 elements a plane: 63 full blocks of 4096, a partial block and 7 single elements; odd H and W leave a
# row and a column out of the pooling windows
SHAPE = (2, 2, 509, 515)

# Error bounds relative to the largest reference value. On this input the blocked sums give 4-8e-8 for the
# per-element outputs on every kernel set; the whole-plane float lanes gave 1.2e-6 (out), 1.3e-6 (grad_input),
# 6.0e-7 (d_grad_out) and 6.7e-7 (d_input). The per-channel outputs are sums of gz * x̂ with random signs that
# cancel, so their relative error is larger whatever the order: 0.2-1.7e-6 here (up to 1.3e-6 over other
# seeds), torch's float32 composite up to 6e-6 on such planes, the whole-plane lanes 3-9.6e-6.
TOLERANCE = {
    "out": 2.5e-7,
    "grad_input": 2.5e-7,
    "grad_weight": 3e-6,
    "grad_bias": 3e-6,
    "d_grad_out": 2.5e-7,
    "d_input": 2.5e-7,
    "d_weight": 3e-6,
}

CHILD = """
import sys, torch
import torch.nn.functional as F
import metaformer.ops  # noqa: F401  (registers the ops)
op = torch.ops.metaformer
shape = eval(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(*shape, generator=g) * 3 + 10
w = torch.rand(shape[1], generator=g) + 0.5
b = torch.randn(shape[1], generator=g)
go = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, generator=g)
u = torch.randn(*shape, generator=g)
vw = torch.randn(shape[1], generator=g)
vb = torch.randn(shape[1], generator=g)
out, mean, invstd, code = op.bn_relu_pool(x, w, b, 1e-5)
grads = op.bn_relu_pool_backward(go, x, w, mean, invstd, code)
second = op.bn_relu_pool_double_backward(u, vw, vb, go, x, w, mean, invstd, code)

# float64 composite at this run's argmax (code & 3 for inactive cells, masked to 0 like the op's ReLU)
q = code.long() & 3
i = torch.arange(code.shape[2]).view(1, 1, -1, 1)
j = torch.arange(code.shape[3]).view(1, 1, 1, -1)
idx = ((2 * i + (q >> 1)) * shape[3] + 2 * j + (q & 1)).flatten(2)
x64, w64, b64, go64 = (t.double().requires_grad_(True) for t in (x, w, b, go))
z = F.batch_norm(x64, None, None, w64, b64, True, 0.0, 1e-5)
ref_out = torch.where(code >= 0, z.flatten(2).gather(2, idx).view(code.shape), torch.zeros((), dtype=torch.float64))
gx, gw, gb = torch.autograd.grad(ref_out, (x64, w64, b64), go64, create_graph=True)
dgo, dx, dw = torch.autograd.grad((gx * u.double()).sum() + (gw * vw.double()).sum() + (gb * vb.double()).sum(),
                                  (go64, x64, w64))
names = ("out", "grad_input", "grad_weight", "grad_bias", "d_grad_out", "d_input", "d_weight")
errors = {}
for name, got, ref in zip(names, (out, *grads, *second), (ref_out.detach(), gx.detach(), gw.detach(), gb.detach(),
                                                          dgo, dx, dw)):
    errors[name] = float((got.double() - ref).abs().max() / ref.abs().max())
torch.save({"kernels": op.cpu_kernels(), "errors": errors,
            "outputs": (out, mean, invstd, code, *grads, *second)}, sys.argv[1])
"""


def best_kernels() -> str:
    """The set a child gets without METAFORMER_SIMD."""
    env = {k: v for k, v in os.environ.items() if k != "METAFORMER_SIMD"}
    code = "import metaformer.ops, torch; print(torch.ops.metaformer.cpu_kernels())"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{kernel set: the CHILD's results} for every set this CPU runs."""
    best = best_kernels()
    sets = {"avx512": ["avx512", "avx2", "generic"], "avx2": ["avx2", "generic"], "generic": ["generic"]}[best]
    tmp = tmp_path_factory.mktemp("precision")
    results = {}
    for name in sets:
        path = tmp / f"{name}.pt"
        env = {**os.environ, "METAFORMER_SIMD": name, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", CHILD, str(path), repr(SHAPE)], env=env, cwd=ROOT, check=True)
        results[name] = torch.load(path)
        assert results[name]["kernels"] == name
    return results


@pytest.mark.parametrize("kernels", ["avx512", "avx2", "generic"])
def test_float32_error_on_a_large_plane_is_bounded(runs: dict, kernels: str) -> None:
    if kernels not in runs:
        pytest.skip(f"this CPU has no {kernels} kernels")
    errors = runs[kernels]["errors"]
    too_large = {k: f"{v:.2e} > {TOLERANCE[k]:.1e}" for k, v in errors.items() if not v <= TOLERANCE[k]}
    assert not too_large, f"{kernels}: float32 errors against float64: {too_large}"


def test_kernel_sets_agree_bitwise_on_planes_of_several_blocks(runs: dict) -> None:
    generic = runs["generic"]["outputs"]
    if "avx2" in runs:  # every output: the same arithmetic in the same order
        for j, (a, r) in enumerate(zip(runs["avx2"]["outputs"], generic)):
            assert torch.equal(a, r), f"avx2 output {j}"
    if "avx512" in runs:  # the forward (out, mean, invstd, code); its backward sums cells in another order
        for j, (a, r) in enumerate(zip(runs["avx512"]["outputs"], generic)):
            if j < 4:
                assert torch.equal(a, r), f"avx512 output {j}"
            else:  # to rounding of the tensor's scale: a cancelling channel sum is far smaller than its terms
                torch.testing.assert_close(a, r, rtol=0, atol=1e-5 * float(r.abs().max()), msg=f"avx512 output {j}")
