"""inner_update: every backend against a float64 oracle for every lr form and container,
gradients (gradcheck and gradgradcheck in params, grads and lr), opcheck, torch.compile,
edge shapes (0-size, 1-element, many tensors, chunk boundaries), bad inputs."""

import pytest
import torch
from helpers import DEVICE, ON_CPU, assert_close64, assert_close_measured

import fastmeta.ops._inner_update as iu_mod
from fastmeta.ops import BackendError, registry, inner_update, inner_update_ref


FAST = ["cpp"] if ON_CPU else ["cuda"]
BACKENDS = ["reference", *FAST]
F64 = torch.float64


@pytest.fixture(autouse=True)
def _skip_unbuilt_backend(request):
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec else None
    for b in registry._TABLE["inner_update"]:
        if b.name == name and b.available():
            pytest.skip(f"backend {name}: {b.available()}")


# parameter shapes without the task dimension
SHAPE_SETS = {
    "mlp": [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)],
    "edge": [(0,), (1,), (3, 0, 2), (), (7,), (1, 1)],
    "conv": [(8, 3, 3, 3), (8,), (8,), (5, 8 * 4)],
    "many": [tuple(int(s) for s in torch.randint(1, 6, (k % 3 + 1,), generator=torch.Generator().manual_seed(k)))
             for k in range(40)],
    "chunks": [(50_000,), (3,), (33_000,)],  # > 1 CPU chunk of 32K, > 128K elements (T >= 2): parallel
}
LR_FORMS = ["float", "tensor0d", "per_tensor", "per_element", "per_task_element", "per_task",
            "mixed", "odd"]


def make_lr(form, shapes, T, dtype, device=DEVICE, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def r(*s):
        return (0.1 + torch.rand(s, generator=g, dtype=F64)).to(device, dtype)

    if form == "float":
        return 0.37
    if form == "tensor0d":
        return r()
    if form == "per_tensor":
        return [r() for _ in shapes]
    if form == "per_element":
        return [r(*s) for s in shapes]
    if form == "per_task_element":
        return [r(T, *s) for s in shapes]
    if form == "per_task":
        return [r(T, *([1] * len(s))) for s in shapes]
    if form == "mixed":
        choices = [lambda s: r(), lambda s: r(*s), lambda s: r(T, *s), lambda s: 0.25, lambda s: r(1, *s)]
        return [choices[i % len(choices)](s) for i, s in enumerate(shapes)]
    if form == "odd":  # broadcasts whose strides need the materialising fallback
        out = []
        for i, s in enumerate(shapes):
            if len(s) >= 2 and i % 2 == 0:
                out.append(r(T, 1, s[-1]) if len(s) == 2 else r(s[0], 1, *s[2:]))
            elif len(s) >= 1:
                out.append(r(T, *s).transpose(0, -1).contiguous().transpose(0, -1))  # not contiguous
            else:
                out.append(r(T))
        return out
    raise ValueError(form)


def make_inputs(shapes, T, dtype, container, device=DEVICE):
    ps = [torch.randn(T, *s, dtype=F64).to(device, dtype) for s in shapes]
    gs = [torch.randn(T, *s, dtype=F64).to(device, dtype) for s in shapes]
    if container == "dict":
        keys = [f"layer{i}.w" for i in range(len(shapes))]
        return dict(zip(keys, ps)), dict(zip(keys, gs)), keys
    if container == "tuple":
        return tuple(ps), tuple(gs), None
    return ps, gs, None


def as_container(lr, keys):
    return dict(zip(keys, lr)) if (keys is not None and isinstance(lr, list)) else lr


def values(x):
    return list(x.values()) if isinstance(x, dict) else list(x)


def oracle(ps, gs, lr):
    """Independent float64 loop: p - lr * g."""
    lrs = lr if isinstance(lr, list) else [lr] * len(ps)
    out = []
    for p, g, l in zip(ps, gs, lrs):
        l64 = l.double() if isinstance(l, torch.Tensor) else l
        out.append(p.double() - l64 * g.double())
    return out


def run_with_grads(fn, ps, gs, lr, keys, container, cots):
    """Forward + gradients w.r.t. every param, grad and tensor lr, against cotangents cots."""
    ps = [p.detach().clone().requires_grad_() for p in ps]
    gs = [g.detach().clone().requires_grad_() for g in gs]
    lr_list = lr if isinstance(lr, list) else [lr]
    lr_leaves = [l.detach().clone().requires_grad_() if isinstance(l, torch.Tensor) else l for l in lr_list]
    lr_in = lr_leaves if isinstance(lr, list) else lr_leaves[0]
    if container == "dict":
        P, G, L = dict(zip(keys, ps)), dict(zip(keys, gs)), as_container(lr_in, keys)
    elif container == "tuple":
        P, G, L = tuple(ps), tuple(gs), lr_in
    else:
        P, G, L = ps, gs, lr_in
    out = fn(P, G, L)
    outs = values(out)
    tensors_lr = [l for l in lr_leaves if isinstance(l, torch.Tensor)]
    total = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cots))
    grads = torch.autograd.grad(total, [*ps, *gs, *tensors_lr], allow_unused=True)
    return out, [o.detach() for o in outs], grads


