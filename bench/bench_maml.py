"""Benchmark a second-order MAML meta-step: fastmeta against the peers, side by side in one run.

A *meta-step* is: zero the gradients (set to None), the inner loop of ``k`` steps on every
task's support set, the query loss averaged over the ``T`` tasks, and the outer backward that
leaves the meta-gradient in ``.grad`` of the model's parameters. The optimizer step is excluded
for every row. Inner updates are plain SGD with a fixed learning rate, second order throughout.

Rows (each on its own deep copy of one model, so all start from the same parameters):

* ``naive``: per-task Python loop, ``torch.func.functional_call`` +
  ``torch.autograd.grad(create_graph=True)``, ``p - lr * g``; one backward of the mean query
  loss after the loop (every task's graph is alive at once);
* ``higher``: ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)`` per task,
  ``diffopt.step(loss)``, query loss / T backward per task (higher's MAML example);
* ``torchopt``: ``torchopt.MetaSGD(model, lr)`` per task with ``extract_state_dict`` /
  ``recover_state_dict`` and a backward per task (TorchOpt's MAML Omniglot example);
* ``vmap``: ``torch.func.vmap`` over tasks of a functional inner loop with ``torch.func.grad``
  (the functorch MAML Omniglot example), one backward of the mean;
* ``l2l``: ``learn2learn.algorithms.MAML``: ``clone()`` / ``adapt(loss)`` per task, backward per
  task (its examples);
* ``bmm`` (MLP only): a hand-written task-batched MLP (``baddbmm`` on ``[T, ...]`` weights) with
  ``autograd.grad(create_graph=True)``: what one writes by hand without fastmeta;
* ``fastmeta``: ``fastmeta.MAML(model, lr).meta_loss(sx, sy, qx, qy, steps=k, loss_fn)`` then
  ``.loss.backward()``; ``fastmeta chunk=c``: the same with ``task_chunk=c`` (bounded memory);
  ``fastmeta clone/adapt``: fastmeta's learn2learn-compatible API per task (sinusoid only);
  ``fastmeta+cudagraph`` (CUDA only): the fastmeta meta-step captured once in a CUDA graph and
  replayed (inputs copied into static buffers inside the timed region).

Configs: ``sinusoid-k1`` / ``sinusoid-k5``: MLP 1-40-40-1 (ReLU), T=25 tasks, K=10 support and
10 query points, MSE, inner lr 0.01. ``conv4-k1`` / ``conv4-k5`` / ``conv4-k10``: MAML's Conv4
(4 x [conv3x3-64, BatchNorm (batch statistics, as in MAML), ReLU, maxpool 2], Linear to 5) on
28x28 5-way 1-shot with 15 queries per class, T=32, cross-entropy, inner lr 0.4; k = 1, 5, 10
is the memory curve. ``--quick`` runs every config at smaller T / width (labelled in the rows).

Method:

* **Correct first.** Before anything is timed, every row's meta-gradient (and meta-loss) is
  compared with ``naive`` in float64 on a tiny version of each model (MLP 1-8-8-1, T=3, k=2;
  Conv4 width 4, T=2, k=2): relative error above 1e-9 fails the gate. A fastmeta row that
  fails is not timed and the script exits 1 after printing everything; a peer that fails (an
  upstream bug: ``torch.func`` vmap + grad through BatchNorm, see below) is reported loudly and
  still timed, its row marked ``[WRONG grads]``. At full size every row's float32
  meta-gradient is compared with a float64 reference of the same config (naive loop, backward
  per task, same inputs): column ``err vs f64`` (informational: second-order MAML with lr 0.4
  amplifies float32 rounding with k; the autograd peers share one rounding pattern).
* **Each (row, config) runs in a fresh subprocess** (``--threads`` threads): imports, model and
  data, then the same row on a width-2 one-task copy of the model (lazy initialisation of the
  autograd engine, functorch, oneDNN, fastmeta's caches, at negligible memory); then the
  kernel's peak-RSS mark is reset to the current RSS (``/proc/self/clear_refs``), one full
  meta-step runs (``cold ms``) and ``peak RSS`` = ``VmHWM`` - the RSS before it: what the
  meta-step itself took (the issue's numbers are RSS). On CUDA, ``peak MB`` is
  ``torch.cuda.max_memory_allocated()`` over the step instead. Then ``--reps`` timed
  meta-steps: ``time.perf_counter`` on the CPU, CUDA events on the GPU; median and p20/p80.
  With ``--threads 1`` on a CPU the medians are process CPU time (``--clock auto``): on a
  shared machine other processes stretch wall time, not the CPU time a single-threaded step
  consumes; the other clock's median is its own column.
* Speedup ``x B`` = median of row B / median of this row.
* The 1-minute load average is recorded before and after every row: on a shared CPU a busy
  neighbour inflates times (compare p20/p80).

Known upstream mismatch: ``torch.func`` (torch 2.13) gets the second-order meta-gradient of
the functorch MAML example wrong when the model has training-mode BatchNorm: on the tiny Conv4
the meta-gradient differs from the naive loop (and from higher, TorchOpt, learn2learn and
fastmeta, which agree to 1e-16) by 1.8e-2 relative, in float64. Each piece checks out alone
(vmap of grad, vmap of HVPs with batched vectors, first-order grads with batched BatchNorm
weights); ``grad`` (or autograd) over ``vmap`` over ``grad`` through ``batch_norm`` does not.
Without BatchNorm (the MLP) vmap agrees to 1e-16. Its Conv4 rows are timed (its users pay that
cost) and marked ``[WRONG grads]``. ``bench/vmap_batchnorm_repro.py`` reproduces it in 20 lines
(Linear -> batch_norm -> tanh: the gradient of the weight before the norm is off by 33%).
Upstream this is pytorch/functorch issue #534 ("layer_norm and batch_norm backward batching
rule is incorrect for grad_input", open since 2022, found while porting this very example).

Script::

    python bench/bench_maml.py [--quick] [--configs sinusoid-k1,sinusoid-k5,conv4-k5,...]
        [--impls naive,higher,...] [--threads N] [--reps N] [--device cpu|cuda]
        [--time-limit S] [--results-dir DIR] [--no-save] [--gate-only]

prints one table per config, then the issue's targets marked hit/miss, and appends JSON rows
to ``bench/results/maml-<device>.jsonl``. Peers come from ``bash tools/install_peers.sh``
(``make peers``); a missing peer's row says "skipped: not installed".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402

STEM = "maml"
CHILD_MARK = "@@BENCH_MAML_CHILD@@"

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    "sinusoid-k1": dict(model="mlp", hidden=40, T=25, S=10, Q=10, k=1, lr=0.01),
    "sinusoid-k5": dict(model="mlp", hidden=40, T=25, S=10, Q=10, k=5, lr=0.01),
    "conv4-k5": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=5, lr=0.4,
                     image=28, chunk=8),
    "conv4-k1": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=1, lr=0.4,
                     image=28, chunk=8),
    "conv4-k10": dict(model="conv4", hidden=64, T=32, n_way=5, shot=1, query=15, k=10, lr=0.4,
                      image=28, chunk=8),
}
# --quick: same models and k, smaller meta-batches / width (a smoke run, minutes on 2 cores).
QUICK = {
    "sinusoid-k1": dict(T=25),
    "sinusoid-k5": dict(T=25),
    "conv4-k5": dict(T=4, hidden=16, query=3, chunk=2),
    "conv4-k1": dict(T=4, hidden=16, query=3, chunk=2),
    "conv4-k10": dict(T=4, hidden=16, query=3, chunk=2),
}
# The float64 correctness gate: a tiny version of each model.
GATE = {
    "mlp": dict(model="mlp", hidden=8, T=3, S=4, Q=4, k=2, lr=0.1),
    "conv4": dict(model="conv4", hidden=4, T=2, n_way=5, shot=1, query=2, k=2, lr=0.4, image=28,
                  chunk=1),
}

SEQUENTIAL = ["naive", "higher", "torchopt", "l2l"]
PEERS = ["naive", "higher", "torchopt", "vmap", "l2l", "bmm"]
FASTMETA = ["fastmeta", "fastmeta chunk", "fastmeta clone/adapt", "fastmeta+cudagraph"]
ALL_IMPLS = PEERS + FASTMETA


def config_of(name: str, quick: bool) -> dict:
    cfg = dict(CONFIGS[name])
    if quick:
        cfg.update(QUICK[name])
    return cfg


def impls_for(cfg: dict, device: torch.device) -> list[str]:
    names = ["naive", "higher", "torchopt", "vmap", "l2l"]
    if cfg["model"] == "mlp":
        names.append("bmm")
    names.append("fastmeta")
    if cfg["model"] == "conv4" and cfg.get("chunk") and cfg["chunk"] < cfg["T"]:
        names.append("fastmeta chunk")
    if cfg["model"] == "mlp":
        names.append("fastmeta clone/adapt")
    if device.type == "cuda":
        names.append("fastmeta+cudagraph")
    return names


def impl_label(name: str, cfg: dict) -> str:
    return f"fastmeta chunk={cfg['chunk']}" if name == "fastmeta chunk" else name


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------


def build_model(cfg: dict, seed: int = 0) -> nn.Module:
    """A plain nn.Sequential: every row gets a deep copy of the same one."""
    torch.manual_seed(seed)
    h = cfg["hidden"]
    if cfg["model"] == "mlp":
        return nn.Sequential(nn.Linear(1, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, 1))
    layers: list[nn.Module] = []
    cin, size = 1, cfg["image"]
    for _ in range(4):
        # MAML's BatchNorm uses the batch statistics of each forward (transductive), as the
        # functorch MAML example's track_running_stats=False does.
        layers += [nn.Conv2d(cin, h, 3, padding=1), nn.BatchNorm2d(h, track_running_stats=False),
                   nn.ReLU(), nn.MaxPool2d(2)]
        cin, size = h, size // 2
    layers += [nn.Flatten(), nn.Linear(h * size * size, cfg["n_way"])]
    return nn.Sequential(*layers)


def loss_fn_of(cfg: dict):
    return F.mse_loss if cfg["model"] == "mlp" else F.cross_entropy


def make_batch(cfg: dict, seed: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(support_x, support_y, query_x, query_y), every tensor [T, ...]."""
    g = torch.Generator().manual_seed(seed)
    T = cfg["T"]
    if cfg["model"] == "mlp":
        amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=g)
        phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=g)
        sx = torch.empty(T, cfg["S"], 1).uniform_(-5.0, 5.0, generator=g)
        qx = torch.empty(T, cfg["Q"], 1).uniform_(-5.0, 5.0, generator=g)
        sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
        return tuple(t.to(device, dtype) for t in (sx, sy, qx, qy))
    n, shot, q, size = cfg["n_way"], cfg["shot"], cfg["query"], cfg["image"]
    protos = torch.randn(T, n, 1, size, size, generator=g)
    sy = torch.arange(n).repeat(shot).expand(T, n * shot).contiguous()
    qy = torch.stack([torch.arange(n).repeat_interleave(q)[torch.randperm(n * q, generator=g)]
                      for _ in range(T)])

    def images(labels):
        own = protos[torch.arange(T)[:, None], labels]
        return own + 0.8 * torch.randn(own.shape, generator=g)

    sx, qx = images(sy), images(qy)
    return (sx.to(device, dtype), sy.to(device), qx.to(device, dtype), qy.to(device))


