"""PEARL's permutation-invariant context encoder (Rakelly et al. 2019, section 4.1).

Each transition ``c_n = (s, a, r, s')`` of a task's context maps, through one shared MLP, to a
Gaussian factor ``Psi(z | c_n) = N(mu_n, var_n)`` over the latent task variable z; the posterior is
their normalised product::

    q(z | c_1..c_C) ∝ prod_n N(z; mu_n, var_n)        (fastmeta.ops.gaussian_product)

so it does not depend on the order of the transitions, and a context of any length (a mask
marks padding) gives a posterior of the same shape. The prior is N(0, I); the information
bottleneck ``KL(q(z|c) || N(0, I))`` keeps z from memorising the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.ops import gaussian_product
from fastmeta.rl.sac import mlp

MIN_VAR = 1e-7  # PEARL's clamp of the factors' variances


def transition_features(obs: Tensor, actions: Tensor, rewards: Tensor, next_obs: Tensor) -> Tensor:
    """The encoder input ``cat(s, a, r, s')``: ``[..., 2 obs_dim + act_dim + 1]``."""
    return torch.cat([obs, actions, rewards.unsqueeze(-1), next_obs], dim=-1)


class ContextEncoder(nn.Module):
    """Transition -> Gaussian factor; context -> posterior over z.

    Args:
        obs_dim, act_dim: transition sizes. latent_dim: D, the size of z (PEARL: 5).
        hidden: MLP widths.

    Example::

        enc = ContextEncoder(2, 2, latent_dim=5)
        mu, var = enc.posterior(ctx)        # ctx [B, C, 2*2+2+1] -> [B, 5], [B, 5]
        z = enc.sample(mu, var, generator)  # [B, 5]
    """

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int = 5,
                 hidden: tuple[int, ...] = (128, 128)):
        super().__init__()
        for what, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("latent_dim", latent_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ContextEncoder: {what} must be a positive int, got {v!r}")
        self.in_dim = 2 * obs_dim + act_dim + 1
        self.latent_dim = latent_dim
        self.net = mlp([self.in_dim, *hidden, 2 * latent_dim])

    def factors(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Per-transition factors ``(mu, var)``, each ``[B, C, D]`` (var = softplus, >= 1e-7)."""
        mu, raw = self.net(context).chunk(2, dim=-1)
        return mu, F.softplus(raw).clamp_min(MIN_VAR)

    def posterior(self, context: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``q(z | context)`` as ``(mu [B, D], var [B, D])``.

        Args:
            context: ``[B, C, in_dim]`` floating (:func:`transition_features`), C >= 1.
            mask: ``[B, C]`` or None: 0 marks padding (its values are ignored); every row needs
                a nonzero entry.

        Raises ValueError for a wrong shape, an empty context (C = 0 or a row with no valid
        transition) or NaN/inf in a valid transition (e.g. a NaN reward).
        """
        if not isinstance(context, Tensor) or not context.is_floating_point():
            raise TypeError(f"context must be a floating-point tensor [B, C, {self.in_dim}], got "
                            f"{getattr(context, 'dtype', type(context).__name__)}")
        if context.dim() != 3 or context.shape[-1] != self.in_dim:
            raise ValueError(f"context must have shape [B, C, {self.in_dim}] (s, a, r, s'), got "
                             f"{list(context.shape)}")
        if context.shape[1] == 0:
            raise ValueError(f"context is empty (C = 0, shape {list(context.shape)}): the "
                             "posterior needs at least one transition per task; use the prior "
                             "N(0, I) instead")
        valid = torch.ones(context.shape[:2], dtype=torch.bool) if mask is None else mask != 0
        if tuple(valid.shape) != tuple(context.shape[:2]):
            raise ValueError(f"mask must have shape [B, C] = {list(context.shape[:2])}, got "
                             f"{list(valid.shape)}")
        bad = valid & ~torch.isfinite(context).all(-1)
        if bool(bad.any()):
            b, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"context has NaN or inf in transition {c} of task {b} "
                             f"(values {context[b, c].tolist()}; s, a, r, s' must be finite)")
        # padding may hold anything: the encoder must not turn it into NaN gradients
        if mask is not None:
            context = torch.where(valid[..., None], context, 0.0)
        mu, var = self.factors(context)
        return gaussian_product(mu, var, mask)

    @staticmethod
    def sample(mu: Tensor, var: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``z = mu + sqrt(var) * eps``, reparameterised (gradients reach mu and var)."""
        return mu + var.sqrt() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)


def kl_to_prior(mu: Tensor, var: Tensor) -> Tensor:
    """``KL(N(mu, diag var) || N(0, I))`` per row: ``0.5 sum_d (var + mu^2 - 1 - log var)``,
    ``[B]``."""
    return 0.5 * (var + mu * mu - 1.0 - var.log()).sum(-1)