def _cases():
    return [
        (bk, lr_form, set_name, container)
        for bk in BACKENDS
        for lr_form in LR_FORMS
        for set_name, container in [("mlp", "dict"), ("edge", "list"), ("conv", "tuple"), ("many", "dict")]
    ]


@pytest.mark.parametrize("backend,lr_form,set_name,container", _cases())
def test_matches_float64_oracle(backend, lr_form, set_name, container):
    shapes, T = SHAPE_SETS[set_name], 3
    P, G, keys = make_inputs(shapes, T, F64, container)
    lr = make_lr(lr_form, shapes, T, F64)
    cots = [torch.randn(T, *s, dtype=F64, device=DEVICE) for s in shapes]

    def fast(P, G, L):
        return inner_update(P, G, L, backend=backend)

    def ref(P, G, L):
        return dict(zip(keys, oracle(values(P), values(G), L if not isinstance(L, dict) else list(L.values())))) \
            if keys is not None else oracle(values(P), values(G), L)

    out, outs, grads = run_with_grads(fast, values(P), values(G), lr, keys, container, cots)
    _, outs_ref, grads_ref = run_with_grads(ref, values(P), values(G), lr, keys, container, cots)
    assert type(out) is type(P) or (container == "dict" and isinstance(out, dict))
    if keys is not None:
        assert list(out.keys()) == keys
    for o, r, s in zip(outs, outs_ref, shapes):
        assert o.shape == (T, *s) and o.dtype == F64 and o.is_contiguous()
        assert_close64(o, r, name="out")
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        if b is None:
            assert a is None or not a.any()
        else:
            assert a is not None, f"missing gradient for input {i}"
            assert a.shape == b.shape
            assert_close64(a, b, name=f"grad {i}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("lr_form", ["float", "per_task", "per_element", "odd"])
def test_float32_within_measured_tolerance(backend, lr_form):
    shapes, T = SHAPE_SETS["conv"], 4
    ps, gs, _ = make_inputs(shapes, T, torch.float32, "list")
    lr = make_lr(lr_form, shapes, T, torch.float32)
    fast = inner_update(ps, gs, lr, backend=backend)
    same = inner_update_ref(ps, gs, lr)
    exact = oracle(ps, gs, lr)
    for f, s, e in zip(fast, same, exact):
        assert f.dtype == torch.float32
        assert_close_measured(f, s, e, atol=1e-7, name="out")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("lr_form", ["tensor0d", "per_element", "per_task"])
def test_float32_lr_gradient_within_measured_tolerance(backend, lr_form):
    shapes, T = SHAPE_SETS["conv"], 25
    ps, gs, _ = make_inputs(shapes, T, torch.float32, "list")
    lr = make_lr(lr_form, shapes, T, torch.float32)
    cots = [torch.randn(T, *s, device=DEVICE) for s in shapes]
    _, _, fast = run_with_grads(lambda P, G, L: inner_update(P, G, L, backend=backend), ps, gs, lr, None, "list", cots)
    _, _, same = run_with_grads(inner_update_ref, ps, gs, lr, None, "list", cots)
    _, _, exact = run_with_grads(lambda P, G, L: oracle(P, G, L), ps, gs, lr, None, "list", cots)
    for f, s_, e in zip(fast, same, exact):
        # a rate's gradient sums many products: allow one float32 rounding of its size
        atol = 2 * torch.finfo(torch.float32).eps * max(1.0, e.abs().max().item())
        assert_close_measured(f, s_, e, atol=atol, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_boundaries_and_parallel_path(backend):
    # forward and the lr gradient (fused on cpp: a parallel reduction here) past one chunk
    shapes, T = SHAPE_SETS["chunks"], 2
    # the lr gradient's three reduction shapes: whole tensor, over tasks, within each task
    forms = ("float", "tensor0d", "per_element", "per_task") if backend != "reference" else ("float",)
    for lr_form in forms:
        ps, gs, _ = make_inputs(shapes, T, F64, "list")
        lr = make_lr(lr_form, shapes, T, F64)
        if lr_form == "float":
            for o, r in zip(inner_update(ps, gs, lr, backend=backend), oracle(ps, gs, lr)):
                assert_close64(o, r, name=lr_form)
            continue
        cots = [torch.randn(T, *s, dtype=F64, device=DEVICE) for s in shapes]
        _, outs, grads = run_with_grads(lambda P, G, L: inner_update(P, G, L, backend=backend),
                                        ps, gs, lr, None, "list", cots)
        _, outs_ref, grads_ref = run_with_grads(lambda P, G, L: oracle(P, G, L), ps, gs, lr, None, "list", cots)
        for o, r in zip(outs, outs_ref):
            assert_close64(o, r, name=lr_form)
        for i, (a, b) in enumerate(zip(grads, grads_ref)):
            assert_close64(a, b, name=f"{lr_form} grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_params_are_read_in_place_and_get_summed_gradients(backend):
    # the first inner step: params = shared_param.expand(T, *shape) (TaskFunction.expand)
    T = 5
    base = {"w": torch.randn(4, 3, dtype=F64, device=DEVICE, requires_grad=True),
            "b": torch.randn(4, dtype=F64, device=DEVICE, requires_grad=True)}
    params = {k: v.expand(T, *v.shape) for k, v in base.items()}
    grads = {k: torch.randn(T, *v.shape, dtype=F64, device=DEVICE) for k, v in base.items()}
    lr = {k: torch.rand(v.shape, dtype=F64, device=DEVICE, requires_grad=True) for k, v in base.items()}
    out = inner_update(params, grads, lr, backend=backend)
    cot = {k: torch.randn_like(o) for k, o in out.items()}
    gb = torch.autograd.grad(sum((out[k] * cot[k]).sum() for k in out), [*base.values(), *lr.values()])
    for k, v in base.items():
        assert_close64(out[k], v - lr[k] * grads[k])
    assert_close64(gb[0], cot["w"].sum(0))
    assert_close64(gb[1], cot["b"].sum(0))
    assert_close64(gb[2], -(grads["w"] * cot["w"]).sum(0))
    assert_close64(gb[3], -(grads["b"] * cot["b"]).sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_offset_inputs(backend):
    T = 3
    big = torch.randn(T, 9, 7, dtype=F64, device=DEVICE)
    p = big[:, 1:, 1:]                                       # offset, strided
    g = torch.randn(T, 6, 8, dtype=F64, device=DEVICE).transpose(1, 2)  # [T, 8, 6] transposed
    p2 = torch.randn(T * 5 + 1, dtype=F64, device=DEVICE)[1:].view(T, 5)  # misaligned start
    g2 = torch.randn(T, 5, dtype=F64, device=DEVICE)
    lr = [torch.rand(8, 1, dtype=F64, device=DEVICE), torch.rand(5, dtype=F64, device=DEVICE)[None]]
    out = inner_update([p, p2], [g, g2], lr, backend=backend)
    assert_close64(out[0], p - lr[0] * g)
    assert_close64(out[1], p2 - lr[1] * g2)


def test_empty_containers():
    assert inner_update({}, {}, 0.1) == {}
    assert inner_update([], [], 0.1) == []
    assert inner_update((), (), 0.1) == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_dict_lr_gets_gradients(backend):
    # MetaSGD keeps its learned rates in an nn.ParameterDict
    P = {"a": torch.randn(2, 3, dtype=F64, device=DEVICE), "b": torch.randn(2, dtype=F64, device=DEVICE)}
    G = {k: torch.randn_like(v) for k, v in P.items()}
    lrs = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.rand(v.shape[1:], dtype=F64, device=DEVICE))
                                  for k, v in P.items()})
    out = inner_update(P, G, lrs, backend=backend)
    sum(o.sum() for o in out.values()).backward()
    for k in P:
        assert_close64(out[k], P[k] - lrs[k] * G[k])
        assert_close64(lrs[k].grad, -G[k].sum(0))


def test_grads_list_pairs_with_dict_params_by_order():
    P = {"a": torch.randn(2, 3, dtype=F64), "b": torch.randn(2, dtype=F64)}
    G = [torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64)]
    out = inner_update(P, G, 0.5)
    assert list(out) == ["a", "b"]
    assert_close64(out["a"], P["a"] - 0.5 * G[0])


