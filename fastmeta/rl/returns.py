"""Returns, advantages and the linear feature baseline, batched over T tasks.

Everything takes the sampler's padded layout ``[T, E, H, ...]`` (tasks, episodes, steps) with
``mask [T, E, H]`` (1 where a step happened, 0 for padding after an episode ended).

* :func:`discounted_returns`: ``R_h = r_h + gamma * R_{h+1}`` within each episode.
* :func:`gae`: generalised advantage estimation (Schulman et al., "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation", ICLR 2016).
* :func:`linear_baseline`: the linear feature baseline of Duan et al., "Benchmarking Deep RL
  for Continuous Control", ICML 2016 (as pytorch-maml-rl uses it): per task, a ridge
  regression of the returns on ``[obs, obs^2, t, t^2, t^3, 1]`` (``t = step / 100``), solved in
  closed form for all T tasks at once.
* :func:`normalize`: per-task masked standardisation of the advantages.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_padded(rewards, mask, name: str = "rewards") -> tuple[int, int, int]:
    """Validate ``rewards``/``mask [T, E, H]`` (floating, same shape, finite); returns (T, E, H)."""
    for what, t in ((name, rewards), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor [T, E, H], got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what} must be a floating tensor, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{what} must have shape [T, E, H], got {tuple(t.shape)}")
    if rewards.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(rewards.shape)} but mask has {tuple(mask.shape)}; they must match")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        t, e, h = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has a non-finite value ({rewards[t, e, h].item()}) at task {t}, episode {e}, step {h}")
    return tuple(rewards.shape)


def _check_gamma(gamma: float, what: str = "gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{what} must be a float in [0, 1], got {gamma!r}")
    return float(gamma)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``[T, E, H]`` discounted return-to-go of every step (0 on padding).

    Equivalent PyTorch code::

        R = 0
        for h in reversed(range(H)):
            R = (rewards[..., h] + gamma * R) * mask[..., h]; out[..., h] = R
    """
    check_padded(rewards, mask)
    return _discounted_sum(rewards, mask, _check_gamma(gamma))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """``[T, E, H]`` GAE(gamma, lambda) advantages (0 on padding).

    ``values [T, E, H]`` is the baseline at every step; the value after the last step of an
    episode (or of the horizon) is 0. ``delta_h = r_h + gamma V_{h+1} - V_h``,
    ``A_h = delta_h + gamma lam A_{h+1}``; with ``lam = 1`` this is ``returns - values``.
    """
    check_padded(rewards, mask)
    if not isinstance(values, Tensor) or values.shape != rewards.shape:
        seen = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a tensor of shape {tuple(rewards.shape)} (as rewards), got {seen}")
    gamma, lam = _check_gamma(gamma), _check_gamma(lam, "lam")
    v = values * mask
    v_next = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], dim=-1)
    delta = (rewards + gamma * v_next - v) * mask
    return _discounted_sum(delta, mask, gamma * lam)


#: Longest horizon for which :func:`_discounted_sum` takes the [H, H] discount matrix.
MATMUL_MAX_H = 1024


def _discounted_sum(x: Tensor, mask: Tensor, c: float) -> Tensor:
    """``out_h = (x_h + c * out_{h+1}) * mask_h`` backwards over the last dim (``out_H = 0``).

    When every row's mask is 1s then 0s (episodes that end, padded after: the sampler's layout)
    and ``H <= MATMUL_MAX_H``, this is ``out = (x * mask) @ G * mask`` with
    ``G[k, h] = c^(k - h)`` for ``k >= h``: one matmul instead of H small steps (the loop costs
    ~1 ms per call at H = 100 in MAML-TRPO's step). Other masks take the loop."""
    H = x.shape[-1]
    prefix = bool(((mask == 0) | (mask == 1)).all()) and bool((mask[..., 1:] <= mask[..., :-1]).all())
    if prefix and H <= MATMUL_MAX_H:
        idx = torch.arange(H, device=x.device)
        lag = (idx.view(H, 1) - idx.view(1, H)).to(x.dtype)  # k - h
        G = torch.where(lag >= 0, torch.pow(torch.tensor(c, dtype=x.dtype, device=x.device), lag.clamp_min(0)),
                        torch.zeros((), dtype=x.dtype, device=x.device))
        return ((x * mask) @ G) * mask
    out = torch.empty_like(x)
    run = torch.zeros_like(x[..., 0])
    for h in range(H - 1, -1, -1):
        run = (x[..., h] + c * run) * mask[..., h]
        out[..., h] = run
    return out


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """``[T, E, H, 2 * obs_dim + 4]``: ``[obs, obs^2, t, t^2, t^3, 1]`` times the mask."""
    if not isinstance(obs, Tensor) or obs.dim() != 4 or obs.shape[:3] != mask.shape:
        seen = tuple(obs.shape) if isinstance(obs, Tensor) else type(obs).__name__
        raise ValueError(f"obs must have shape [T, E, H, obs_dim] with [T, E, H] = {tuple(mask.shape)}, got {seen}")
    m = mask.unsqueeze(-1).to(obs.dtype)
    H = obs.shape[2]
    t = (torch.arange(H, dtype=obs.dtype, device=obs.device) / 100.0).view(1, 1, H, 1).expand_as(m) * m
    return torch.cat([obs * m, obs * obs * m, t, t * t, t * t * t, m], dim=-1)


def fit_linear_baseline(features: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Per-task ridge coefficients ``[T, F]``: ``argmin_w ||X_t w - R_t||^2 + reg ||w||^2`` over
    the task's masked steps (``X_t`` its rows of ``features [T, E, H, F]``).

    Solved as ``(X^T X + reg I) w = X^T R`` for all tasks in one batched Cholesky solve; where a
    task's system is not positive definite enough, ``reg`` grows x10 up to 5 times (as the
    reference implementation of Duan et al. does).
    """
    T, F = features.shape[0], features.shape[-1]
    X = (features * mask.unsqueeze(-1)).reshape(T, -1, F)
    R = (returns * mask).reshape(T, -1, 1)
    xtx = X.transpose(1, 2) @ X
    xtr = X.transpose(1, 2) @ R
    eye = torch.eye(F, dtype=X.dtype, device=X.device)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(xtx + reg * eye)
        if int(info.max()) == 0:
            return torch.cholesky_solve(xtr, L).squeeze(-1)
        reg = reg * 10.0 if reg > 0 else 1e-8
    return torch.linalg.lstsq(xtx + reg * eye, xtr).solution.squeeze(-1)


def linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """``[T, E, H]`` baseline values: each task's ridge fit of ``returns`` on its own features,
    evaluated on the same steps (0 on padding). ``obs [T, E, H, obs_dim]``."""
    check_padded(returns, mask, "returns")
    feats = baseline_features(obs.to(returns.dtype), mask)
    w = fit_linear_baseline(feats, returns, mask, reg)
    return torch.einsum("tehf,tf->teh", feats, w) * mask


def normalize(adv: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-task masked standardisation ``(adv - mean_t) / (std_t + eps)`` (0 on padding); mean
    and (biased) std over the task's masked steps."""
    dims = (1, 2)
    n = mask.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (adv * mask).sum(dims, keepdim=True) / n
    var = (((adv - mean) * mask) ** 2).sum(dims, keepdim=True) / n
    return (adv - mean) / (var.sqrt() + eps) * mask