def param_count(cfg: dict) -> int:
    return sum(p.numel() for p in build_model(cfg).parameters())


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------


def peer_versions() -> dict:
    import importlib.metadata as md

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
    import importlib.util
    import types

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
    call = torch.func.functional_call

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
    from torch.func import functional_call, grad, vmap

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
    import fastmeta

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


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


def availability(name: str, device: torch.device) -> str | None:
    """None if the row can run here, else why not."""
    try:
        if name == "higher":
            import higher  # noqa: F401
        elif name == "torchopt":
            import torchopt  # noqa: F401
        elif name == "l2l":
            import_l2l_maml()
        elif name.startswith("fastmeta"):
            import fastmeta

            if not hasattr(fastmeta, "MAML"):
                return "fastmeta.MAML not there yet"
            if name == "fastmeta+cudagraph" and device.type != "cuda":
                return "CUDA only"
    except Exception as exc:  # noqa: BLE001
        return f"not installed ({_first_line(exc)}; bash tools/install_peers.sh)"
    return None


# ---------------------------------------------------------------------------------------------
# correctness gate (float64, tiny models, in this process)
# ---------------------------------------------------------------------------------------------


def run_gate(device: torch.device, names: list[str], log=print) -> dict:
    """{model: {impl: (status, rel_err, message)}}; status "ok" | "WRONG" | "failed" |
    "skipped". Every row's meta-gradient and meta-loss vs ``naive`` in float64."""
    out: dict = {}
    for model_kind, cfg in GATE.items():
        rows = {}
        base = build_model(cfg).to(device, torch.float64)
        batch = make_batch(cfg, seed=11, dtype=torch.float64, device=device)
        ref_model = copy.deepcopy(base)
        ref_loss = run_step(make_naive(ref_model, cfg), ref_model, batch)
        ref_grad = flat_grads(ref_model)
        rest = [n for n in impls_for(cfg, device) if n in names and n != "naive"]
        for name in ["reference", *rest]:
            why = availability(name, device)
            if why:
                rows[name] = ("skipped", None, why)
                continue
            model = copy.deepcopy(base)
            try:
                step = make_step(name, model, cfg, batch)
                loss = run_step(step, model, batch)
                grad = flat_grads(model)
                # the l2l/higher rows accumulate per task: compare after the step, then once more
                # to be sure a second call gives the same (no state left behind)
                loss2 = run_step(step, model, batch)
                grad2 = flat_grads(model)
            except Exception as exc:  # noqa: BLE001
                rows[name] = ("failed", None, _first_line(exc))
                continue
            errs = [C._rel_err(grad, ref_grad), C._rel_err(grad2, ref_grad),
                    C._rel_err(loss.reshape(1), ref_loss.reshape(1)),
                    C._rel_err(loss2.reshape(1), ref_loss.reshape(1))]
            err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
            status = "ok" if err <= 1e-9 else "WRONG"
            rows[name] = (status, err, "" if status == "ok" else
                          f"meta-gradient rel err {err:.3g} vs naive in float64 > 1e-9")
            log(f"gate {model_kind:5s} {name:22s} {status:6s} rel err {err:.2e}")
        out[model_kind] = rows
    return out


