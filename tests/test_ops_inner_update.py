"""The fused inner-loop update against its pure-PyTorch reference: values, gradients, errors, compile."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from metaformer import ops
from metaformer.ops import inner_update, inner_update_reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
T = 3


def make_lists(dtype: torch.dtype, num_tasks: int = T, seed: int = 0):
    """A parameter list mixing shared and task-batched tensors, a scalar-shaped one and a chunk-sized one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (), (2, 3, 5), (40000,)]
    shared = [True, False, True, False, False]
    params = [
        torch.randn(s if sh else (num_tasks, *s), generator=g, dtype=torch.float64).to(dtype) for s, sh in zip(shapes, shared)
    ]
    grads = [torch.randn((num_tasks, *s), generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return params, grads, shapes


def rate_forms(shapes, num_tasks: int = T, seed: int = 1):
    """Every broadcast form a rate can take: per element, per task, full, single value, partial broadcast."""
    g = torch.Generator().manual_seed(seed)
    forms = []
    for k, s in enumerate(shapes):
        options = [
            torch.rand(s, generator=g),
            torch.rand((num_tasks,) + (1,) * len(s), generator=g),
            torch.rand((num_tasks, *s), generator=g),
            torch.rand((1,), generator=g),
        ]
        if len(s) >= 2:
            options.append(torch.rand((num_tasks, s[0]) + (1,) * (len(s) - 1), generator=g))  # partial broadcast
        forms.append(options[k % len(options)])
    return forms


def assert_close_to_reference(out, ref, dtype, exact: bool) -> None:
    """Exact equality where the arithmetic is the same; one ulp of the norm's summation order otherwise."""
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_backend_is_the_extension() -> None:
    """CI must exercise the compiled op, never only the fallback."""
    if os.environ.get("METAFORMER_BACKEND") == "reference":
        pytest.fail("METAFORMER_BACKEND=reference is set: unset it so the extension is tested")
    assert ops.backend() == "extension"
    assert hasattr(torch.ops.metaformer, "inner_update")


def test_extension_runs_in_parallel() -> None:
    """A build without OpenMP runs at::parallel_for on one thread, silently halving bandwidth on 2 cores."""
    from metaformer.ops._extension import load_extension

    ext = load_extension()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert ext.parallel_threads_used() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr_form", ["scalar", "tensors"])
@pytest.mark.parametrize("decay_form", ["none", "scalar", "tensors"])
@pytest.mark.parametrize("clip", [None, 0.5, 1e6])
def test_matches_reference(dtype, lr_form, decay_form, clip) -> None:
    params, grads, shapes = make_lists(dtype)
    lr = 0.1 if lr_form == "scalar" else rate_forms(shapes, seed=2)
    decay = {"none": None, "scalar": 0.97, "tensors": rate_forms(shapes, seed=3)}[decay_form]
    out = inner_update(params, grads, lr, decay, max_grad_norm=clip)
    ref = inner_update_reference(params, grads, lr, decay, max_grad_norm=clip)
    # Without clipping both compute the same float ops in the same order: bit-identical.
    assert_close_to_reference(out, ref, dtype, exact=clip is None)


def test_clipping_bounds_each_task_norm() -> None:
    params, grads, _ = make_lists(torch.float64)
    out = inner_update([torch.zeros_like(g) for g in grads], grads, 1.0, max_grad_norm=0.5)
    norms = torch.sqrt(sum(o.reshape(T, -1).pow(2).sum(1) for o in out))
    torch.testing.assert_close(norms, torch.full((T,), 0.5, dtype=torch.float64), rtol=1e-5, atol=0)


def test_formula_by_hand() -> None:
    p = torch.tensor([1.0, 2.0])
    g = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    (out,) = inner_update([p], [g], [torch.tensor([[0.1], [0.2]])], 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5 - 0.1, 1.0 + 0.1], [0.5 - 0.1, 1.0]]))


def test_non_contiguous_inputs() -> None:
    base_p = torch.randn(5, 4).t()  # [4, 5] non-contiguous
    base_g = torch.randn(5, 4, 3).transpose(0, 2)  # [3, 4, 5] non-contiguous, T = 3
    lr = [torch.rand(5, 4).t()]
    assert not base_p.is_contiguous() and not base_g.is_contiguous()
    out = inner_update([base_p], [base_g], lr, 0.9)
    ref = inner_update_reference([base_p.contiguous()], [base_g.contiguous()], [lr[0].contiguous()], 0.9)
    assert torch.equal(out[0], ref[0])


