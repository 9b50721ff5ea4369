"""gaussian_product: every backend against a float64 oracle, masks, autograd (twice), opcheck,
torch.compile, bad inputs."""

import pytest
import torch
from helpers import ALL_BACKENDS, DEVICE, FAST_BACKENDS, ON_CPU, assert_close64, assert_close_measured, case_id

import fastmeta.ops._gaussian_product as gp_mod
from fastmeta.ops import gaussian_product, gaussian_product_ref

pytestmark = pytest.mark.usefixtures("one_thread")

# (B, C, D) with block-boundary sizes of the kernels (Triton blocks of 16 in the interpreter)
SMALL = [(1, 1, 1), (2, 15, 16), (1, 17, 15), (2, 33, 17), (3, 16, 33)]
LARGER = [(16, 100, 5), (16, 256, 32), (2, 40, 600)]


def make(b, c, d, dtype=torch.float64, mask="bool", device=DEVICE):
    """Factors with a spread of variances (some below the clamp) and padding full of junk."""
    mu = torch.randn(b, c, d, dtype=torch.float64)
    var = torch.exp(2 * torch.randn(b, c, d, dtype=torch.float64))
    var.view(-1)[:: max(1, var.numel() // 3)] = 1e-9  # clamped to MIN_VAR
    if mask == "none":
        m = None
    else:
        keep = torch.rand(b, c) < 0.6
        keep[:, 0] = True  # every row keeps a factor
        m = {
            "bool": keep,
            "int": keep.long(),
            "float": keep.double() * (0.1 + torch.rand(b, c) * 2),  # weights (tempered factors)
        }[mask]
        pad = ~keep[..., None].expand(b, c, d)
        mu[pad] = float("nan")  # padding is never read
        var[pad] = -1.0
        m = m.to(device)
    return mu.to(device, dtype), var.to(device, dtype), m


def run(fn, mu, var, mask, cot, **kw):
    a = mu.detach().clone().requires_grad_()
    v = var.detach().clone().requires_grad_()
    m_out, v_out = fn(a, v, mask, **kw)
    ga, gv = torch.autograd.grad((m_out * cot[0]).sum() + (v_out * cot[1]).sum(), (a, v))
    return m_out.detach(), v_out.detach(), ga, gv


def _cases():
    return [
        (bk, dtype, shape)
        for bk in ALL_BACKENDS
        for dtype in (torch.float32, torch.float64)
        for shape in (SMALL if (bk == "triton" and ON_CPU) else SMALL + LARGER)
    ]


@pytest.mark.parametrize("backend,dtype,shape", _cases(), ids=case_id)
def test_matches_float64_oracle(backend, dtype, shape):
    mu, var, mask = make(*shape, dtype)
    b, _, d = shape
    cot = [torch.randn(b, d, dtype=torch.float64, device=DEVICE).to(dtype) for _ in range(2)]
    fast = run(gaussian_product, mu, var, mask, cot, backend=backend)
    oracle = run(gaussian_product_ref, mu.double(), var.double(), mask, [c.double() for c in cot])
    same = run(gaussian_product_ref, mu, var, mask, cot)
    for f, o, s, what in zip(fast, oracle, same, ["mu", "var", "grad mu", "grad var"]):
        assert f.dtype == dtype
        assert torch.isfinite(f).all(), what
        if dtype == torch.float64:
            assert_close64(f, o, rtol=1e-9, name=what)
        else:
            assert_close_measured(f, s, o, atol=1e-6 * o.abs().max().item(), name=what)


@pytest.mark.parametrize("kind", ["none", "bool", "int", "float"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masks(backend, kind):
    """No mask = all ones; a bool mask drops factors; a float mask weights them (powers)."""
    mu, var, mask = make(2, 17, 3, mask=kind)
    out = gaussian_product(mu, var, mask, backend=backend)
    if mask is None:
        w = torch.ones(2, 17, 1, dtype=torch.float64, device=DEVICE)
    else:
        w = mask.double()[..., None]
    # the closed form written out with only the valid factors (indexing, not masking)
    for b in range(2):
        keep = w[b, :, 0] > 0
        prec = w[b, keep] / var[b, keep].clamp_min(gp_mod.MIN_VAR)
        v = 1 / prec.sum(0)
        assert_close64(out[1][b], v)
        assert_close64(out[0][b], v * (prec * mu[b, keep]).sum(0))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_factor_is_itself_and_clamp_gradient(backend):
    mu = torch.tensor([[[0.5, -2.0, 3.0]]], dtype=torch.float64, device=DEVICE)
    var = torch.tensor([[[0.25, 1e-12, 2.0]]], dtype=torch.float64, device=DEVICE)
    a, v = mu.clone().requires_grad_(), var.clone().requires_grad_()
    m_out, v_out = gaussian_product(a, v, backend=backend)
    assert_close64(m_out, mu[:, 0])
    assert_close64(v_out, torch.tensor([[0.25, gp_mod.MIN_VAR, 2.0]], dtype=torch.float64, device=DEVICE))
    (v_out.sum() + m_out.sum()).backward()
    assert_close64(v.grad, torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float64, device=DEVICE))
    assert_close64(a.grad, torch.ones_like(mu))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous(backend):
    mu, var, mask = make(3, 6, 8)
    mu_t = mu.transpose(0, 1).contiguous().transpose(0, 1)
    var_t = var.transpose(1, 2).contiguous().transpose(1, 2)
    assert not mu_t.is_contiguous() and not var_t.is_contiguous()
    cot = [torch.randn(3, 8, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    fast = run(gaussian_product, mu_t, var_t, mask, cot, backend=backend)
    oracle = run(gaussian_product_ref, mu, var, mask, cot)
    for f, o in zip(fast, oracle):
        assert_close64(f, o, rtol=1e-9)


def _small_args():
    mu, var, mask = make(2, 5, 3)
    return mu.requires_grad_(), var.requires_grad_(), mask


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    mu, var, mask = _small_args()
    var = (var.detach().abs() + 0.1).requires_grad_()  # away from the clamp's kink
    f = lambda a, v: gaussian_product(a, v, mask, backend=backend)  # noqa: E731
    torch.autograd.gradcheck(f, (mu, var))
    torch.autograd.gradgradcheck(f, (mu, var))


def test_reference_is_twice_differentiable_without_the_op():
    mu, var, mask = _small_args()
    var = (var.detach().abs() + 0.1).requires_grad_()
    f = lambda a, v: gaussian_product_ref(a, v, mask)  # noqa: E731
    torch.autograd.gradcheck(f, (mu, var))
    torch.autograd.gradgradcheck(f, (mu, var))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_opcheck(backend):
    mu, var, mask = _small_args()
    w = mask.double()
    torch.library.opcheck(gp_mod._fwd, (mu, var, w, 1e-7, backend))
    m_out, v_out = gaussian_product_ref(mu.detach(), var.detach(), w)
    g = [torch.randn(2, 3, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    torch.library.opcheck(gp_mod._bwd, (*g, mu.detach(), var.detach(), w, m_out, v_out, 1e-7, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "triton" or not ON_CPU])
def test_torch_compile_fullgraph(backend, compiler):
    mu, var, mask = make(4, 9, 5, torch.float32)
    var = var.abs() + 0.1
    a, v = mu.nan_to_num().requires_grad_(), var.requires_grad_()

    @torch.compile(fullgraph=True, backend=compiler)
    def f(x, y, m):
        zm, zv = gaussian_product(x * 2, y, m, backend=backend)
        return (zm.square() + zv.log()).sum()

    out = f(a, v, mask)
    out.backward()
    a2, v2 = a.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    zm, zv = gaussian_product_ref(a2 * 2, v2, mask)
    ref = (zm.square() + zv.log()).sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(v.grad, v2.grad)


def _args():
    mu, var, mask = make(2, 4, 3, torch.float32)
    return dict(mu=mu, var=var, mask=mask)


def _set(key, index, value):
    def change(a):
        a[key] = a[key].clone()
        a[key][index] = value
    return change


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(mask=torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)), ValueError,
         "row 0 has no valid factor"),
        (lambda a: a["mask"].__setitem__(1, False), ValueError, "row 1 has no valid factor"),
        (lambda a: a.update(mask=torch.tensor([[1.0, -1, 0, 0], [1, 1, 1, 1]], device=DEVICE)), ValueError,
         r"mask must be >= 0.*-1.0 at \[0, 1\]"),
        (lambda a: a.update(mask=torch.tensor([[1.0, float("nan"), 0, 0], [1, 1, 1, 1]], device=DEVICE)),
         ValueError, r"mask must be >= 0.*nan at \[0, 1\]"),
        (lambda a: a.update(mask=torch.tensor([[1.0, float("inf"), 0, 0], [1, 1, 1, 1]], device=DEVICE)),
         ValueError, r"mask must be finite.*inf at \[0, 1\]"),
        (lambda a: a.update(mask=a["mask"][:1]), ValueError, r"mask must have shape \[B, C\] = \(2, 4\)"),
        (lambda a: a.update(mask=[[1, 1, 1, 1]] * 2), TypeError, "mask must be a torch.Tensor"),
        (_set("mu", (0, 0, 1), float("nan")), ValueError, r"mu\[0, 0, 1\] = nan in a valid factor"),
        (_set("mu", (1, 0, 2), float("inf")), ValueError, r"mu\[1, 0, 2\] = inf in a valid factor"),
        (_set("var", (1, 0, 0), float("nan")), ValueError, r"var\[1, 0, 0\] = nan in a valid factor"),
        (_set("var", (0, 0, 2), -0.5), ValueError, r"var\[0, 0, 2\] = -0.5 in a valid factor"),
        (lambda a: a.update(mask=None, mu=a["mu"].nan_to_num(), var=torch.full((2, 4, 3), float("inf"), device=DEVICE)),
         ValueError,
         r"var\[0, :, 0\] is inf in every valid factor of row 0"),
        (lambda a: a.update(var=a["var"].double()), TypeError, "var has dtype torch.float64 but mu"),
        (lambda a: a.update(mu=a["mu"].int()), TypeError, "mu must be a floating tensor"),
        (lambda a: a.update(var=a["var"][:, :3]), ValueError, r"var must have the shape of mu \(2, 4, 3\)"),
        (lambda a: a.update(mu=a["mu"][0]), ValueError, r"mu must have shape \[B, C, D\]"),
        (lambda a: a.update(mu=a["mu"][:, :0], var=a["var"][:, :0], mask=None), ValueError, "empty input: C is 0"),
        (lambda a: a.update(var=a["var"].to("meta")), ValueError, "var is on meta"),
        (lambda a: a.update(min_var=0.0), ValueError, "min_var must be > 0"),
        (lambda a: a.update(min_var=float("nan")), ValueError, "min_var must be finite"),
    ],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_inputs_raise_clearly(backend, change, exc, match):
    args = _args()
    change(args)
    with pytest.raises(exc, match=match):
        gaussian_product(**args, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_intermediate_overflow_is_exact_or_reported(backend):
    """w * mu / var overflows float32 although the answer does not: a backend that sums in a
    wider type returns the exact answer, one that overflows says so (never a silent inf/nan)."""
    mu = torch.full((1, 2, 1), 3e38, device=DEVICE)
    var = torch.full((1, 2, 1), 1e-3, device=DEVICE)
    try:
        m_out, v_out = gaussian_product(mu, var, backend=backend)
    except ValueError as e:
        assert "overflowed" in str(e)
    else:
        torch.testing.assert_close(m_out, mu[:, 0])
        torch.testing.assert_close(v_out, var[:, 0] / 2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_padding_gets_zero_gradient(backend):
    mu, var, mask = make(2, 9, 4)
    cot = [torch.randn(2, 4, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    _, _, ga, gv = run(gaussian_product, mu, var, mask, cot, backend=backend)
    pad = ~mask[..., None].expand_as(ga)
    assert (ga[pad] == 0).all() and (gv[pad] == 0).all()
    assert torch.isfinite(ga).all() and torch.isfinite(gv).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_no_grad_and_torch_func(backend):
    """Without autograd the kernel runs directly; under torch.func the reference serves."""
    mu, var, mask = make(3, 7, 4)
    with torch.no_grad():
        out = gaussian_product(mu, var, mask, backend=backend)
    ref = gaussian_product_ref(mu, var, mask)
    assert_close64(out[0], ref[0], rtol=1e-9)
    assert_close64(out[1], ref[1], rtol=1e-9)
    f = lambda m: gaussian_product(m, var, mask, backend=backend)[0].sum()  # noqa: E731
    g_ref = torch.autograd.grad(gaussian_product_ref(mu.requires_grad_(), var, mask)[0].sum(), mu)[0]
    assert_close64(torch.func.grad(f)(mu.detach()), g_ref)
    per_task = torch.func.vmap(lambda m, v, k: gaussian_product(m[None], v[None], k[None], backend=backend)[0])
    assert_close64(per_task(mu.detach(), var, mask)[:, 0], ref[0], rtol=1e-9)