# ---- autograd --------------------------------------------------------------------------------


def _flat_fn(backend, shapes, lr_form, container):
    n = len(shapes)

    def fn(*flat):
        ps, gs, ls = list(flat[:n]), list(flat[n: 2 * n]), list(flat[2 * n:])
        if lr_form == "float":
            lr = 0.3
        elif lr_form == "tensor0d":
            lr = ls[0]
        else:
            lr = ls
        if container == "dict":
            keys = [f"k{i}" for i in range(n)]
            out = inner_update(dict(zip(keys, ps)), dict(zip(keys, gs)),
                               dict(zip(keys, lr)) if isinstance(lr, list) else lr, backend=backend)
            return tuple(out.values())
        return tuple(inner_update(ps, gs, lr, backend=backend))

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr_form", ["float", "tensor0d", "per_tensor", "per_element", "per_task_element", "per_task"])
def test_gradcheck_and_gradgradcheck_all_inputs(backend, lr_form):
    shapes, T = [(2, 3), (3,), ()], 2
    ps, gs, _ = make_inputs(shapes, T, F64, "list")
    lr = make_lr(lr_form, shapes, T, F64)
    ls = [] if lr_form == "float" else ([lr] if lr_form == "tensor0d" else lr)
    flat = [t.detach().clone().requires_grad_() for t in [*ps, *gs, *ls]]
    fn = _flat_fn(backend, shapes, lr_form, "dict" if lr_form == "per_element" else "list")
    assert torch.autograd.gradcheck(fn, flat)
    assert torch.autograd.gradgradcheck(fn, flat)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("with_params", [True, False])
