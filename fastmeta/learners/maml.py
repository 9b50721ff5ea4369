"""MAML, Meta-SGD and ANIL: gradient-based meta-learners on task-batched inner loops.

* MAML -- Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks", ICML 2017 (``first_order=True``: first-order MAML, section 5.2 of the paper).
* Meta-SGD -- Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
  Learning", arXiv:1707.09835, 2017: the inner learning rate is learned, one per element.
* ANIL -- Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
  Understanding the Effectiveness of MAML", ICLR 2020: only the head adapts.

Each learner has two APIs.

**Batched** (the fast one): ``learner.meta_loss(support_x [T,S,...], support_y, query_x
[T,Q,...], query_y, steps=k)`` adapts all ``T`` tasks of a meta-batch at once
(``fastmeta.func.task_function`` + ``fastmeta.func.inner_loop``, whose backward is the exact
second-order meta-gradient from batched HVPs over kept (CPU, up to 1 GiB) or recomputed graphs) and
returns a :class:`MetaLossResult`: the query loss averaged over tasks, ready for
``backward()``, and the query accuracy (integer labels) or MSE (float targets).
``task_chunk=c`` adapts ``c`` tasks at a time and keeps only one chunk's graph alive: same
loss, same gradients, memory bounded by the chunk; the default ``"auto"`` chunks large CPU
models in second order (:func:`fastmeta.func.auto_task_chunk`).

**learn2learn-compatible** (drop-in for existing research code)::

    maml = fastmeta.MAML(model, lr=0.4)                # learn2learn.algorithms.MAML(model, lr=0.4)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    for task in tasks:
        learner = maml.clone()                         # parameters = differentiable clones
        learner.adapt(loss_fn(learner(xs), ys))        # theta' = theta - lr * grad (in place)
        (loss_fn(learner(xq), yq) / len(tasks)).backward()
    opt.step()

``clone()`` returns a learner whose parameters are differentiable functions of the original's;
``adapt(loss)`` takes ``autograd.grad`` of the loss (``create_graph=not first_order``,
``allow_unused``/``allow_nograd`` as in learn2learn) and replaces the clone's parameters by
``fastmeta.ops.inner_update(params, grads, lr)``. The gradients equal learn2learn's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastmeta.func import auto_task_chunk, inner_loop, task_function, task_losses
from fastmeta.learners._clone import adaptable, adapt_module, clone_module
from fastmeta.learners._meta_loss import MetaLossResult, task_metric
from fastmeta.learners._meta_loss import check_batch as _check_batch
from fastmeta.learners._meta_loss import check_chunk as _check_chunk
from fastmeta.learners._meta_loss import metric_name as _metric_name
from fastmeta.learners._meta_loss import run_meta_loss as _run_meta_loss
from fastmeta.nn.episode import check_episode_bn, embed_episodes, episode_forward, per_episode
from fastmeta.ops import checks

Tensor = torch.Tensor


def _detached(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in params.items()}


# ---- the learners ---------------------------------------------------------------------------


class _GradientLearner(nn.Module):
    """What MAML, MetaSGD and ANIL share: the batched meta-loss driver and the per-task
    metric; subclasses define ``adapt_tasks``/``predict`` (and the learn2learn API)."""

    first_order: bool

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int = 1,
                    loss_fn: Callable = F.cross_entropy, first_order: bool | None = None):
        raise NotImplementedError

    def predict(self, adapted, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _tasks(self, steps: int, loss_fn: Callable):
        def tasks_fn(sx, sy, qx, qy):
            adapted = self.adapt_tasks(sx, sy, steps, loss_fn)
            out = self.predict(adapted, qx)
            return task_losses(loss_fn, out, qy), task_metric(out.detach(), qy)

        return tasks_fn

    def _auto_chunk(self, support_x: Tensor, support_y: Tensor, steps: int, loss_fn: Callable) -> int | None:
        """``task_chunk="auto"``'s choice: all tasks at once unless a subclass knows better."""
        return None

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int = 1, loss_fn: Callable = F.cross_entropy,
                  task_chunk: int | str | None = "auto") -> MetaLossResult:
        """The meta-objective of a meta-batch of ``T`` tasks.

        Args:
            support_x: ``[T, S, *in]`` support inputs of each task.
            support_y: ``[T, S]`` integer labels or ``[T, S, *out]`` float targets.
            query_x: ``[T, Q, *in]``; query_y: ``[T, Q]`` or ``[T, Q, *out]``.
            steps: inner gradient steps ``k >= 0`` on each task's support set.
            loss_fn: per-example loss, e.g. ``F.cross_entropy`` or ``F.mse_loss`` (anything
                ``fastmeta.func.task_losses`` accepts); each task's loss is its mean.
            task_chunk: adapt this many tasks at a time, freeing each chunk's graph before
                the next (bounded memory; same loss and gradients up to float rounding; the
                loss is differentiable once). ``"auto"`` (default): chunks where the inner
                loop keeps its step graphs (CPU, second order) and one chunk's graphs would
                be large (:func:`fastmeta.func.auto_task_chunk`; learn2learn's
                MiniImagenetCNN at T=32 runs in chunks of 4, 1.2-1.9x faster than at once),
                else all tasks at once. None: all tasks at once.

        Returns:
            :class:`MetaLossResult` -- ``loss`` (mean over tasks of the post-adaptation query
            loss, differentiable w.r.t. the learner's parameters), ``metric`` (accuracy for
            integer labels, MSE for float targets), per-task values.

        Under ``torch.no_grad()`` (evaluation) the inner loop still takes its gradients and
        the result carries no graph. The support data gets no gradient from the inner loop.
        """
        _check_batch(support_x, support_y, query_x, query_y)
        steps = checks.steps_value(steps)
        task_chunk = _check_chunk(task_chunk)
        if task_chunk == "auto":
            task_chunk = self._auto_chunk(support_x, support_y, steps, loss_fn)
        return _run_meta_loss(self._tasks(steps, loss_fn), (support_x, support_y, query_x, query_y),
                              list(self.parameters()), task_chunk, _metric_name(query_y))