def test_empty_and_zero_size() -> None:
    assert inner_update([], [], 0.1) == []
    p, g = torch.randn(0, 3), torch.randn(T, 0, 3)
    out = inner_update([p, torch.ones(2)], [g, torch.ones(T, 2)], 0.5, max_grad_norm=1.0)
    assert out[0].shape == (T, 0, 3)
    ref = inner_update_reference([p, torch.ones(2)], [g, torch.ones(T, 2)], 0.5, max_grad_norm=1.0)
    torch.testing.assert_close(out[1], ref[1])
    zero_tasks = inner_update([torch.ones(2)], [torch.ones(0, 2)], 0.5)
    assert zero_tasks[0].shape == (0, 2)


def test_same_result_for_any_thread_count() -> None:
    params, grads, shapes = make_lists(torch.float32, num_tasks=8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inner_update(params, grads, rate_forms(shapes, 8), max_grad_norm=0.3)
        torch.set_num_threads(max(2, before))
        many = inner_update(params, grads, rate_forms(shapes, 8), max_grad_norm=0.3)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize(
    "params,grads,lr,match",
    [
        ([torch.ones(3)], [torch.ones(2, 4)], 0.1, r"params\[0\] has shape"),
        ([torch.ones(3), torch.ones(2)], [torch.ones(2, 3), torch.ones(3, 2)], 0.1, r"grads\[1\] has 3 tasks"),
        ([torch.ones(3), torch.ones(2, dtype=torch.float64)], [torch.ones(2, 3), torch.ones(2, 2, dtype=torch.float64)], 0.1,
         r"params\[1\] is torch.float64"),
        ([torch.ones(3)], [torch.ones(2, 3, dtype=torch.float64)], 0.1, r"grads\[0\] is torch.float64"),
        ([torch.ones(3), torch.ones(2)], [torch.ones(2, 3)], 0.1, "2 params but 1 grads"),
        ([torch.ones(3)], [torch.ones(2, 3)], [torch.ones(4)], r"lr\[0\] has shape"),
        ([torch.ones(3)], [torch.ones(2, 3)], [torch.ones(3), torch.ones(3)], "has 2 tensors"),
        ([torch.ones(3)], [torch.ones(2, 3)], torch.tensor(0.1), "float or a list of tensors"),
        ([torch.ones(3, dtype=torch.int64)], [torch.ones(2, 3, dtype=torch.int64)], 0.1, "supported are"),
        ([torch.ones(3)], [torch.ones(())], 0.1, r"grads\[0\] is 0-dimensional"),
        (torch.ones(3), [torch.ones(2, 3)], 0.1, "list or tuple of tensors"),
        ([torch.ones(3)], [torch.ones(2, 3)], float("nan"), "finite"),
    ],
)
def test_bad_inputs_name_the_tensor(params, grads, lr, match) -> None:
    with pytest.raises(ValueError, match=match):
        inner_update(params, grads, lr)


def test_device_mismatch_names_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"params\[1\] is on meta"):
        inner_update([torch.ones(3), torch.ones(2, device="meta")], [torch.ones(2, 3), torch.ones(2, 2)], 0.1)


def test_bad_max_grad_norm() -> None:
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="max_grad_norm"):
            inner_update([torch.ones(3)], [torch.ones(2, 3)], 0.1, max_grad_norm=bad)


# ---- autograd ----------------------------------------------------------------------------------------