def test_update_function_gradcheck_and_gradgradcheck(backend, with_params):
    # the one autograd formulation (eager and torch.compile), called directly: also the forms
    # the public function never builds (no params, per-task lr without a parameter to match)
    shapes, T = [(2, 3), (3,), ()], 2
    ps, gs, _ = make_inputs(shapes, T, F64, "list")
    forms = [torch.rand((), dtype=F64, device=DEVICE), torch.rand(3, dtype=F64, device=DEVICE),
             torch.rand(T, dtype=F64, device=DEVICE)]  # per tensor, per element, per task
    n = len(shapes)
    flat = [t.detach().clone().requires_grad_() for t in [*(ps if with_params else []), *gs, *forms]]
    k = n if with_params else 0

    def fn(*flat):
        ps, gs, lrs = list(flat[:k]), list(flat[k:k + n]), list(flat[k + n:])
        return tuple(iu_mod._update(ps, gs, lrs, 0.7, backend))

    assert torch.autograd.gradcheck(fn, flat)
    assert torch.autograd.gradgradcheck(fn, flat)


@pytest.mark.parametrize("backend", FAST)
def test_second_order_maml_matches_reference(backend):
    # two inner steps of linear regression, meta-gradient through both (create_graph=True)
    T, N = 4, 6
    x = torch.randn(T, N, 3, dtype=F64, device=DEVICE)
    y = torch.randn(T, N, 1, dtype=F64, device=DEVICE)

    def meta_grad(bk):
        w0 = torch.randn(3, 1, dtype=F64, device=DEVICE, generator=None) * 0 + 0.1
        w0.requires_grad_()
        lr = torch.full((3, 1), 0.2, dtype=F64, device=DEVICE, requires_grad=True)  # Meta-SGD
        params = {"w": w0.expand(T, 3, 1)}
        for _ in range(2):
            loss = ((x @ params["w"] - y) ** 2).mean((1, 2)).sum()
            (g,) = torch.autograd.grad(loss, [params["w"]], create_graph=True)
            params = inner_update(params, {"w": g}, {"w": lr}, backend=bk)
        q = ((x @ params["w"] - y) ** 2).mean()
        return torch.autograd.grad(q, [w0, lr])

    for a, b in zip(meta_grad(backend), meta_grad("reference")):
        assert_close64(a, b)


