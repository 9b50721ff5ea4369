"""Per-episode BatchNorm for shared-weight backbones: run an ordinary ``nn.Module`` (Conv4,
ResNet12, any ``nn.Sequential``) on a batch of episodes ``[B, M, *in]`` so that every BatchNorm
layer normalises each episode with that episode's own statistics.

Why: a metric or black-box learner embeds the support and query images of ``B`` episodes in one
backbone pass. A plain ``nn.BatchNorm2d`` there normalises over all ``B * M`` images, so an
episode's embedding -- and its loss -- depends on which other episodes share its batch: a run
with ``--batch 8`` is not eight one-episode runs, and under ``torchrun`` each rank normalises only
its ``B / world`` episodes, so 2 processes x ``B/2`` differ from 1 process x ``B``. Per-episode
statistics make an episode's loss a function of that episode alone (the MAML family's task
layers and MetaLSTM already normalise per task).

How (no copy inside the network): the images are ordered example-major, ``[M, B]`` flattened to
``M * B`` rows, so every layer but BatchNorm runs exactly as on a plain batch (same weights, one
convolution over all images), and at a BatchNorm the activations ``[M * B, C, ...]`` are viewed
as ``[M, B * C, ...]``: one ``F.batch_norm`` call whose ``B * C`` channels are the (episode,
channel) pairs, i.e. PyTorch's own fused kernels with per-episode statistics. The affine weight
and bias are the layer's own (``repeat``-ed, so their gradient sums over the episodes).

Contract of :func:`episode_forward` (``module`` in training mode):

* BatchNorm layers (any ``torch.nn.modules.batchnorm._BatchNorm``) use each episode's batch
  statistics over its ``M`` examples (and spatial positions).
* Running statistics (if tracked) are updated ONCE per call with the MEAN over the ``B``
  episodes of each episode's mean and unbiased variance: ``r <- (1 - m) r + m * mean_b(s_b)``.
  This is linear in the per-episode statistics, so 2 ranks with ``B/2`` episodes each whose
  buffers are then averaged (:func:`fastmeta.distributed.all_reduce_gradients`) hold the
  running statistics of one process with all ``B`` -- up to float rounding.
  ``num_batches_tracked`` grows by one per call, as with a plain forward.
* With ``B == 1`` every BatchNorm runs its plain ``forward``: bit for bit the old
  single-episode computation.
* In eval mode a BatchNorm with running statistics uses them (per example, no coupling); one
  without running statistics uses per-episode batch statistics.
* Every other layer must treat examples independently (convolutions, activations, pooling,
  dropout, flatten ...): :func:`episode_forward` cannot check that.

Which modules it can run (:func:`supports_episode_forward`): ``nn.Sequential`` containers of
supported modules, BatchNorm layers, modules with no BatchNorm inside (called as they are), and
modules defining ``forward_episodes(h, episodes)`` (``h`` example-major ``[M * B, *in]``; see
:class:`fastmeta.nn.ResNet12`), which call :func:`run_episodes` on their children. A module
with BatchNorm inside its own ``forward`` is not supported (a plain call would normalise over
the whole batch): :func:`supports_episode_forward` says False and :func:`episode_forward`
raises ``TypeError``.

Example::

    >>> net, x = Conv4(1), torch.randn(8, 80, 1, 28, 28)       # 8 episodes of 80 images
    >>> z = episode_forward(net, x)
    >>> z.shape
    torch.Size([8, 80, 64])
    >>> torch.allclose(z[3], episode_forward(net, x[3:4])[0], atol=1e-5)   # its own statistics
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["check_episode_bn", "embed_episodes", "episode_batch_norm", "episode_forward",
           "per_episode", "run_episodes", "supports_episode_forward"]


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


def supports_episode_forward(module: nn.Module) -> bool:
    """Whether :func:`episode_forward` can run ``module`` (see the module docstring): True for
    Conv4, ResNet12, ``nn.Sequential`` of supported modules and any module without BatchNorm."""
    if isinstance(module, _BatchNorm) or callable(getattr(module, "forward_episodes", None)):
        return True
    if isinstance(module, nn.Sequential):
        return all(supports_episode_forward(m) for m in module)
    return not _has_batch_norm(module)


def episode_batch_norm(bn: _BatchNorm, h: torch.Tensor, episodes: int) -> torch.Tensor:
    """``bn`` on example-major ``h [M * episodes, C, *]`` with per-episode statistics (contract:
    the module docstring). Returns ``[M * episodes, C, *]``."""
    if episodes == 1:
        return bn(h)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not batch_stats:  # running statistics: every example on its own
        return bn(h)
    bn._check_input_dim(h)
    rows, C = h.shape[0], h.shape[1]
    if rows % episodes:
        raise ValueError(f"{type(bn).__name__}: {rows} rows are not {episodes} episodes of the "
                         f"same size")
    # the momentum and counter bookkeeping of _BatchNorm.forward
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    rm = bn.running_mean.repeat(episodes) if update else None
    rv = bn.running_var.repeat(episodes) if update else None
    w = None if bn.weight is None else bn.weight.repeat(episodes)
    b = None if bn.bias is None else bn.bias.repeat(episodes)
    # [M * B, C, *] example-major -> [M, B * C, *]: channel j = (episode j // C, channel j % C)
    out = F.batch_norm(h.reshape(rows // episodes, episodes * C, *h.shape[2:]), rm, rv, w, b,
                       True, factor, bn.eps)
    if update:
        with torch.no_grad():
            bn.running_mean.copy_(rm.view(episodes, C).mean(0))
            bn.running_var.copy_(rv.view(episodes, C).mean(0))
    # Back to [M * B, C, *] as a NON-view for autograd (same storage): an in-place op on the
    # result (Conv4's ReLU(inplace=True)) on a view would make autograd rebuild the whole base
    # tensor in backward (CopySlices: a copy and a fill per layer, ~25% of a ProtoNet step).
    return torch.ops.aten._unsafe_view(out.contiguous(), h.shape)


def run_episodes(module: nn.Module, h: torch.Tensor, episodes: int) -> torch.Tensor:
    """``module`` on example-major ``h [M * episodes, *in]`` with per-episode BatchNorm; the
    building block of :func:`episode_forward` and of ``forward_episodes`` methods."""
    if isinstance(module, _BatchNorm):
        return episode_batch_norm(module, h, episodes)
    forward_episodes = getattr(module, "forward_episodes", None)
    if callable(forward_episodes):
        return forward_episodes(h, episodes)
    if isinstance(module, nn.Sequential):
        for m in module:
            h = run_episodes(m, h, episodes)
        return h
    if _has_batch_norm(module):
        raise TypeError(
            f"{type(module).__name__} has BatchNorm layers inside its own forward, which "
            f"cannot run per episode: build it from nn.Sequential containers or give it a "
            f"forward_episodes(h, episodes) method (see fastmeta.nn.episode)")
    return module(h)


def episode_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` applied to every example of ``x [B, M, *in]`` -> ``[B, M, *out]``, with the
    BatchNorm statistics of each of the ``B`` episodes its own (module docstring). The result is
    a transposed view of an example-major tensor (call ``.contiguous()`` if that matters)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"x must be a tensor [B, M, *example] (episodes, examples), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, M = x.shape[:2]
    h = run_episodes(module, x.transpose(0, 1).reshape(M * B, *x.shape[2:]), B)
    return h.view(M, B, *h.shape[1:]).transpose(0, 1)


def embed_episodes(backbone: nn.Module, support_x: torch.Tensor, query_x: torch.Tensor,
                   episode_bn: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat embeddings ``([B, S, D], [B, Q, D])`` of support ``[B, S, *in]`` and query
    ``[B, Q, *in]`` in one backbone pass, for the episodic learners: with per-episode BatchNorm
    (module docstring) when ``episode_bn`` is True, or None and the backbone has BatchNorm
    layers :func:`run_episodes` can run; otherwise one plain call on all ``B * (S + Q)``
    examples, as before this module existed (a BatchNorm then normalises over the whole batch).
    The per-episode results are transposed views (non-contiguous) for ``B > 1``."""
    b, s, q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
    if per_episode(backbone, episode_bn):
        # example-major [S + Q, B] order in one copy
        x = torch.cat([support_x.transpose(0, 1), query_x.transpose(0, 1)]).flatten(0, 1)
        z = run_episodes(backbone, x, b).reshape(s + q, b, -1)
        return z[:s].transpose(0, 1), z[s:].transpose(0, 1)
    z = backbone(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)])).flatten(1)
    return z[: b * s].view(b, s, -1), z[b * s :].view(b, q, -1)


def per_episode(backbone: nn.Module, episode_bn: bool | None) -> bool:
    """Whether a learner with this ``episode_bn`` setting runs ``backbone`` per episode:
    ``episode_bn`` itself when given, else (None) whether the backbone has BatchNorm layers
    that :func:`run_episodes` can run."""
    if episode_bn is not None:
        return episode_bn
    return _has_batch_norm(backbone) and supports_episode_forward(backbone)


def check_episode_bn(backbone: nn.Module, episode_bn: bool | None) -> bool | None:
    """Validate a learner's ``episode_bn`` argument against its backbone; returns it."""
    if episode_bn not in (None, True, False):
        raise TypeError(f"episode_bn must be None (automatic), True or False, got {episode_bn!r}")
    if episode_bn and not supports_episode_forward(backbone):
        raise TypeError(
            f"episode_bn=True: the backbone {type(backbone).__name__} has BatchNorm inside a "
            f"forward that fastmeta cannot run per episode (nn.Sequential containers, Conv4 and "
            f"ResNet12 can; or give the module forward_episodes(h, episodes), see "
            f"fastmeta.nn.episode)")
    return episode_bn
