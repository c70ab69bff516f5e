"""The fused inner-loop update on an accelerator, against the float64 CPU reference.

Collected only when METAFORMER_TEST_DEVICE is set (`make test-gpu` sets it to cuda); with
METAFORMER_TEST_DEVICE=cpu the same checks run on the CPU kernel, which is how this file's own logic is
tested on machines without a GPU. A missing device is a failure, never a skip.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from metaformer import ops
from metaformer.models import Conv4
from metaformer.ops import inner_update, inner_update_reference

DEVICE = torch.device(os.environ.get("METAFORMER_TEST_DEVICE", "cuda"))
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True, scope="module")
def _device_present() -> None:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("METAFORMER_TEST_DEVICE=cuda but torch sees no CUDA device: run on a GPU machine with a CUDA "
                    "build of torch, or set METAFORMER_TEST_DEVICE=cpu")
    if DEVICE.type == "cuda" and not ops.extension_has_cuda():
        pytest.fail("the extension was built without CUDA kernels: reinstall with METAFORMER_BUILD_CUDA=1 "
                    "against a CUDA build of torch")


def _lists(dtype: torch.dtype, tasks: int, shapes: list[tuple[int, ...]], seed: int = 0):
    """Shared (even index) and task-batched (odd index) params with task-batched grads, in float64 on CPU."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s if i % 2 == 0 else (tasks, *s), generator=g, dtype=torch.float64) for i, s in enumerate(shapes)]
    grads = [torch.randn((tasks, *s), generator=g, dtype=torch.float64) for s in shapes]
    return params, grads


def _rates(shapes: list[tuple[int, ...]], tasks: int, seed: int = 1) -> list[torch.Tensor]:
    """Per element, per task, per task and element, and single-value rates, cycling over the tensors."""
    g = torch.Generator().manual_seed(seed)
    forms = [lambda s: torch.rand(s, generator=g, dtype=torch.float64),
             lambda s: torch.rand((tasks,) + (1,) * len(s), generator=g, dtype=torch.float64),
             lambda s: torch.rand((tasks, *s), generator=g, dtype=torch.float64),
             lambda s: torch.rand((1,), generator=g, dtype=torch.float64)]
    return [forms[i % 4](s) for i, s in enumerate(shapes)]


def _on(ts, dtype=None):
    return [t.to(DEVICE, dtype) if dtype is not None else t.to(DEVICE) for t in ts]


SHAPES = [(64, 1, 3, 3), (64,), (), (64, 64, 3, 3), (5, 64), (300_001,), (3, 0)]


def test_kernel_registered_for_the_device() -> None:
    assert ops.backend() == "extension"
    key = "CUDA" if DEVICE.type == "cuda" else "CPU"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("metaformer::inner_update", key)


@pytest.mark.parametrize("dtype,lr_form,clip", list(itertools.product(DTYPES, ["float", "tensors"], [None, 0.5])))
def test_matches_float64_reference(dtype: torch.dtype, lr_form: str, clip) -> None:
    tasks = 5
    params, grads = _lists(dtype, tasks, SHAPES)
    lr = 0.05 if lr_form == "float" else _rates(SHAPES, tasks)
    decay = _rates(SHAPES, tasks, seed=2) if lr_form == "tensors" else 0.99
    # the reference sees the same rounded inputs the kernel sees, computed in float64
    rnd = lambda x: x if isinstance(x, float) else [t.to(dtype) for t in x]  # noqa: E731
    p_in, g_in, lr_in, decay_in = rnd(params), rnd(grads), rnd(lr), rnd(decay)
    f64 = lambda x: x if isinstance(x, float) else [t.double() for t in x]  # noqa: E731
    want = inner_update_reference(f64(p_in), f64(g_in), f64(lr_in), f64(decay_in), max_grad_norm=clip)
    dev = lambda x: x if isinstance(x, float) else _on(x)  # noqa: E731
    got = inner_update(dev(p_in), dev(g_in), dev(lr_in), dev(decay_in), max_grad_norm=clip)
    for a, b in zip(got, want):
        assert a.device.type == DEVICE.type and a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu().double(), b, rtol=TOL[dtype], atol=TOL[dtype])


def test_many_tensors_and_tasks() -> None:
    # more tensors than one launch's chunk table holds, and tasks x elements beyond one block's reach
    shapes = [(7, 3)] * 600 + [(2_000_003,)]
    params, grads = _lists(torch.float32, 9, shapes, seed=3)
    got = inner_update(_on([p.float() for p in params]), _on([g.float() for g in grads]), 0.1, 0.9, max_grad_norm=3.0)
    want = inner_update_reference([p.float() for p in params], [g.float() for g in grads], 0.1, 0.9, max_grad_norm=3.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=2e-6)


