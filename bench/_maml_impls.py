"""The rows of bench/bench_maml.py: one second-order MAML meta-step per implementation.

``MAKERS[name](model, cfg)`` returns ``step(sx, sy, qx, qy) -> meta-loss`` that leaves the
meta-gradient in ``.grad`` of ``model``'s parameters (the caller sets them to None first, see
:func:`run_step`). The peers are written as their own examples write them (see the bench's
docstring); higher, TorchOpt and learn2learn are optional and imported by the row that uses
them (:func:`availability` says why a row cannot run).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys
import types

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import _common as C
import fastmeta
from _maml_workload import loss_fn_of

def peer_versions() -> dict:
    out = {}
    for name in ("higher", "torchopt", "learn2learn", "fastmeta"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


_L2L = {}


def import_l2l_maml():
    """learn2learn.algorithms.MAML. ``import learn2learn`` also imports its vision datasets,
    which need a torchvision built for this torch (PyPI's is linked against the CUDA torch);
    when that import fails, load ``learn2learn.algorithms.maml`` (and ``learn2learn.utils``)
    with the package ``__init__`` files bypassed: the code timed is learn2learn's own."""
    if "maml" in _L2L:
        return _L2L["maml"], _L2L["note"]
    try:
        import learn2learn

        maml, note = learn2learn.algorithms.MAML, ""
    except Exception as exc:  # noqa: BLE001
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("learn2learn is not installed (bash tools/install_peers.sh)") from exc
        for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
            del sys.modules[name]
        root = spec.submodule_search_locations[0]
        for name, path in (("learn2learn", root), ("learn2learn.algorithms", root + "/algorithms")):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            mod.__package__ = name
            sys.modules[name] = mod
        import learn2learn.algorithms.maml as l2l_maml

        maml = l2l_maml.MAML
        note = (f"algorithms.maml loaded without the package __init__ ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:80]})")
    _L2L["maml"], _L2L["note"] = maml, note
    return maml, note


def _zero_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def make_naive(model, cfg, backward_per_task=False):
    """The per-task create_graph loop of research code. ``backward_per_task``: one backward
    per task (each task's graph freed before the next) -- the float64 reference of the
    ``err vs f64`` column, at the memory of one task."""
    k, lr, loss_fn = cfg["k"], cfg["lr"], loss_fn_of(cfg)
    call = functional_call

    def step(sx, sy, qx, qy):
        params = dict(model.named_parameters())
        T = sx.shape[0]
        total = 0.0
        for t in range(T):
            p = params
            for _ in range(k):
                inner = loss_fn(call(model, p, (sx[t],)), sy[t])
                grads = torch.autograd.grad(inner, list(p.values()), create_graph=True)
                p = {n: w - lr * g for (n, w), g in zip(p.items(), grads)}
            q = loss_fn(call(model, p, (qx[t],)), qy[t])
            if backward_per_task:
                (q / T).backward()
                q = q.detach()
            total = total + q
        loss = total / T
        if not backward_per_task:
            loss.backward()
        return loss.detach()

    return step


def make_reference(model, cfg):
    return make_naive(model, cfg, backward_per_task=True)


def make_higher(model, cfg):
    import higher

    k, lr, loss_fn = cfg["k"], cfg["lr"], loss_fn_of(cfg)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(sx, sy, qx, qy):
        T = sx.shape[0]
        total = 0.0
        for t in range(T):
            ctx = higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False)
            with ctx as (fmodel, diffopt):
                for _ in range(k):
                    diffopt.step(loss_fn(fmodel(sx[t]), sy[t]))
                q = loss_fn(fmodel(qx[t]), qy[t])
                (q / T).backward()
            total += q.detach()
        return total / T

    return step


def make_torchopt(model, cfg):
    import torchopt

    k, lr, loss_fn = cfg["k"], cfg["lr"], loss_fn_of(cfg)
    inner_opt = torchopt.MetaSGD(model, lr=lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")

    def step(sx, sy, qx, qy):
        T = sx.shape[0]
        total = 0.0
        try:
            for t in range(T):
                for _ in range(k):
                    inner_opt.step(loss_fn(model(sx[t]), sy[t]))
                q = loss_fn(model(qx[t]), qy[t])
                (q / T).backward()
                total += q.detach()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)
        finally:  # a failure mid-task must not leave the module holding non-leaf parameters
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return total / T

    return step


def make_vmap(model, cfg):
    k, lr, loss_fn = cfg["k"], cfg["lr"], loss_fn_of(cfg)
    buffers = dict(model.named_buffers())

    def step(sx, sy, qx, qy):
        params = dict(model.named_parameters())

        def compute_loss(p, x, y):
            return loss_fn(functional_call(model, (p, buffers), (x,)), y)

        def loss_for_task(x_spt, y_spt, x_qry, y_qry):
            p = params
            for _ in range(k):
                grads = grad(compute_loss)(p, x_spt, y_spt)
                p = {n: p[n] - lr * grads[n] for n in p}
            return compute_loss(p, x_qry, y_qry)

        loss = vmap(loss_for_task)(sx, sy, qx, qy).mean()
        loss.backward()
        return loss.detach()

    return step