def _grad_inputs(lr_tensors: bool, decay_tensors: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    params = [mk(3, 2), mk(2, 4)]
    grads = [mk(2, 3, 2), mk(2, 4)]
    lr = [torch.rand(3, 2, generator=g, dtype=torch.float64).requires_grad_(), mk(2, 1)] if lr_tensors else 0.3
    decay = [mk(2, 3, 2), torch.rand(1, generator=g, dtype=torch.float64).requires_grad_()] if decay_tensors else 0.9
    return params, grads, lr, decay


def _flat_fn(n_params, lr_tensors, decay_tensors, clip):
    def fn(*xs):
        params, grads = list(xs[:n_params]), list(xs[n_params : 2 * n_params])
        rest = list(xs[2 * n_params :])
        lr = [rest.pop(0), rest.pop(0)] if lr_tensors else 0.3
        decay = [rest.pop(0), rest.pop(0)] if decay_tensors else 0.9
        return tuple(inner_update(params, grads, lr, decay, max_grad_norm=clip))

    return fn


@pytest.mark.parametrize("lr_tensors,decay_tensors", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("clip", [None, 0.7])
def test_gradcheck_and_gradgradcheck(lr_tensors, decay_tensors, clip) -> None:
    params, grads, lr, decay = _grad_inputs(lr_tensors, decay_tensors)
    inputs = params + grads + (lr if lr_tensors else []) + (decay if decay_tensors else [])
    fn = _flat_fn(len(params), lr_tensors, decay_tensors, clip)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("decay", [1.0, 0.9])
@pytest.mark.parametrize("shared", [False, True])
def test_scalar_rate_backward(decay: float, shared: bool) -> None:
    """The backward's multi-tensor path (scalar lr and decay, no clipping) vs the reference, for task-batched
    params and for params shared by all tasks (whose gradient sums over the task dim)."""
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    params = [mk(3, 2), mk(2, 4)] if shared else [mk(2, 3, 2), mk(2, 4)]
    grads = [mk(2, 3, 2), mk(2, 4)]
    weights = [torch.randn(2, 3, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)]

    def loss(fn):
        return sum((o * w).sum() for o, w in zip(fn(params, grads, 0.3, decay), weights))

    got = torch.autograd.grad(loss(inner_update), params + grads)
    want = torch.autograd.grad(loss(inner_update_reference), params + grads)
    for a, b in zip(got, want):  # the shared params' task sum may round in another order than autograd's: 1 ulp
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
    fn = lambda *xs: tuple(inner_update(list(xs[:2]), list(xs[2:]), 0.3, decay))  # noqa: E731
    assert torch.autograd.gradcheck(fn, params + grads)
    assert torch.autograd.gradgradcheck(fn, params + grads)


def count_saved(fn) -> int:
    """How many tensors autograd saves for the backward while ``fn()`` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return len(saved)


def test_plain_steps_keep_no_tensor_for_backward() -> None:
    """Scalar lr and decay without clipping: the backward needs no saved tensor, so the inner gradients can be
    freed after the step instead of living until the meta-backward; rate tensors and clipping still save."""
    params, grads, lr, decay = _grad_inputs(True, True)
    assert count_saved(lambda: inner_update(params, grads, 0.1, 0.9)) == 0
    assert count_saved(lambda: inner_update(params, grads, lr, 0.9)) > 0
    assert count_saved(lambda: inner_update(params, grads, 0.1, decay)) > 0
    assert count_saved(lambda: inner_update(params, grads, 0.1, 0.9, max_grad_norm=1.0)) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_backward_with_unused_outputs_and_low_precision(dtype: torch.dtype) -> None:
    """The plain backward when an output gets no gradient and when the inputs are not the accumulation dtype."""
    params, grads, _ = make_lists(dtype)
    params = [p.requires_grad_() for p in params]
    grads = [g.requires_grad_() for g in grads]
    w = torch.randn(grads[1].shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def grads_of(fn):
        outs = fn(params, grads, 0.3, 0.9)
        loss = (outs[1].float() * w.float()).sum() + outs[3].float().sum()  # outputs 0, 2, 4 unused
        return torch.autograd.grad(loss, params + grads, allow_unused=True)

    inputs = params + grads
    for x, a, b in zip(inputs, grads_of(inner_update), grads_of(inner_update_reference)):
        # autograd hands the op zeros for its unused outputs; the reference's graph leaves those inputs out (None)
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert a.dtype == b.dtype == x.dtype and a.shape == b.shape == x.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("clip", [None, 0.7])
def test_gradients_equal_reference_autograd(clip) -> None:
    params, grads, lr, decay = _grad_inputs(True, True, seed=5)
    inputs = params + grads + lr + decay
    weights = [torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64)]

    def loss(fn):
        outs = fn(params, grads, lr, decay, max_grad_norm=clip)
        return sum((o * w).sum() for o, w in zip(outs, weights))

    got = torch.autograd.grad(loss(inner_update), inputs)
    want = torch.autograd.grad(loss(inner_update_reference), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_opcheck() -> None:
    params, grads, _ = make_lists(torch.float32)
    shapes = [tuple(g.shape[1:]) for g in grads]
    lr = rate_forms(shapes)
    args_list = [
        (params, grads, None, 0.1, None, 1.0, None),
        (params, grads, lr, 0.0, None, 0.9, 1.0),
        ([p.double().requires_grad_() for p in params], [g.double().requires_grad_() for g in grads],
         [r.double().requires_grad_() for r in lr], 0.0, [r.double() for r in lr], 1.0, 0.5),
    ]
    for args in args_list:
        torch.library.opcheck(torch.ops.metaformer.inner_update.default, args)


def test_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()
    params, grads, _ = make_lists(torch.float32)

    def step(ps, gs):
        new = inner_update(ps, gs, 0.05, 0.99, max_grad_norm=2.0)
        return [n * 2.0 for n in new]

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(params, grads)
    want = step(params, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- MAML through the op -----------------------------------------------------------------------------


def _conv_net_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.3 * torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()  # noqa: E731
    return [r(4, 1, 3, 3), r(4), 1.0 + r(4), r(4), r(3, 4 * 4 * 4), r(3)]


def _forward(w, x):
    """conv -> batch norm (transductive batch statistics, as in MAML) -> relu -> pool -> linear."""
    h = F.conv2d(x, w[0], w[1], padding=1)
    h = F.batch_norm(h, None, None, w[2], w[3], training=True)
    h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), w[4], w[5])


def _maml_meta_grad(steps: int, use_op: bool):
    theta = _conv_net_params()
    g = torch.Generator().manual_seed(1)
    tasks = 3
    xs = torch.randn(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (tasks, 6), generator=g)
    xq = torch.randn(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (tasks, 6), generator=g)
    lr = 0.4
    outer = 0.0
    if use_op:
        # All tasks at once: fast weights carry the task dimension; the first step updates the shared theta.
        cur = [p.expand(tasks, *p.shape) for p in theta]
        for step in range(steps):
            losses = sum(F.cross_entropy(_forward([w[t] for w in cur], xs[t]), ys[t]) for t in range(tasks))
            grads = torch.autograd.grad(losses, cur, create_graph=True)
            cur = inner_update(theta if step == 0 else cur, list(grads), lr)
        outer = sum(F.cross_entropy(_forward([w[t] for w in cur], xq[t]), yq[t]) for t in range(tasks))
    else:
        for t in range(tasks):
            w = list(theta)
            for _ in range(steps):
                gr = torch.autograd.grad(F.cross_entropy(_forward(w, xs[t]), ys[t]), w, create_graph=True)
                w = [wi - lr * gi for wi, gi in zip(w, gr)]
            outer = outer + F.cross_entropy(_forward(w, xq[t]), yq[t])
    return torch.autograd.grad(outer, theta)


@pytest.mark.parametrize("steps", [1, 5])
def test_maml_meta_gradient_through_op_matches_plain_autograd(steps) -> None:
    got = _maml_meta_grad(steps, use_op=True)
    want = _maml_meta_grad(steps, use_op=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
    # Second order is really there: dropping the graph of the inner gradients changes the result.
    assert any((a - b).abs().max() > 0 for a, b in zip(got, _first_order(steps)))


def _first_order(steps: int):
    theta = _conv_net_params()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (3, 6), generator=g)
    xq = torch.randn(3, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (3, 6), generator=g)
    outer = 0.0
    for t in range(3):
        w = list(theta)
        for _ in range(steps):
            gr = torch.autograd.grad(F.cross_entropy(_forward(w, xs[t]), ys[t]), w)
            w = [wi - 0.4 * gi for wi, gi in zip(w, gr)]
        outer = outer + F.cross_entropy(_forward(w, xq[t]), yq[t])
    return torch.autograd.grad(outer, theta)


# ---- in-place variant -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_equals_out_of_place(dtype) -> None:
    params, grads, shapes = make_lists(dtype)
    batched = [p.expand(g.shape).contiguous() for p, g in zip(params, grads)]
    lr, decay = rate_forms(shapes, seed=4), 0.95
    want = inner_update(batched, grads, lr, decay, max_grad_norm=0.8)
    ptrs = [b.data_ptr() for b in batched]
    ops.inner_update_(batched, grads, lr, decay, max_grad_norm=0.8)
    assert [b.data_ptr() for b in batched] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(batched, want))


def test_inplace_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match=r"params\[0\] must be task-batched"):
        ops.inner_update_([torch.ones(3)], [torch.ones(2, 3)], 0.1)
    with pytest.raises(ValueError, match=r"params\[0\] must be task-batched"):
        ops.inner_update_([torch.ones(3, 2).t()], [torch.ones(2, 3)], 0.1)
    with pytest.raises(ValueError, match="requires grad"):
        ops.inner_update_([torch.ones(2, 3, requires_grad=True)], [torch.ones(2, 3)], 0.1)


def test_opcheck_inplace() -> None:
    params, grads, shapes = make_lists(torch.float32)
    batched = [p.expand(g.shape).contiguous() for p, g in zip(params, grads)]
    torch.library.opcheck(torch.ops.metaformer.inner_update_.default, (batched, grads, rate_forms(shapes), 0.0, None, 0.9, 1.0))