def test_non_contiguous_inputs() -> None:
    params, grads = _lists(torch.float32, 4, [(6, 8)])
    p = params[0].float().to(DEVICE).t()
    g = grads[0].float().to(DEVICE).transpose(1, 2)
    got = inner_update([p], [g], 0.3)[0]
    torch.testing.assert_close(got.cpu(), (p.cpu() - 0.3 * g.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place(dtype: torch.dtype) -> None:
    params, grads = _lists(dtype, 3, SHAPES[:6], seed=4)
    batched = [p.to(dtype).expand(g.shape).contiguous().to(DEVICE) for p, g in zip(params, grads)]
    gs = _on(grads, dtype)
    want = inner_update(batched, gs, 0.2, 0.95, max_grad_norm=0.8)
    ptrs = [b.data_ptr() for b in batched]
    ops.inner_update_(batched, gs, 0.2, 0.95, max_grad_norm=0.8)
    assert [b.data_ptr() for b in batched] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(batched, want))


def test_device_mismatch_names_the_tensor() -> None:
    other = "meta" if DEVICE.type == "cpu" else "cpu"
    with pytest.raises(ValueError, match=rf"params\[1\] is on {other}"):
        inner_update([torch.ones(3, device=DEVICE), torch.ones(2, device=other)],
                     [torch.ones(2, 3, device=DEVICE), torch.ones(2, 2, device=DEVICE)], 0.1)


@pytest.mark.parametrize("clip", [None, 0.7])
def test_gradcheck_and_gradgradcheck(clip) -> None:
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()  # noqa: E731
    params, grads = [mk(3, 2), mk(2, 4)], [mk(2, 3, 2), mk(2, 4)]
    lr = [torch.rand(3, 2, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(), mk(2, 1)]
    decay = [mk(2, 3, 2), torch.rand(1, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()]

    def fn(*xs):
        return tuple(inner_update(list(xs[0:2]), list(xs[2:4]), list(xs[4:6]), list(xs[6:8]), max_grad_norm=clip))

    inputs = params + grads + lr + decay
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_opcheck() -> None:
    params, grads = _lists(torch.float32, 3, SHAPES[:6])
    lr = _rates(SHAPES[:6], 3)
    args = [
        (_on(params, torch.float32), _on(grads, torch.float32), None, 0.1, None, 1.0, None),
        (_on(params, torch.float32), _on(grads, torch.float32), _on(lr, torch.float32), 0.0, None, 0.9, 1.0),
        ([p.to(DEVICE).requires_grad_() for p in params], [g.to(DEVICE).requires_grad_() for g in grads],
         [r.to(DEVICE).requires_grad_() for r in lr], 0.0, _on(lr), 1.0, 0.5),
    ]
    for a in args:
        torch.library.opcheck(torch.ops.metaformer.inner_update.default, a)


def test_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()
    params, grads = _lists(torch.float32, 3, SHAPES[:6])
    ps, gs = _on(params, torch.float32), _on(grads, torch.float32)

    def step(p, g):
        return [n * 2.0 for n in inner_update(p, g, 0.05, 0.99, max_grad_norm=2.0)]

    got = torch.compile(step, fullgraph=True)(ps, gs)
    for a, b in zip(got, step(ps, gs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_maml_head_meta_gradient_equals_cpu_float64(path: str) -> None:
    """Second-order MAML with BatchNorm on the device (either path) equals the CPU per-task loop in float64."""
    from metaformer.data import EpisodeSampler, GlyphFamily
    from metaformer.heads import MAML

    batch = EpisodeSampler(GlyphFamily("train", seed=0, image_size=16), 3, 2, 3, seed=0).batch(0, 4)
    torch.manual_seed(0)
    head_cpu = MAML(Conv4(1, hidden=8), 3, inner_steps=2, inner_lr=0.4, path="loop").double()
    head_dev = MAML(Conv4(1, hidden=8), 3, inner_steps=2, inner_lr=0.4, path=path).double()
    head_dev.load_state_dict(head_cpu.state_dict())
    head_dev.to(DEVICE)

    def meta_grad(head, device):
        b = batch.to(device)
        b.support_x, b.query_x = b.support_x.double(), b.query_x.double()
        loss, _ = head.loss(b)
        return loss, torch.autograd.grad(loss, [p for p in head.parameters() if p.requires_grad])

    loss_c, grads_c = meta_grad(head_cpu, torch.device("cpu"))
    loss_d, grads_d = meta_grad(head_dev, DEVICE)
    torch.testing.assert_close(loss_d.cpu(), loss_c, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads_d, grads_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-7, atol=1e-10)