def test_torch_func_transforms_use_the_reference():
    p = torch.randn(4, 3, dtype=F64, device=DEVICE)
    g = torch.randn(4, 3, dtype=F64, device=DEVICE)
    lr = torch.rand(3, dtype=F64, device=DEVICE)
    d_lr = torch.func.grad(lambda lr: inner_update([p], [g], [lr])[0].pow(2).sum())(lr)
    assert_close64(d_lr, (-2 * (p - lr * g) * g).sum(0))
    out = torch.func.vmap(lambda p, g: inner_update({"a": p}, {"a": g}, 0.3)["a"])(p, g)
    assert_close64(out, p - 0.3 * g)


# ---- registered op: opcheck, torch.compile ---------------------------------------------------
# The registered ops carry the kernels and their fake implementations, no autograd formula of
# their own: differentiation is the autograd.Function around them, in eager mode and under
# torch.compile (checked by gradcheck above and the compile test below).


@pytest.mark.parametrize("backend", FAST)
def test_opcheck_registered_op(backend):
    shapes, T = [(2, 3), (4,), (0,), ()], 3
    ps, gs, _ = make_inputs(shapes, T, F64, "list")
    per_elem = [torch.rand(s, dtype=F64, device=DEVICE) for s in shapes]
    scalar = torch.rand((), dtype=F64, device=DEVICE)
    expanded = [torch.randn(s, dtype=F64, device=DEVICE).expand(T, *s) for s in shapes]
    calls = [
        (ps, gs, [], 0.3),
        ([], gs, per_elem, 1.0),
        (ps, gs, [scalar] * len(shapes), 1.0),
        (expanded, gs, per_elem, 0.5),
    ]
    for p, g, l, a in calls:
        torch.library.opcheck(iu_mod._fwd, (p, g, l, a, backend))
        want = [(pi if p else 0) - a * (l[i] if l else 1) * gi for i, (pi, gi) in
                enumerate(zip(p or g, g))]
        for o, w in zip(iu_mod._fwd(p, g, l, a, backend), want):
            assert_close64(o, w)


def test_opcheck_lr_grad_op():
    # (the reduction follows its tensors: registry table inner_update_lr_grad)
    shapes, T = [(2, 3), (4,), (0,), (), (2, 5)], 3
    gs = [torch.randn(T, *s, dtype=F64, device=DEVICE) for s in shapes]
    gos = [torch.randn(T, *s, dtype=F64, device=DEVICE) for s in shapes]
    lrs = [torch.rand((), dtype=F64, device=DEVICE), torch.rand(4, dtype=F64, device=DEVICE),
           torch.rand(T, 0, dtype=F64, device=DEVICE), torch.rand(T, dtype=F64, device=DEVICE),
           torch.rand(T, 1, 5, dtype=F64, device=DEVICE)]  # last: the ATen fallback
    torch.library.opcheck(iu_mod._lr_grad_fwd, (gs, gos, lrs, 0.6))
    out = iu_mod._lr_grad_fwd(gs, gos, lrs, 0.6)
    for o, g, go, lr in zip(out, gs, gos, lrs):
        assert_close64(o, -0.6 * (g * go).sum_to_size(lr.shape))