# ---------------------------------------------------------------------------------------------
# one (row, config) in a fresh process
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (``/proc/self/clear_refs``, Linux >=
    4.0) and return the current RSS in bytes. Where that is not possible, return the peak so
    far (``ru_maxrss``): the step's growth is then measured above everything before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _status_kb("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def peak_rss() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_main(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = C.parse_dtype(spec["dtype"])
    cfg, name = spec["cfg"], spec["impl"]
    # built (and the inputs drawn) in float32: a float64 run sees the same values
    model = build_model(cfg).to(device, dtype)
    in_dtype = C.parse_dtype(spec.get("inputs_dtype") or spec["dtype"])
    batch = make_batch(cfg, seed=spec["seed"], dtype=in_dtype, device=device)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    is_cuda = device.type == "cuda"
    if name != "fastmeta+cudagraph":
        # The same row on a tiny copy of the model (width 2, one task): lazy initialisation
        # (autograd engine, functorch, oneDNN, fastmeta's caches) happens here, at negligible
        # memory, so it stays out of the peak. Not a step on the real batch: its freed memory
        # would stay in the allocator's free lists and hide the real step's growth.
        tiny = dict(cfg, T=1, hidden=2)
        if cfg["model"] == "conv4":
            tiny.update(query=1, chunk=1)
        tiny_model = build_model(tiny).to(device, dtype)
        run_step(make_step(name, tiny_model, tiny, ()), tiny_model,
                 make_batch(tiny, seed=2, dtype=dtype, device=device))
        del tiny_model
    step = make_step(name, model, cfg, batch)
    C.synchronize(device)
    gc.collect()
    rss0 = reset_peak_rss()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        alloc0 = torch.cuda.memory_allocated(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = run_step(step, model, batch)
    C.synchronize(device)
    cold_ms = (time.perf_counter() - t0) * 1e3
    cold_cpu_ms = (time.process_time() - c0) * 1e3
    rss1 = peak_rss()
    cuda_peak = (torch.cuda.max_memory_allocated(device) - alloc0) if is_cuda else None
    grads = flat_grads(model)
    if spec.get("grads_path"):
        torch.save(grads, spec["grads_path"])
    times, cpu_times = [], []
    gc.collect()
    gc.disable()
    for _ in range(spec["reps"]):
        if is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run_step(step, model, batch)
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            run_step(step, model, batch)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
    gc.enable()
    return dict(status="ok", cold_ms=cold_ms, times_ms=times, cold_cpu_ms=cold_cpu_ms,
                cpu_times_ms=cpu_times, rss_base_mb=rss0 / 2**20,
                rss_peak_mb=(rss1 - rss0) / 2**20, rss_max_mb=rss1 / 2**20,
                cuda_peak_mb=(cuda_peak / 2**20 if cuda_peak is not None else None),
                loss=float(loss), threads=torch.get_num_threads())


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="failed", message=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    why = tail[-1][:240] if tail else "no output"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (out of memory?); {why}"
    return dict(status="failed", message=f"rc {proc.returncode}: {why}")


# ---------------------------------------------------------------------------------------------
# rows, table, targets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    config: str
    cfg: dict
    impl: str
    baseline: bool
    status: str
    message: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    n: int = 0
    cold_ms: float | None = None
    rss_peak_mb: float | None = None
    rss_base_mb: float | None = None
    cuda_peak_mb: float | None = None
    err_f64: float | None = None  # float32 meta-gradient vs the float64 reference
    gate_err: float | None = None
    load_before: float | None = None
    load_after: float | None = None
    speedups: dict = dataclasses.field(default_factory=dict)
    wrong: bool = False  # a peer that failed the correctness gate, timed anyway
    clock: str = "wall"  # what median/p20/p80/cold measure: "wall" (perf_counter/CUDA events)
    # or "cpu" (process CPU time: with 1 thread, immune to other processes on a shared CPU)
    other_median_ms: float | None = None  # the median on the other clock

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_ms is not None

    @property
    def label(self) -> str:
        return impl_label(self.impl, self.cfg) + (" [WRONG grads]" if self.wrong else "")

    @property
    def peak_mb(self) -> float | None:
        return self.cuda_peak_mb if self.cuda_peak_mb is not None else self.rss_peak_mb


def fill_speedups(rows: list[Row]) -> None:
    base = {r.impl: r.median_ms for r in rows if r.baseline and r.ok}
    for r in rows:
        r.speedups = {b: (m / r.median_ms if r.ok else None) for b, m in base.items()}


def print_table(config: str, rows: list[Row], device: torch.device, threads: int) -> str:
    cfg = rows[0].cfg
    shape = " ".join(f"{k}={v}" for k, v in cfg.items())
    bases = [r.impl for r in rows if r.baseline and r.ok]
    mem = "peak MB (cuda)" if device.type == "cuda" else "peak RSS MB"
    clock = rows[0].clock
    other = "wall ms" if clock == "cpu" else "cpu ms"
    header = ["impl", f"{clock} ms", "p20", "p80", *[f"x {b}" for b in bases], mem, "cold ms",
              other, "err vs f64", "n"]
    body, notes = [], []
    for r in rows:
        if r.ok:
            body.append([r.label, C._fmt_ms(r.median_ms), C._fmt_ms(r.p20_ms), C._fmt_ms(r.p80_ms),
                         *[C._fmt(r.speedups.get(b), ".2f") for b in bases],
                         C._fmt(r.peak_mb, ".1f"), C._fmt_ms(r.cold_ms),
                         C._fmt_ms(r.other_median_ms),
                         C._fmt(r.err_f64, ".1e"), str(r.n)])
            if r.message:
                notes.append(f"  {r.label}: {r.message}")
        else:
            body.append([r.label, r.status.upper(), *[""] * (len(header) - 2)])
            notes.append(f"  {r.label}: {r.status}: {r.message}")
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    loads = [x for r in rows for x in (r.load_before, r.load_after) if x is not None]
    load = f"load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    out = [f"\n== maml meta-step | {config}: {shape} | {device.type} {threads} threads | "
           f"{clock} time | {load} ==",
           line(header), "  ".join("-" * w for w in widths), *map(line, body), *notes]
    text = "\n".join(out)
    print(text, flush=True)
    return text


