"""Recurrent meta-RL policies (RL^2: Duan et al. 2016, "RL^2: Fast Reinforcement Learning via
Slow Reinforcement Learning"; Wang et al. 2016, "Learning to reinforcement learn").

A policy of a trial reads, at every step, the observation together with the previous
transition: :func:`step_input` builds ``x_t = [obs_t, a_{t-1}, r_{t-1}, d_{t-1}]`` (the previous
action one-hot when discrete, the previous reward, 1.0 if the previous step ended an episode),
all zero at the first step of a trial. The hidden state carries everything else across the
episodes of the trial (see :mod:`fastmeta.rl.trials`).

The protocol the trial sampler and PPO use (:class:`SequencePolicy`):

* ``initial_state(N)`` -> the state of N fresh trials;
* ``step(x [N, in_dim], state, pos [N], alive [N] bool) -> (out [N, out_dim], state)``: one step
  of every trial; a trial with ``alive`` False keeps its state (its episode already ended);
  ``pos`` is the number of steps the trial has taken so far;
* ``forward(x [N, L, in_dim]) -> (out [N, L, out_dim], value [N, L])``: the whole trial from a
  fresh state; ``out`` at step ``l`` equals what ``step`` returned there;
* the action head: ``sample(out, generator, deterministic)``, ``log_prob(out, actions)``,
  ``entropy(out)``: categorical over ``act_dim`` actions (``out`` = logits) or a diagonal
  Gaussian (``out = cat(mean, log_std)``, a learned state-independent log-std).

:class:`GRUPolicy` is the RL^2 policy; the SNAIL policy (Mishra et al. 2018) is in
:mod:`fastmeta.rl.recurrent_snail`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeta.rl.policy import gaussian_log_prob


def input_dim(obs_dim: int, act_dim: int) -> int:
    """Size of :func:`step_input`'s output: observation, previous action, reward, done flag."""
    return obs_dim + act_dim + 2


def step_input(obs: Tensor, prev_action: Tensor, prev_reward: Tensor, prev_done: Tensor,
               act_dim: int, discrete: bool) -> Tensor:
    """``[..., obs_dim + act_dim + 2]`` = ``cat(obs, a_prev, r_prev, d_prev)``.

    ``obs [..., obs_dim]``; ``prev_action [...]`` int64 (discrete; one-hot encoded here, -1 for
    "none": an all-zero code) or ``[..., act_dim]``; ``prev_reward``, ``prev_done [...]``. At the
    first step of a trial the caller passes :func:`no_action` and zero reward and done flag.
    """
    if discrete:
        a = F.one_hot(prev_action.long().clamp_min(0), act_dim).to(obs.dtype)
        a = a * (prev_action >= 0).unsqueeze(-1).to(obs.dtype)  # -1: no previous action
    else:
        a = prev_action.to(obs.dtype)
    return torch.cat([obs, a, prev_reward.unsqueeze(-1).to(obs.dtype),
                      prev_done.unsqueeze(-1).to(obs.dtype)], -1)


def no_action(shape, act_dim: int, discrete: bool) -> Tensor:
    """The "previous action" of a trial's first step: -1 (discrete) or zeros ``[..., act_dim]``."""
    if discrete:
        return torch.full(tuple(shape), -1, dtype=torch.long)
    return torch.zeros(*shape, act_dim)


def trial_inputs(obs: Tensor, actions: Tensor, rewards: Tensor, done: Tensor,
                 act_dim: int, discrete: bool) -> Tensor:
    """The inputs ``[N, L, in_dim]`` of whole trials ``obs [N, L, obs_dim]``, ``actions [N, L]``
    (discrete) or ``[N, L, act_dim]``, ``rewards``/``done [N, L]``: :func:`step_input` with the
    previous step's action, reward and done flag (none at step 0)."""
    N = obs.shape[0]
    first = no_action((N, 1), act_dim, discrete).to(actions.device, actions.dtype)
    prev_a = torch.cat([first, actions[:, :-1]], 1)
    prev_r = F.pad(rewards[:, :-1], (1, 0))
    prev_d = F.pad(done[:, :-1].to(obs.dtype), (1, 0))
    return step_input(obs, prev_a, prev_r, prev_d, act_dim, discrete)