# aot_eager traces the autograd.Function around the registered ops; inductor (torch.compile's
# default) also compiles the graph around them
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", FAST)
def test_torch_compile_fullgraph(backend, compiler):
    T = 3
    P = {"w": torch.randn(T, 4, 2, device=DEVICE), "b": torch.randn(T, 4, device=DEVICE)}
    G = {k: torch.randn_like(v).requires_grad_() for k, v in P.items()}
    lr = {k: torch.rand(v.shape[1:], device=DEVICE, requires_grad=True) for k, v in P.items()}
    P = {k: v.requires_grad_() for k, v in P.items()}
    graphs = []

    def record(gm, example_inputs):  # the Dynamo graph, then the chosen compiler on it
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(compiler)(gm, example_inputs)

    @torch.compile(fullgraph=True, backend=record)
    def step(P, G, lr):
        new = inner_update(P, G, lr, backend=backend)
        new = inner_update(new, G, 0.1, backend=backend)
        return sum((v * v).sum() for v in new.values())

    inputs = [*P.values(), *G.values(), *lr.values()]
    loss = step(P, G, lr)
    got = torch.autograd.grad(loss, inputs)
    code = "\n".join(g.print_readable(print_output=False) for g in graphs)
    assert "fastmeta.inner_update_fwd" in code and "fastmeta.inner_update_lr_grad" in code
    ref_in = [t.detach().clone().requires_grad_() for t in inputs]
    Pr, Gr, Lr = dict(zip(P, ref_in[:2])), dict(zip(P, ref_in[2:4])), dict(zip(P, ref_in[4:]))
    ref = sum(((Pr[k] - Lr[k] * Gr[k] - 0.1 * Gr[k]) ** 2).sum() for k in P)
    want = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- registry --------------------------------------------------------------------------------


def test_auto_selection_and_mixed_dtypes_fall_back():
    ps = [torch.randn(2, 3, device=DEVICE), torch.randn(2, device=DEVICE, dtype=F64)]
    gs = [torch.randn_like(p) for p in ps]
    out = inner_update(ps, gs, 0.5)  # fused backends decline mixed dtypes: the reference runs
    for o, p, g in zip(out, ps, gs):
        assert o.dtype == p.dtype
        torch.testing.assert_close(o, p - 0.5 * g)
    if registry.select("inner_update", [ps[0]]) != "reference":
        with pytest.raises(BackendError, match="several dtypes"):
            inner_update(ps, gs, 0.5, backend=FAST[0])


@pytest.mark.skipif(not ON_CPU, reason="cpu-only: the cpp kernel serves float32/float64")
def test_cpp_declines_float16():
    p = [torch.randn(2, 3, dtype=torch.float16)]
    out = inner_update(p, p, 0.5)
    torch.testing.assert_close(out[0], p[0] - 0.5 * p[0])
    if registry.select("inner_update", [torch.randn(1)]) == "cpp":
        with pytest.raises(BackendError, match="dtype float16 not supported"):
            inner_update(p, p, 0.5, backend="cpp")


@pytest.mark.skipif(not ON_CPU, reason="cpu-only: the fused lr gradient is the cpp kernel's")
def test_lr_gradient_backend_comes_from_the_registry():
    """The lr-gradient reduction runs the backend its registry table picks: the fused C++ kernel
    (``fastmeta_cpp::inner_update_lr_grad`` among the dispatched ops) where it is built, plain
    torch ops otherwise; both give the float64 oracle's gradient."""
    ps, gs, _ = make_inputs(SHAPE_SETS["mlp"], 3, F64, "list")
    lr = make_lr("per_element", SHAPE_SETS["mlp"], 3, F64)
    lr = [t.detach().requires_grad_() for t in lr]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = inner_update(ps, gs, lr)
        got = torch.autograd.grad(sum(o.sum() for o in out), lr)
    ran = {e.name for e in prof.events()}
    fused = registry.select("inner_update_lr_grad", [*gs, *lr]) == "cpp"
    assert ("fastmeta_cpp::inner_update_lr_grad" in ran) == fused, sorted(n for n in ran if "fastmeta" in n)
    for d, g, l in zip(got, gs, lr):
        assert_close64(d, -g.sum_to_size(l.shape))


@pytest.mark.skipif(ON_CPU, reason="needs FASTMETA_TEST_DEVICE=cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lr_form", ["float", "per_element", "per_task", "odd"])
def test_cuda_low_precision_measured(dtype, lr_form):
    shapes, T = SHAPE_SETS["conv"] + [(1000, 77)], 8
    ps, gs, _ = make_inputs(shapes, T, dtype, "list")
    lr = make_lr(lr_form, shapes, T, dtype)
    fast = inner_update(ps, gs, lr, backend="cuda")
    same = [p.float().to(dtype) for p in inner_update_ref(ps, gs, lr)]
    for f, s, e in zip(fast, same, oracle(ps, gs, lr)):
        assert f.dtype == dtype
        assert_close_measured(f, s, e, atol=1e-6, name=str(dtype))