@dataclasses.dataclass
class Target:
    name: str
    status: str  # "hit" | "miss" | "n/a" | "info"
    detail: str


def _get(rows_by_cfg: dict, config: str, impl: str) -> Row | None:
    for r in rows_by_cfg.get(config, []):
        if r.impl == impl and r.ok:
            return r
    return None


def evaluate_targets(rows_by_cfg: dict, device: torch.device, quick: bool,
                     hvp: dict | None) -> list[Target]:
    out: list[Target] = []

    def ratio_target(name, config, impl, peer, need):
        a, b = _get(rows_by_cfg, config, impl), _get(rows_by_cfg, config, peer)
        if a is None or b is None:
            miss = impl if a is None else peer
            out.append(Target(name, "n/a", f"{miss} row missing in {config}"))
            return
        x = b.median_ms / a.median_ms
        out.append(Target(name, "hit" if x >= need else "miss",
                          f"{impl} {a.median_ms:.1f} ms vs {peer} {b.median_ms:.1f} ms: {x:.2f}x "
                          f"(need >= {need}x)"))

    gpu = device.type == "cuda"
    seq_need, vmap_need = (10, 2) if gpu else (None, 2)
    for config in ("sinusoid-k5", "sinusoid-k1"):
        if config not in rows_by_cfg:
            continue
        for peer in ("higher", "naive"):
            ratio_target(f"{config}: fastmeta >= 10x {peer}", config, "fastmeta", peer, 10)
        ratio_target(f"{config}: fastmeta >= 2x vmap", config, "fastmeta", "vmap", vmap_need)
    for config in ("conv4-k5",) + (("conv4-k1", "conv4-k10") if gpu else ()):
        if config not in rows_by_cfg:
            continue
        seq = [r for r in (_get(rows_by_cfg, config, p) for p in SEQUENTIAL) if r is not None]
        fm = _get(rows_by_cfg, config, "fastmeta")
        need = seq_need or 1.5
        if fm and seq:
            best = min(seq, key=lambda r: r.median_ms)
            x = best.median_ms / fm.median_ms
            out.append(Target(f"{config}: fastmeta >= {need}x fastest sequential peer",
                              "hit" if x >= need else "miss",
                              f"fastmeta {fm.median_ms:.0f} ms vs {best.impl} "
                              f"{best.median_ms:.0f} ms: "
                              f"{x:.2f}x"))
        else:
            out.append(Target(f"{config}: fastmeta >= {need}x fastest sequential peer", "n/a",
                              "rows missing"))
        ratio_target(f"{config}: fastmeta >= 2x vmap", config, "fastmeta", "vmap", 2)
    # memory flat in k
    m1, m10 = _get(rows_by_cfg, "conv4-k1", "fastmeta"), _get(rows_by_cfg, "conv4-k10", "fastmeta")
    if m1 and m10 and m1.peak_mb is not None and m10.peak_mb is not None:
        cfg = m10.cfg
        iterates_mb = 9 * cfg["T"] * param_count(cfg) * 4 / 2**20
        slack = 16.0  # RSS granularity / allocator noise
        grow = m10.peak_mb - m1.peak_mb
        out.append(Target("conv4: fastmeta memory flat in k (k=1 -> 10 grows <= 9 param iterates)",
                          "hit" if grow <= iterates_mb + slack else "miss",
                          f"{m1.peak_mb:.0f} -> {m10.peak_mb:.0f} MB (+{grow:.0f}); 9 iterates of "
                          f"T x params = {iterates_mb:.0f} MB (+{slack:.0f} MB slack)"))
        for peer in ("vmap", "naive"):
            p = _get(rows_by_cfg, "conv4-k10", peer)
            if p is None or p.peak_mb is None:
                out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}", "n/a",
                                  f"{peer} row missing"))
                continue
            if p.peak_mb < 1.0:
                out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}", "n/a",
                                  f"{peer}'s peak {p.peak_mb:.1f} MB is below RSS resolution"))
                continue
            x = m10.peak_mb / p.peak_mb
            out.append(Target(f"conv4-k10: fastmeta memory <= 0.5x {peer}",
                              "hit" if x <= 0.5 else "miss",
                              f"{m10.peak_mb:.0f} MB vs {p.peak_mb:.0f} MB: {x:.2f}x"))
    else:
        out.append(Target("conv4: fastmeta memory flat in k", "n/a", "conv4-k1/k10 rows missing"))
    # task_chunk
    for config in ("conv4-k5", "conv4-k10"):
        ch, hi = _get(rows_by_cfg, config, "fastmeta chunk"), _get(rows_by_cfg, config, "higher")
        if ch is None or hi is None:
            continue
        if ch.peak_mb is not None and hi.peak_mb is not None and hi.peak_mb >= 1.0:
            x = ch.peak_mb / hi.peak_mb
            out.append(Target(f"{config}: task_chunk memory <= 1.5x higher",
                              "hit" if x <= 1.5 else "miss",
                              f"{ch.label} {ch.peak_mb:.0f} MB vs higher {hi.peak_mb:.0f} MB: "
                              f"{x:.2f}x"))
        out.append(Target(f"{config}: task_chunk faster than higher",
                          "hit" if ch.median_ms < hi.median_ms else "miss",
                          f"{ch.median_ms:.0f} ms vs {hi.median_ms:.0f} ms"))
    for config, rows in rows_by_cfg.items():  # what capturing the meta-step adds (CUDA)
        g = _get(rows_by_cfg, config, "fastmeta+cudagraph")
        e = _get(rows_by_cfg, config, "fastmeta")
        if g is not None and e is not None:
            out.append(Target(f"{config}: CUDA graph of the fastmeta meta-step", "info",
                              f"{g.median_ms:.2f} ms replayed vs {e.median_ms:.2f} ms eager: "
                              f"{e.median_ms / g.median_ms:.2f}x"))
    if hvp:
        if hvp.get("status") == "ok":
            x = hvp["reference_ms"] / hvp["fastmeta_ms"]
            out.append(Target("TaskMLP batched HVP >= 2x double backward",
                              "hit" if x >= 2 else "miss",
                              f"task_hvp[{hvp['backend']}] {hvp['fastmeta_ms']:.2f} ms vs double "
                              f"backward {hvp['reference_ms']:.2f} ms: {x:.2f}x (rel err "
                              f"{hvp['err']:.1e})"))
        else:
            out.append(Target("TaskMLP batched HVP >= 2x double backward", "n/a",
                              hvp.get("message", "")))
    if quick:  # a target read off a reduced config says so
        reduced = [c for c in CONFIGS if config_of(c, True) != CONFIGS[c]]
        for t in out:
            if any(t.name.startswith(c) or t.name.startswith(c.split("-")[0] + ":")
                   for c in reduced):
                t.detail += " [--quick shapes: not the issue's config]"
    return out