def _clone_adapt(maml, cfg):
    k, loss_fn = cfg["k"], loss_fn_of(cfg)

    def step(sx, sy, qx, qy):
        T = sx.shape[0]
        total = 0.0
        for t in range(T):
            learner = maml.clone()
            for _ in range(k):
                learner.adapt(loss_fn(learner(sx[t]), sy[t]))
            q = loss_fn(learner(qx[t]), qy[t])
            (q / T).backward()
            total += q.detach()
        return total / T

    return step


def make_l2l(model, cfg):
    maml_cls, _note = import_l2l_maml()
    return _clone_adapt(maml_cls(model, lr=cfg["lr"], first_order=False), cfg)


def make_bmm(model, cfg):
    k, lr = cfg["k"], cfg["lr"]
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def forward(ps, x):
        h = x
        for i in range(len(linears)):
            w, b = ps[2 * i], ps[2 * i + 1]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(linears) - 1:
                h = torch.relu(h)
        return h

    def step(sx, sy, qx, qy):
        T = sx.shape[0]
        ps = []
        for lin in linears:
            ps += [lin.weight.expand(T, *lin.weight.shape), lin.bias.expand(T, *lin.bias.shape)]
        for _ in range(k):
            # sum over tasks of each task's mean loss: its gradient is every task's own gradient
            inner = ((forward(ps, sx) - sy) ** 2).mean((1, 2)).sum()
            grads = torch.autograd.grad(inner, ps, create_graph=True)
            ps = [p - lr * g for p, g in zip(ps, grads)]
        loss = ((forward(ps, qx) - qy) ** 2).mean((1, 2)).mean()
        loss.backward()
        return loss.detach()

    return step


def _fastmeta_maml(model, cfg):
    return fastmeta.MAML(model, cfg["lr"])


def make_fastmeta(model, cfg, chunk=None):
    maml = _fastmeta_maml(model, cfg)
    k, loss_fn = cfg["k"], loss_fn_of(cfg)

    def step(sx, sy, qx, qy):
        res = maml.meta_loss(sx, sy, qx, qy, steps=k, loss_fn=loss_fn, task_chunk=chunk)
        res.loss.backward()
        return res.loss.detach()

    return step


def make_fastmeta_chunk(model, cfg):
    return make_fastmeta(model, cfg, chunk=cfg["chunk"])


def make_fastmeta_clone_adapt(model, cfg):
    return _clone_adapt(_fastmeta_maml(model, cfg), cfg)


def make_fastmeta_cudagraph(model, cfg, example):
    """Capture zero-grad-free meta-step (forward + backward) once; every call copies the batch
    into the static inputs and replays. The gradients live in the graph's memory pool and are
    re-attached to ``.grad`` after each replay."""
    if example[0].device.type != "cuda":
        raise RuntimeError("CUDA graphs need --device cuda")
    maml = _fastmeta_maml(model, cfg)
    k, loss_fn = cfg["k"], loss_fn_of(cfg)
    static = [t.clone() for t in example]
    params = list(model.parameters())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _zero_grad(model)
            maml.meta_loss(*static, steps=k, loss_fn=loss_fn).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    _zero_grad(model)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = maml.meta_loss(*static, steps=k, loss_fn=loss_fn).loss
        static_loss.backward()
    static_grads = [p.grad for p in params]

    def step(sx, sy, qx, qy):
        for dst, src in zip(static, (sx, sy, qx, qy)):
            dst.copy_(src)
        graph.replay()
        for p, g in zip(params, static_grads):
            p.grad = g
        return static_loss.detach()

    step.keeps_grads = True  # the runner must not set .grad to None
    return step


MAKERS = {
    "reference": make_reference,
    "naive": make_naive,
    "higher": make_higher,
    "torchopt": make_torchopt,
    "vmap": make_vmap,
    "l2l": make_l2l,
    "bmm": make_bmm,
    "fastmeta": make_fastmeta,
    "fastmeta chunk": make_fastmeta_chunk,
    "fastmeta clone/adapt": make_fastmeta_clone_adapt,
}


def make_step(name: str, model: nn.Module, cfg: dict, example: tuple):
    if name == "fastmeta+cudagraph":
        return make_fastmeta_cudagraph(model, cfg, example)
    return MAKERS[name](model, cfg)


def run_step(step, model, batch):
    if not getattr(step, "keeps_grads", False):
        _zero_grad(model)
    return step(*batch)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                      .reshape(-1).to("cpu", torch.float64) for p in model.parameters()])


def availability(name: str, device: torch.device) -> str | None:
    """None if the row can run here, else why not."""
    try:
        if name == "higher":
            import higher  # noqa: F401
        elif name == "torchopt":
            import torchopt  # noqa: F401
        elif name == "l2l":
            import_l2l_maml()
        elif name == "fastmeta+cudagraph" and device.type != "cuda":
            return "CUDA only"
    except Exception as exc:  # noqa: BLE001
        return f"not installed ({C._first_line(exc)}; bash tools/install_peers.sh)"
    return None