@pytest.mark.skipif(ON_CPU, reason="needs FASTMETA_TEST_DEVICE=cuda")
def test_cuda_many_tensors_and_launch_splits():
    # > 24 tensors (descriptor table) and > 320 chunks of 64K (block table): several launches
    shapes = [(5,)] * 30 + [(700_000,), (3, 3)] + [(70_000,)] * 3
    T = 32
    ps, gs, _ = make_inputs(shapes, T, torch.float32, "list")
    lr = make_lr("mixed", shapes, T, torch.float32)
    for o, r in zip(inner_update(ps, gs, lr, backend="cuda"), oracle(ps, gs, lr)):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_CPU, reason="needs FASTMETA_TEST_DEVICE=cuda")
def test_cuda_params_accept_cpu_scalar_lr():
    p = [torch.randn(2, 3, device="cuda")]
    out = inner_update(p, p, torch.tensor(0.5))
    torch.testing.assert_close(out[0], 0.5 * p[0])


# ---- bad inputs ------------------------------------------------------------------------------


def _good():
    P = {"w": torch.randn(3, 4, 2, device=DEVICE), "b": torch.randn(3, 4, device=DEVICE)}
    G = {k: torch.randn_like(v) for k, v in P.items()}
    return dict(params=P, grads=G, lr=0.1)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(lr=torch.tensor(1)), TypeError, "lr must be a floating tensor.*int64"),
        (lambda a: a.update(lr="0.1"), TypeError, "lr must be a float or a floating tensor, got str"),
        (lambda a: a.update(lr=True), TypeError, "lr must be a float"),
        (lambda a: a.update(lr=None), TypeError, "lr must be a float"),
        (lambda a: a.update(lr={"w": torch.tensor(1), "b": 0.1}), TypeError, r"lr\['w'\] must be a floating"),
        (lambda a: a.update(lr=float("nan")), ValueError, "lr must be finite"),
        (lambda a: a.update(lr=torch.rand(3)), ValueError, "lr given as one tensor must be a scalar"),
        (lambda a: a.update(lr={"w": torch.rand(5, 4, 2, device=DEVICE), "b": 0.1}), ValueError,
         r"lr\['w'\] has shape \(5, 4, 2\), which does not broadcast to params\['w'\]'s shape \(3, 4, 2\)"),
        (lambda a: a.update(lr={"w": 0.1}), ValueError, r"lr must have the same keys as params: missing \['b'\]"),
        (lambda a: a.update(lr=[0.1, 0.2, 0.3]), ValueError, "3 learning rates for 2 params"),
        (lambda a: a["grads"].update(w=torch.randn(2, 4, 2, device=DEVICE)), ValueError,
         r"grads\['w'\] has shape \(2, 4, 2\) but params\['w'\] has \(3, 4, 2\)"),
        (lambda a: a["grads"].pop("b"), ValueError, r"grads must have the same keys as params: missing \['b'\]"),
        (lambda a: a["grads"].update(c=torch.randn(1)), ValueError, r"unexpected \['c'\]"),
        (lambda a: a["grads"].update(w=a["grads"]["w"].double()), TypeError, r"grads\['w'\] has dtype torch.float64"),
        (lambda a: a["grads"].update(w=a["grads"]["w"].to("meta")), ValueError, r"grads\['w'\] is on meta"),
        (lambda a: a.update(lr={"w": torch.rand(4, 2, device="meta"), "b": 0.1}), ValueError, r"lr\['w'\] is on meta"),
        (lambda a: a["params"].update(w=a["params"]["w"].long()), TypeError, r"params\['w'\] must be a floating"),
        (lambda a: a["params"].update(w=[1.0]), TypeError, r"params\['w'\] must be a torch.Tensor"),
        (lambda a: a.update(params=torch.randn(2)), TypeError, "params must be a dict"),
        (lambda a: a.update(params=list(a["params"].values())), TypeError, "grads must be a list/tuple"),
        (lambda a: a.update(params=list(a["params"].values()), grads=list(a["grads"].values()), lr={"w": 0.1}),
         TypeError, "lr is a dict but params is a list"),
        (lambda a: a.update(backend="triton-magic"), ValueError, "not a backend of inner_update"),
    ],
)
def test_bad_inputs_raise_clearly(change, exc, match):
    args = _good()
    change(args)
    with pytest.raises(exc, match=match):
        inner_update(**args)
