"""SNAIL as a meta-RL policy (Mishra, Rohaninejad, Chen & Abbeel, "A Simple Neural Attentive
Meta-Learner", ICLR 2018, section 4.2 and appendix C.2): temporal-convolution and causal
attention blocks over the whole trial instead of a recurrent state.

Architecture (the paper's bandit/MDP policy, width ``channels``): a linear embedding of
:func:`fastmeta.rl.recurrent.step_input`, TC(seq_len, channels), TC(seq_len, channels),
attention(key=channels, value=channels), then the policy and value heads of
:class:`~fastmeta.rl.recurrent.SequencePolicy`. The blocks are :mod:`fastmeta.nn.snail_blocks`
(shared with the few-shot SNAIL learner).

The "state" of a trial is one cache per block (its past inputs for a dense block, past keys
and values for the attention block; :mod:`fastmeta.nn.snail_blocks`): ``step`` extends them by
the trial's new step at its own position, O(L) per step for the attention read, and gives the
output ``forward`` gives there (every block is causal).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastmeta.nn.snail_blocks import AttentionBlock, TCBlock
from fastmeta.rl.recurrent import SequencePolicy


class SNAILPolicy(SequencePolicy):
    """SNAIL policy over trials of at most ``seq_len`` steps (see the module docstring).

    Args:
        obs_dim, act_dim, discrete: as :class:`~fastmeta.rl.recurrent.GRUPolicy`.
        seq_len: the trial length L = episodes x horizon (sizes the TC dilations and the history).
        channels: embedding width, TC filters and attention key/value size (paper: 32).
        init_std: initial standard deviation of the Gaussian head.
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, seq_len: int, channels: int = 32,
                 init_std: float = 1.0):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        tc1 = TCBlock(channels, seq_len, channels)
        tc2 = TCBlock(tc1.out_channels, seq_len, channels)
        att = AttentionBlock(tc2.out_channels, channels, channels)
        super().__init__(obs_dim, act_dim, discrete, att.out_channels, init_std)
        self.seq_len = seq_len
        self.embed = nn.Linear(self.in_dim, channels)
        self.blocks = nn.Sequential(tc1, tc2, att)

    def _steppers(self):
        return [*self.blocks[0].blocks, *self.blocks[1].blocks, self.blocks[2]]

    def initial_state(self, n: int) -> list[Tensor]:
        p = self.embed.weight
        return [b.init_cache(n, self.seq_len, p.dtype, p.device) for b in self._steppers()]

    def step(self, x: Tensor, state: list[Tensor], pos: Tensor,
             alive: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One step of every trial (see :class:`~fastmeta.rl.recurrent.SequencePolicy`); the caches
        in ``state`` are extended in place for the ``alive`` trials."""
        self.check_inputs(x)
        if bool((pos[alive] >= self.seq_len).any()):
            raise ValueError(f"a trial ran past seq_len = {self.seq_len} steps")
        at = pos.clamp(max=self.seq_len - 1)  # finished trials: output unused
        h = self.embed(x)
        for block, cache in zip(self._steppers(), state):
            h = block.step(h, cache, at, alive)
        return self._heads(h)[0], state

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check_inputs(x)
        if x.shape[1] > self.seq_len:
            raise ValueError(f"x has {x.shape[1]} steps, more than seq_len = {self.seq_len}")
        return self._heads(self.blocks(self.embed(x)))