def print_targets(targets: list[Target]) -> None:
    print("\n== targets (issue 4) ==", flush=True)
    for t in targets:
        print(f"  [{t.status.upper():4s}] {t.name}: {t.detail}", flush=True)


# ---------------------------------------------------------------------------------------------
# batched HVP vs double backward (TaskMLP, sinusoid size), in this process
# ---------------------------------------------------------------------------------------------


def bench_hvp(device: torch.device, reps: int) -> dict:
    try:
        from fastmeta.func import task_function
        from fastmeta.nn import TaskMLP
        from fastmeta.ops import task_hvp
    except Exception as exc:  # noqa: BLE001
        return dict(status="skipped",
                    message=f"fastmeta task_hvp/TaskMLP not there: {_first_line(exc)}")
    try:
        torch.manual_seed(0)
        model = TaskMLP([1, 40, 40, 1]).to(device)
        fn = task_function(model)
        cfg = dict(CONFIGS["sinusoid-k5"])
        sx, sy, _qx, _qy = make_batch(cfg, 3, torch.float32, device)
        T = cfg["T"]
        params = {n: p.detach().clone() for n, p in fn.expand(T).items()}
        g = torch.Generator().manual_seed(5)
        v = {n: torch.randn(p.shape, generator=g).to(device) for n, p in params.items()}
        fast = task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss)
        ref = task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss, backend="reference")
        err = max(C._rel_err(fast[n], ref[n]) for n in ref)
        backend = "auto"
        t_fast = C.time_fn(lambda: task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss),
                           device=device, budget_s=0.5, min_reps=reps)
        t_ref = C.time_fn(lambda: task_hvp(fn, params, sx, sy, v, loss_fn=F.mse_loss,
                                           backend="reference"),
                          device=device, budget_s=0.5, min_reps=reps)
        return dict(status="ok", backend=backend, fastmeta_ms=t_fast["median_ms"],
                    reference_ms=t_ref["median_ms"], err=err, T=T)
    except Exception as exc:  # noqa: BLE001
        return dict(status="failed", message=_first_line(exc))


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def save_rows(rows: list[Row], targets: list[Target], hvp: dict | None, device: torch.device,
              results_dir, extra: dict) -> Path:
    info = C.env_info(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    folder = Path(results_dir) if results_dir is not None else C.RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{STEM}-{info['device_slug']}.jsonl"
    with open(path, "a") as f:
        for r in rows:
            row = dict(timestamp=stamp, bench=STEM, kind="meta-step", config=r.config,
                       params=r.cfg, impl=r.label, baseline=r.baseline, status=r.status,
                       message=r.message, median_ms=r.median_ms, p20_ms=r.p20_ms,
                       p80_ms=r.p80_ms, n=r.n, cold_ms=r.cold_ms, clock=r.clock,
                       other_clock_median_ms=r.other_median_ms, rss_peak_mb=r.rss_peak_mb,
                       rss_base_mb=r.rss_base_mb, cuda_peak_mb=r.cuda_peak_mb,
                       err_vs_f64=r.err_f64, gate_err_f64=r.gate_err,
                       load_before=r.load_before, load_after=r.load_after,
                       speedup_vs=r.speedups, **info, **extra)
            f.write(json.dumps(row, default=str) + "\n")
        if hvp is not None:
            f.write(json.dumps(dict(timestamp=stamp, bench=STEM, kind="hvp", **hvp, **info,
                                    **extra),
                               default=str) + "\n")
        for t in targets:
            f.write(json.dumps(dict(timestamp=stamp, bench=STEM, kind="target", target=t.name,
                                    status=t.status, detail=t.detail, **info, **extra),
                               default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _split(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--impls", default=None, help=f"comma list of {', '.join(ALL_IMPLS)}")
    ap.add_argument("--curve-impls", default=None,
                    help="rows of the memory-curve configs conv4-k1/conv4-k10 (default: --impls)")
    ap.add_argument("--quick", action="store_true", help="small meta-batches/width, few reps")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every process")
    ap.add_argument("--reps", default=None,
                    help="timed meta-steps per row after the cold one: N for every config, or "
                         "CONFIG=N,... (default: 5 sinusoid, 2 conv4-k5, 2 conv4-k1, 1 conv4-k10; "
                         "--quick: 3). 0: the median is the cold step")
    ap.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                    help="what the medians measure: wall time, or process CPU time (auto: CPU "
                         "time on a CPU with --threads 1, where other processes' load would "
                         "otherwise inflate wall times; wall time otherwise)")
    ap.add_argument("--f64-ref", choices=("auto", "on", "off"), default="auto",
                    help="float64 reference run per config for the 'err vs f64' column (auto: "
                         "sinusoid, --quick and CUDA; a full-size Conv4 one costs ~2 naive steps)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new row after this many seconds (rows say 'skipped')")
    ap.add_argument("--child-timeout", type=float, default=900)
    ap.add_argument("--gate-only", action="store_true", help="only the float64 correctness gate")
    ap.add_argument("--no-hvp", action="store_true", help="skip the batched HVP row")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child is not None:
        spec = json.loads(args._child)
        try:
            res = child_main(spec)
        except Exception as exc:  # noqa: BLE001
            res = dict(status="failed", message=_first_line(exc))
        print(CHILD_MARK + json.dumps(res), flush=True)
        return 0

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = C.resolve_device(args.device)
    configs = _split(args.configs)
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    reps_of: dict[str, int] = {}
    for item in _split(args.reps):
        cfg_name, _, n = item.rpartition("=")
        for c in ([cfg_name] if cfg_name else list(CONFIGS)):
            if c not in CONFIGS:
                raise SystemExit(f"--reps: unknown config {c!r}")
            reps_of[c] = int(n)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    if clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time; use --clock wall on CUDA")
    wanted = _split(args.impls) or ALL_IMPLS
    for w in wanted:
        if w not in ALL_IMPLS:
            raise SystemExit(f"unknown impl {w!r}; choose from {', '.join(ALL_IMPLS)}")
    if "naive" not in wanted:
        wanted = ["naive", *wanted]  # the reference of every check
    curve_wanted = _split(args.curve_impls) or wanted
    for w in curve_wanted:
        if w not in ALL_IMPLS:
            raise SystemExit(f"unknown impl {w!r}; choose from {', '.join(ALL_IMPLS)}")
    warn = C.busy_warning()
    if warn:
        print(warn, flush=True)
    versions = peer_versions()
    print(f"device: {C.device_name(device)}; torch {torch.__version__}; peers {versions}; "
          f"load {_load()}", flush=True)
    l2l_note = ""
    try:
        l2l_note = import_l2l_maml()[1]
    except Exception:  # noqa: BLE001
        pass
    if l2l_note:
        print(f"learn2learn: {l2l_note}", flush=True)

    # 1. correctness gate
    print("\n== correctness gate: meta-gradient vs naive, float64, tiny models ==", flush=True)
    gate = run_gate(device, wanted, log=lambda m: print("  " + m, flush=True))
    for model_kind, rows in gate.items():
        for name, (status, err, msg) in rows.items():
            if status != "ok":
                print(f"  gate {model_kind:5s} {name:22s} {status}: {msg}", flush=True)
    gate_bad = [(m, n, s) for m, rows in gate.items() for n, (s, _e, _m) in rows.items()
                if s in ("WRONG", "failed") and n not in PEERS]
    peer_bad = [(m, n, s) for m, rows in gate.items() for n, (s, _e, _m) in rows.items()
                if s in ("WRONG", "failed") and n in PEERS]
    if gate_bad:
        print("\n!!! CORRECTNESS GATE FAILED: "
              + "; ".join(f"{n} on {m}: {s}" for m, n, s in gate_bad)
              + " -- these rows are not timed; exit status 1 !!!", flush=True)
    if peer_bad:
        print("\n!!! PEER MISMATCH: " + "; ".join(f"{n} on {m}: {s}" for m, n, s in peer_bad)
              + " -- a peer's meta-gradient differs from the naive loop (an upstream bug; a "
              "WRONG peer row is still timed and marked [WRONG grads]) !!!", flush=True)
    if args.gate_only:
        return 1 if gate_bad else 0

    # 2. the rows, each in a fresh process
    extra = dict(quick=args.quick, peers=versions, l2l_note=l2l_note, dtype=args.dtype,
                 load_start=_load(), argv=sys.argv[1:] if argv is None else argv,
                 run_started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    rows_by_cfg: dict[str, list[Row]] = {}
    all_rows: list[Row] = []
    saved = None
    tmp = tempfile.mkdtemp(prefix="bench_maml_")
    for config in configs:
        cfg = config_of(config, args.quick)
        if config in reps_of:
            reps = reps_of[config]
        elif args.quick:
            reps = 3
        else:
            reps = {"conv4-k5": 2, "conv4-k1": 2, "conv4-k10": 1}.get(config, 5)
        here = curve_wanted if config in ("conv4-k1", "conv4-k10") else wanted
        names = [n for n in impls_for(cfg, device) if n in here]
        rows: list[Row] = []
        ref_grad, ref_msg = None, ""
        want_ref = (args.f64_ref == "on" or (args.f64_ref == "auto" and (
            args.quick or cfg["model"] == "mlp" or device.type == "cuda")))
        if not want_ref:
            ref_msg = "no float64 reference (--f64-ref)"
        elif args.dtype != "float64" and not (args.time_limit is not None
                                              and time.perf_counter() - t_start > args.time_limit):
            # the float64 reference of this config (same inputs, rounded to float32 first)
            gpath = os.path.join(tmp, f"{config}-reference.pt")
            print(f"... {config} float64 reference", file=sys.stderr, flush=True)
            res = run_child(dict(cfg=cfg, impl="reference", device=str(device), dtype="float64",
                                 seed=1, threads=args.threads, reps=0, grads_path=gpath,
                                 inputs_dtype=args.dtype), args.child_timeout)
            if res.get("status") == "ok":
                ref_grad = torch.load(gpath)
            else:
                ref_msg = f"float64 reference failed: {res.get('message')}"
                print(ref_msg, flush=True)
        for name in names:
            row = Row(config, cfg, name, baseline=name in PEERS, status="skipped")
            rows.append(row)
            gate_row = gate[cfg["model"]].get(name)
            if gate_row is not None:
                row.gate_err = gate_row[1]
            why = availability(name, device)
            if why:
                row.message = why
                continue
            flagged = ""
            if gate_row is not None and gate_row[0] in ("WRONG", "failed"):
                if not (gate_row[0] == "WRONG" and name in PEERS):
                    row.status, row.message = gate_row[0], f"correctness gate: {gate_row[2]}"
                    continue
                # A peer whose meta-gradient is wrong (an upstream bug) is still timed: its
                # cost is what its users pay. The row says so in its name and message.
                flagged = f"WRONG meta-gradient (correctness gate: {gate_row[2]}); timed anyway"
            if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                row.message = "--time-limit reached"
                continue
            # a k=10 row whose memory, extrapolated from its smaller-k rows, would not fit
            est = _estimate_mb(rows_by_cfg, config, cfg, name)
            free = C.mem_available_bytes(device)
            if est is not None and free is not None and est * 2**20 > 0.7 * free:
                row.message = (f"needs ~{est / 1024:.1f} GiB (extrapolated from smaller k), "
                               f"{free / 2**30:.1f} GiB free")
                continue
            gpath = os.path.join(tmp, f"{config}-{name.replace(' ', '_').replace('/', '_')}.pt")
            spec = dict(cfg=cfg, impl=name, device=str(device), dtype=args.dtype, seed=1,
                        threads=args.threads, reps=reps, grads_path=gpath)
            print(f"... {config} {impl_label(name, cfg)}", file=sys.stderr, flush=True)
            row.load_before = _load()
            res = run_child(spec, args.child_timeout)
            row.load_after = _load()
            if res.get("status") != "ok":
                row.status, row.message = "failed", res.get("message", "")
                continue
            use_cpu = clock == "cpu"
            times = res["cpu_times_ms"] if use_cpu else res["times_ms"]
            cold = res["cold_cpu_ms"] if use_cpu else res["cold_ms"]
            other = res["times_ms"] if use_cpu else res["cpu_times_ms"]
            t = C.summarize_ms(times) if times else dict(median_ms=cold, p20_ms=cold,
                                                         p80_ms=cold, n=0)
            row.other_median_ms = (C.summarize_ms(other)["median_ms"] if other else
                                   (res["cold_ms"] if use_cpu else res["cold_cpu_ms"]))
            row.status = "ok"
            row.wrong = bool(flagged)
            row.message = flagged
            row.median_ms, row.p20_ms, row.p80_ms, row.n = (t["median_ms"], t["p20_ms"],
                                                            t["p80_ms"], t["n"])
            if not res["times_ms"]:
                row.message = "; ".join(
                    x for x in (flagged, "median = the cold step (--reps 0)") if x)
            row.cold_ms, row.rss_peak_mb, row.rss_base_mb = (cold, res["rss_peak_mb"],
                                                             res["rss_base_mb"])
            row.clock = clock
            row.cuda_peak_mb = res.get("cuda_peak_mb")
            if ref_grad is not None:
                row.err_f64 = C._rel_err(torch.load(gpath), ref_grad)
        fill_speedups(rows)
        print_table(config, rows, device, threads)
        rows_by_cfg[config] = rows
        all_rows.extend(rows)
        if not args.no_save:  # per config: a run cut short keeps what it measured
            saved = save_rows(rows, [], None, device, args.results_dir,
                              dict(extra, load_end=_load()))

    hvp = None
    if not args.no_hvp:
        hvp = bench_hvp(device, reps=5)
        if hvp.get("status") == "ok":
            print(f"\n== batched HVP, TaskMLP 1-40-40-1, T={hvp['T']}, K=10 ==\n  task_hvp (auto) "
                  f"{hvp['fastmeta_ms']:.3f} ms, double backward (reference) "
                  f"{hvp['reference_ms']:.3f} "
                  f"ms: {hvp['reference_ms'] / hvp['fastmeta_ms']:.2f}x, rel err {hvp['err']:.1e}",
                  flush=True)
        else:
            print(f"\nbatched HVP: {hvp.get('status')}: {hvp.get('message')}", flush=True)

    targets = evaluate_targets(rows_by_cfg, device, args.quick, hvp)
    print_targets(targets)
    extra["load_end"] = _load()
    if not args.no_save:
        saved = save_rows([], targets, hvp, device, args.results_dir, extra)
    bad = [r for r in all_rows if r.status in ("WRONG", "failed")]
    print(f"\n{len(all_rows)} rows, {sum(r.ok for r in all_rows)} timed, {len(bad)} wrong/failed, "
          f"{time.perf_counter() - t_start:.0f} s, "
          f"load {extra['load_start']} -> {extra['load_end']}"
          + (f"; rows appended to {saved}" if saved else ""), flush=True)
    for r in bad:
        print(f"  {r.status}: {r.config} {r.label}: {r.message}", flush=True)
    return 1 if gate_bad else 0


def _estimate_mb(rows_by_cfg: dict, config: str, cfg: dict, name: str) -> float | None:
    """Peak memory of ``name`` at this config's k, extrapolated linearly in k from the same
    row at the other k of the same model (None when nothing to extrapolate from)."""
    pts = []
    for other, rows in rows_by_cfg.items():
        for r in rows:
            if (r.impl == name and r.ok and r.peak_mb is not None and r.cfg["model"] == cfg["model"]
                    and r.cfg["T"] == cfg["T"] and r.cfg["hidden"] == cfg["hidden"]
                    and r.cfg["k"] != cfg["k"]):
                pts.append((r.cfg["k"], r.peak_mb))
    if not pts:
        return None
    pts.sort()
    if len(pts) == 1:
        k0, m0 = pts[0]
        return m0 * cfg["k"] / k0 if cfg["k"] > k0 else None
    (k0, m0), (k1, m1) = pts[0], pts[-1]
    slope = (m1 - m0) / (k1 - k0) if k1 != k0 else 0.0
    return m1 + slope * (cfg["k"] - k1)


if __name__ == "__main__":
    sys.exit(main())