class SequencePolicy(nn.Module):
    """Base class: the action head and the value head over a sequence model's features.

    Subclasses build the features (``_features``/``_step_features``) of size ``feature_dim``.
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, feature_dim: int,
                 init_std: float = 1.0):
        super().__init__()
        for what, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("feature_dim", feature_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {init_std!r}")
        self.obs_dim, self.act_dim, self.discrete = obs_dim, act_dim, bool(discrete)
        self.in_dim = input_dim(obs_dim, act_dim)
        self.pi = nn.Linear(feature_dim, act_dim)
        self.v = nn.Linear(feature_dim, 1)
        with torch.no_grad():  # near-uniform / near-zero-mean first policy
            self.pi.weight.mul_(0.01)
            self.pi.bias.zero_()
        self.log_std = (None if discrete
                        else nn.Parameter(torch.full((act_dim,), math.log(init_std))))

    def _heads(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        out = self.pi(feats)
        if not self.discrete:
            out = torch.cat([out, self.log_std.expand_as(out)], -1)
        return out, self.v(feats).squeeze(-1)

    def check_inputs(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have last dim in_dim = obs_dim + act_dim + 2 = "
                             f"{self.in_dim}, got shape {tuple(x.shape)}")

    # -- the action distribution --------------------------------------------------------------
    def sample(self, out: Tensor, generator: torch.Generator | None = None,
               deterministic: bool = False) -> Tensor:
        """Actions ``[N]`` int64 (discrete) or ``[N, act_dim]`` float32 from ``out [N, out_dim]``;
        ``deterministic``: the most likely action (argmax / the mean)."""
        if self.discrete:
            if deterministic:
                return out.argmax(-1)
            probs = torch.softmax(out.double(), -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        mu, log_std = out.chunk(2, -1)
        if deterministic:
            return mu.float()
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return (mu + log_std.exp() * noise).float()

    def log_prob(self, out: Tensor, actions: Tensor) -> Tensor:
        """``log pi(actions | out)``, shape ``out.shape[:-1]``."""
        if self.discrete:
            return torch.log_softmax(out, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        return gaussian_log_prob(out, actions.to(out.dtype))

    def entropy(self, out: Tensor) -> Tensor:
        """Entropy of the action distribution, shape ``out.shape[:-1]``."""
        if self.discrete:
            lp = torch.log_softmax(out, -1)
            return -(lp.exp() * lp).sum(-1)
        log_std = out.chunk(2, -1)[1]
        return (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)


class GRUPolicy(SequencePolicy):
    """RL^2's policy: a GRU over :func:`step_input` features, linear policy and value heads.

    Args:
        obs_dim, act_dim: observation size; number of actions (``discrete``) or action size.
        discrete: categorical head (True) or Gaussian head (False).
        hidden: GRU hidden size (RL^2 used 256 for bandits/MDPs; 128 is enough for k=5 n=10).
        init_std: initial standard deviation of the Gaussian head.
        action_reward: (discrete only) also feed the GRU ``onehot(a_{t-1}) * r_{t-1}``, the
            previous reward in the slot of the previous action: the same information as
            ``x``, but a per-action reward sum becomes linear in the inputs (bandits).
        value_gru: the value head reads a second GRU of its own (same inputs) instead of the
            policy's: the value loss then no longer moves the policy's recurrent weights.

    ``forward(x [N, L, in_dim]) -> (out [N, L, out_dim], value [N, L])`` runs the fused
    ``nn.GRU`` over whole trials from a zero state; ``step`` runs the same GRU one step at a
    time (see the module docstring). The state is the hidden vector ``[N, hidden]``
    (``[N, 2 * hidden]``: policy then value GRU, with ``value_gru``).
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 128,
                 init_std: float = 1.0, action_reward: bool = False, value_gru: bool = False):
        super().__init__(obs_dim, act_dim, discrete, hidden, init_std)
        if action_reward and not discrete:
            raise ValueError("action_reward needs a discrete action space")
        self.hidden = hidden
        self.action_reward, self.value_gru = bool(action_reward), bool(value_gru)
        gru_in = self.in_dim + (act_dim if action_reward else 0)
        self.gru = nn.GRU(gru_in, hidden, batch_first=True)
        self.vgru = nn.GRU(gru_in, hidden, batch_first=True) if value_gru else None

    def _gru_inputs(self, x: Tensor) -> Tensor:
        if not self.action_reward:
            return x
        o, A = self.obs_dim, self.act_dim
        return torch.cat([x, x[..., o:o + A] * x[..., o + A:o + A + 1]], -1)

    def initial_state(self, n: int) -> Tensor:
        p = self.gru.weight_ih_l0
        return torch.zeros(n, self.hidden * (2 if self.value_gru else 1), dtype=p.dtype,
                           device=p.device)

    def step(self, x: Tensor, state: Tensor, pos: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        self.check_inputs(x)
        x1 = self._gru_inputs(x).unsqueeze(1)
        H = self.hidden
        h = self.gru(x1, state[:, :H].unsqueeze(0).contiguous())[1].squeeze(0)
        if self.vgru is not None:
            hv = self.vgru(x1, state[:, H:].unsqueeze(0).contiguous())[1].squeeze(0)
            h = torch.cat([h, hv], -1)
        h = torch.where(alive.unsqueeze(-1), h, state)
        return self._heads(h[:, :H])[0], h

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_inputs(x)
        x = self._gru_inputs(x)
        feats, _ = self.gru(x)
        out, value = self._heads(feats)
        if self.vgru is not None:
            value = self.v(self.vgru(x)[0]).squeeze(-1)
        return out, value