def _inner_loop(fn, params, sx, sy, steps, lr, first_order, loss_fn):
    if not torch.is_grad_enabled():  # evaluation: nothing to differentiate afterwards
        params = _detached(params)
        if isinstance(lr, dict):
            lr = _detached(lr)
        elif isinstance(lr, torch.Tensor):
            lr = lr.detach()
    return inner_loop(fn, params, sx, sy, steps, lr, first_order=first_order, loss_fn=loss_fn)


def _flags(learner, first_order, allow_unused, allow_nograd) -> dict:
    """The learn2learn call options as keyword arguments, each the learner's own where the
    call leaves it ``None``."""
    return dict(first_order=learner.first_order if first_order is None else first_order,
                allow_unused=learner.allow_unused if allow_unused is None else allow_unused,
                allow_nograd=learner.allow_nograd if allow_nograd is None else allow_nograd)


class MAML(_GradientLearner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

    Args:
        model: any ``nn.Module``. Task-batched models (:class:`fastmeta.nn.TaskMLP`,
            :class:`fastmeta.nn.TaskConv4`, ...) and models built from supported layers
            (converted automatically, sharing the parameters) take the fast batched path;
            modules with their own ``forward`` are traced (torch.fx) onto task-batched layers
            where every leaf is supported; the rest go through ``torch.func`` (see
            :func:`fastmeta.func.task_function` and :func:`fastmeta.func.explain`).
        lr: the inner (adaptation) learning rate, a float (or a tensor; learnable if it is
            an ``nn.Parameter``).
        first_order: drop the second-order terms (FOMAML).
        allow_unused: ``adapt``: parameters the loss does not use keep their value
            (default: ``allow_nograd``).
        allow_nograd: ``adapt``: skip parameters with ``requires_grad=False``.

    Batched: ``meta_loss(support_x [T,S,...], support_y, query_x [T,Q,...], query_y, steps=1,
    loss_fn=F.cross_entropy, task_chunk="auto") -> MetaLossResult``.
    learn2learn-style: ``clone()``, ``adapt(loss)``, ``learner(x)`` (calls the model).

    Example::

        >>> maml = fastmeta.MAML(TaskConv4(1, n_way=5), lr=0.4)
        >>> opt = torch.optim.Adam(maml.parameters(), 1e-3)
        >>> res = maml.meta_loss(sx, sy, qx, qy, steps=1)    # sx [32, 5, 1, 28, 28], sy [32, 5]
        >>> opt.zero_grad(); res.loss.backward(); opt.step()
        >>> res.accuracy                                       # post-adaptation query accuracy
    """

    def __init__(self, model: nn.Module, lr, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.module = model
        self.lr = checks.lr_value("lr", lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)

    def forward(self, *args, **kwargs):
        """Calls the wrapped model (the adapted one, on a clone)."""
        return self.module(*args, **kwargs)

    # -- learn2learn API ----------------------------------------------------------------------
    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> MAML:
        """A learner whose parameters are differentiable clones of this one's (adapt it with
        :meth:`adapt`; the query loss's gradient reaches this learner's parameters)."""
        return MAML(clone_module(self.module), self.lr,
                    **_flags(self, first_order, allow_unused, allow_nograd))

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step on ``loss``, in place: ``p <- p - lr * dloss/dp`` for every
        parameter in ``model.parameters()`` (the model's own method, as learn2learn: an
        override that leaves out state kept as Parameters is respected) with
        ``create_graph=not first_order``, so second-order MAML differentiates through it.
        A parameter there with ``requires_grad=False`` needs ``allow_nograd=True``."""
        adapt_module(self.module, loss, lambda n, p: self.lr,
                      **_flags(self, first_order, allow_unused, allow_nograd), who="MAML")

    # -- batched API --------------------------------------------------------------------------
    def task_function(self):
        """The :class:`fastmeta.func.TaskFunction` of the model (cached)."""
        return task_function(self.module)

    def _inner_lr(self, fn):
        return self.lr

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int = 1,
                    loss_fn: Callable = F.cross_entropy, first_order: bool | None = None) -> dict[str, Tensor]:
        """Adapted parameters ``{name: [T, *shape]}`` after ``steps`` inner steps on each
        task's support set (``fastmeta.func.inner_loop``)."""
        steps = checks.steps_value(steps)
        fn = self.task_function()
        params = fn.expand(support_x.shape[0])
        fo = self.first_order if first_order is None else first_order
        return _inner_loop(fn, params, support_x, support_y, steps, self._inner_lr(fn), fo, loss_fn)

    def predict(self, adapted: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model with per-task parameters ``adapted`` on ``x [T, N, *in]``."""
        return self.task_function()(adapted, x)

    def _auto_chunk(self, support_x, support_y, steps, loss_fn):
        if not torch.is_grad_enabled() or self.first_order:
            return None
        fn = self.task_function()
        return auto_task_chunk(fn, fn.expand(support_x.shape[0]), support_x, support_y, steps,
                               loss_fn=loss_fn)


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): MAML whose inner learning rate is learned, one per
    parameter element: ``theta' = theta - alpha * grad`` with ``alpha`` (``self.lrs``, an
    ``nn.ParameterDict`` keyed by parameter name with ``.`` written ``-``, initialised to
    ``lr``) meta-learned with the initialisation.

    Args:
        model: as for :class:`MAML`.
        lr: initial value of every learning rate.
        first_order: drop second-order terms (the learning rates still get their gradient).

    Same two APIs as :class:`MAML` (learn2learn's ``MetaSGD(model, lr=1.0,
    first_order=False)``, ``clone()``, ``adapt(loss)``).

    Example::

        >>> msgd = fastmeta.MetaSGD(TaskMLP([1, 40, 40, 1]), lr=0.01)
        >>> res = msgd.meta_loss(xs, ys, xq, yq, steps=1, loss_fn=F.mse_loss)
        >>> res.loss.backward()                 # gradients for the weights and msgd.lrs
    """

    def __init__(self, model: nn.Module, lr=1.0, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        lr = checks.lr_value("lr", lr)
        if isinstance(lr, torch.Tensor):
            raise TypeError("MetaSGD lr is the initial value of the learned rates: pass a float")
        super().__init__(model, lr, first_order, allow_unused, allow_nograd)
        # one rate per parameter that adapt() or meta_loss() can step (learn2learn: one per
        # model.parameters()); none for state kept as a non-trainable Parameter outside it
        steppable = {n for n, _ in adaptable(model)}
        self.lrs = nn.ParameterDict({self.lr_key(n): nn.Parameter(torch.full_like(p.detach(), lr))
                                     for n, p in model.named_parameters() if p.requires_grad or n in steppable})

    @staticmethod
    def lr_key(name: str) -> str:
        """Key of parameter ``name``'s learning rates in :attr:`lrs` (``.`` is not allowed)."""
        return name.replace(".", "-")

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> MetaSGD:
        """A learner with cloned parameters AND cloned learning rates (both differentiable)."""
        new = MetaSGD.__new__(MetaSGD)
        nn.Module.__init__(new)
        new.module = clone_module(self.module)
        new.lrs = clone_module(self.lrs)
        new.lr = self.lr
        new.first_order = self.first_order if first_order is None else bool(first_order)
        new.allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        new.allow_nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        return new

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One step ``p <- p - lrs[p] * dloss/dp`` (element-wise), in place."""
        adapt_module(self.module, loss, lambda n, p: self.lrs[self.lr_key(n)],
                      **_flags(self, first_order, allow_unused, allow_nograd), who="MetaSGD")

    def _inner_lr(self, fn):
        return {n: self.lrs[self.lr_key(n)] for n in fn.names}


class ANIL(_GradientLearner):
    """Almost No Inner Loop (Raghu et al., ICLR 2020): the features are shared by all tasks
    and not adapted; only ``head`` adapts, with MAML's inner loop.

    Args:
        features: ``[M, *in] -> [M, D]`` (any module; run once per meta-batch on the support
            and query examples of all tasks together).
        head: ``[M, D] -> [M, *out]`` (e.g. ``nn.Linear(D, n_way)``), adapted per task.
        lr: inner learning rate; first_order, allow_unused, allow_nograd: as for :class:`MAML`.
        episode_bn: BatchNorm statistics of ``features`` in training, as for
            :class:`~fastmeta.ProtoNet`: ``None`` (default) per task (support and query of a
            task together) whenever :func:`fastmeta.nn.supports_episode_forward` allows it,
            else over the whole batch of tasks; ``True``: per task or ``TypeError``; ``False``:
            over the whole batch (fastmeta before per-task BatchNorm in ANIL's features).

    BatchNorm: with per-task statistics a task's loss and gradient do not depend on the other
    tasks of its meta-batch (MAML's task layers have the same semantics), so ``task_chunk`` and
    ``torchrun`` ranks give the result of one process with the whole meta-batch. The
    learn2learn-style path (``learner(x)``) calls ``features`` plainly.

    Batched: ``meta_loss(...)`` as :class:`MAML`. learn2learn-style: ``clone()`` (features
    shared, head cloned), ``adapt(loss)`` (steps the head only), ``learner(x)`` =
    ``head(features(x))``.

    Example::

        >>> anil = fastmeta.ANIL(Conv4(1, hidden=32), nn.Linear(32, 5), lr=0.4)
        >>> anil.meta_loss(sx, sy, qx, qy, steps=5).loss.backward()
    """

    def __init__(self, features: nn.Module, head: nn.Module, lr, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False,
                 episode_bn: bool | None = None):
        super().__init__()
        for name, m in (("features", features), ("head", head)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        self.features, self.head = features, head
        self.episode_bn = check_episode_bn(features, episode_bn)
        self.lr = checks.lr_value("lr", lr)
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> ANIL:
        """Features shared (same module), head cloned (differentiable)."""
        return ANIL(self.features, clone_module(self.head), self.lr,
                    **_flags(self, first_order, allow_unused, allow_nograd),
                    episode_bn=self.episode_bn)

    def adapt(self, loss: Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One gradient step of the head on ``loss``, in place."""
        adapt_module(self.head, loss, lambda n, p: self.lr,
                      **_flags(self, first_order, allow_unused, allow_nograd), who="ANIL")

    def embed(self, x: Tensor) -> Tensor:
        """Features of ``x [T, N, *in]``: ``[T, N, D]`` (BatchNorm per task, class docstring)."""
        t, n = x.shape[:2]
        if per_episode(self.features, self.episode_bn):
            return episode_forward(self.features, x).reshape(t, n, -1)
        return self.features(x.flatten(0, 1)).reshape(t, n, -1)

    def head_function(self):
        return task_function(self.head)

    def adapt_tasks(self, support_x: Tensor, support_y: Tensor, steps: int = 1,
                    loss_fn: Callable = F.cross_entropy, first_order: bool | None = None,
                    support_features: Tensor | None = None) -> dict[str, Tensor]:
        """Adapted head parameters ``{name: [T, *shape]}``."""
        steps = checks.steps_value(steps)
        fn = self.head_function()
        z = self.embed(support_x) if support_features is None else support_features
        fo = self.first_order if first_order is None else first_order
        # second order: inner_loop also gives the features (its support input) their exact gradient
        return _inner_loop(fn, fn.expand(z.shape[0]), z, support_y, steps, self.lr, fo, loss_fn)

    def predict(self, adapted: dict[str, Tensor], x: Tensor, features: Tensor | None = None) -> Tensor:
        return self.head_function()(adapted, self.embed(x) if features is None else features)

    def _tasks(self, steps: int, loss_fn: Callable):
        def tasks_fn(sx, sy, qx, qy):
            zs, zq = embed_episodes(self.features, sx, qx, self.episode_bn)
            adapted = self.adapt_tasks(sx, sy, steps, loss_fn, support_features=zs)
            out = self.predict(adapted, qx, features=zq)
            return task_losses(loss_fn, out, qy), task_metric(out.detach(), qy)

        return tasks_fn
