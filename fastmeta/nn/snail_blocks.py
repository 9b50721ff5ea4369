"""The building blocks of SNAIL (Mishra, Rohaninejad, Chen & Abbeel, "A Simple Neural Attentive
Meta-Learner", ICLR 2018), channels-last ``[N, T, C]`` sequences:

* :class:`DenseBlock`: a causal dilated convolution (kernel 2) with a gated activation
  ``tanh(conv_f(x)) * sigmoid(conv_g(x))``, its output concatenated to its input;
* :class:`TCBlock`: dense blocks with dilations ``1, 2, 4, ...`` up to the sequence length;
* :class:`AttentionBlock`: single-head causal attention through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, the read values
  concatenated to the input.

Step ``t`` of every block's output depends on steps ``<= t`` only. ``step(x, cache, pos, write)``
runs one step of N sequences at their own positions ``pos [N]`` from a per-block cache of the
past (``init_cache``; incremental decoding: O(L) per step instead of a pass over the prefix),
equal to ``forward`` of the whole sequence at those positions. ``forward_branch(xs, xq)``
runs a support sequence ``xs [B, S, C]`` plus queries ``xq [B, Q, C]`` that each see the whole
support and themselves only (the few-shot learner :class:`fastmeta.learners.SNAIL` uses it);
the meta-RL policy :class:`fastmeta.rl.recurrent_snail.SNAILPolicy` uses ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionBlock", "DenseBlock", "TCBlock"]


def _store(cache: torch.Tensor, entry: torch.Tensor, pos: torch.Tensor, write: torch.Tensor) -> None:
    """``cache[n, pos[n]] = entry[n]`` for the rows with ``write[n]`` (in place)."""
    rows = torch.arange(cache.shape[0], device=cache.device)[write]
    cache[rows, pos[write]] = entry[write].to(cache.dtype)


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x[:, t - d]`` (zeros for ``t < d``) of ``[N, T, C]``."""
    return F.pad(x, (0, 0, d, 0))[:, : x.shape[1]]


def _support_at(xs: torch.Tensor, t: int) -> torch.Tensor:
    """Support step ``t`` ``[B, 1, C]``, zeros if ``t < 0`` (the causal padding)."""
    return xs[:, t : t + 1] if t >= 0 else xs.new_zeros(xs.shape[0], 1, xs.shape[2])


class DenseBlock(nn.Module):
    """Causal dilated convolution (kernel 2) with a gated activation; output ``[x, act]``.

    The kernel-2 convolution is one linear map of ``[x_{t-d}, x_t]`` (the same weights as
    ``nn.Conv1d(c, 2 * filters, 2, dilation=d)`` on a left-padded sequence, in the
    channels-last layout the attention uses)."""

    def __init__(self, in_channels: int, filters: int, dilation: int):
        super().__init__()
        self.dilation, self.filters = dilation, filters
        self.conv = nn.Linear(2 * in_channels, 2 * filters)

    def _gate(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        xf, xg = self.conv(torch.cat([prev, cur], -1)).chunk(2, -1)
        return torch.tanh(xf) * torch.sigmoid(xg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self._gate(_shift(x, self.dilation), x)], -1)

    def init_cache(self, n: int, seq_len: int, dtype=None, device=None) -> torch.Tensor:
        """The step cache of ``n`` sequences of up to ``seq_len`` steps: the block's past inputs."""
        return torch.zeros(n, seq_len, self.conv.in_features // 2, dtype=dtype, device=device)

    def step(self, x: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """Output ``[N, C + filters]`` of step ``x [N, C]`` at positions ``pos [N]``; stores ``x`` in
        ``cache`` (in place) for the rows with ``write [N]`` (others: output unspecified)."""
        _store(cache, x, pos, write)
        back = pos - self.dilation
        prev = cache[torch.arange(x.shape[0], device=x.device), back.clamp_min(0)]
        prev = prev * (back >= 0).unsqueeze(-1).to(prev.dtype)  # causal zero padding
        return torch.cat([x, self._gate(prev, x)], -1)

    def forward_branch(self, xs: torch.Tensor, xq: torch.Tensor):
        s = xs.shape[1]
        prev_q = _support_at(xs, s - self.dilation).expand(-1, xq.shape[1], -1)
        return self.forward(xs), torch.cat([xq, self._gate(prev_q, xq)], -1)


class TCBlock(nn.Module):
    """Dense blocks with dilations ``1, 2, 4, ..., 2**(ceil(log2(seq_len)) - 1)``: the last
    step's receptive field covers the whole sequence."""

    def __init__(self, in_channels: int, seq_len: int, filters: int = 128):
        super().__init__()
        n = max(1, math.ceil(math.log2(max(seq_len, 2))))
        self.blocks = nn.ModuleList(DenseBlock(in_channels + i * filters, filters, 2**i) for i in range(n))
        self.out_channels = in_channels + n * filters

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_branch(self, xs, xq):
        for blk in self.blocks:
            xs, xq = blk.forward_branch(xs, xq)
        return xs, xq


class AttentionBlock(nn.Module):
    """Single-head causal attention (key size ``key``, value size ``value``); output
    ``[x, attention(x)]``."""

    def __init__(self, in_channels: int, key: int, value: int):
        super().__init__()
        self.key, self.value = key, value
        self.proj = nn.Linear(in_channels, 2 * key + value)
        self.out_channels = in_channels + value
        # The query projection starts equal to the key projection (both then train freely):
        # a score starts as (W x_i + b) . (W x_j + b), a similarity of the two steps, so a
        # query already attends more to the supports that look like it and the label it reads
        # there carries a gradient. Independent random projections give scores unrelated to
        # similarity and near-uniform attention, which reads the average label (measured
        # effect: bench/results/blackbox_glyphs.md).
        with torch.no_grad():
            self.proj.weight[:key] = self.proj.weight[key : 2 * key]
            self.proj.bias[:key] = self.proj.bias[key : 2 * key]

    def _qkv(self, x):
        q, k, v = self.proj(x).split([self.key, self.key, self.value], -1)
        return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # [N, 1 head, T, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return torch.cat([x, F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)], -1)

    def init_cache(self, n: int, seq_len: int, dtype=None, device=None) -> torch.Tensor:
        """The step cache of ``n`` sequences of up to ``seq_len`` steps: past keys and values."""
        return torch.zeros(n, seq_len, self.key + self.value, dtype=dtype, device=device)

    def step(self, x: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """Output ``[N, C + value]`` of step ``x [N, C]`` at positions ``pos [N]``, attending over
        the cached steps ``<= pos``; stores this step's key and value in ``cache`` (in place) for
        the rows with ``write [N]`` (others: output unspecified)."""
        q, k, v = self.proj(x).split([self.key, self.key, self.value], -1)
        _store(cache, torch.cat([k, v], -1), pos, write)
        keys, values = cache.split([self.key, self.value], -1)
        seen = torch.arange(cache.shape[1], device=x.device) <= pos.unsqueeze(-1)  # [N, L]
        out = F.scaled_dot_product_attention(q[:, None, None], keys.unsqueeze(1), values.unsqueeze(1),
                                             attn_mask=seen[:, None, None])
        return torch.cat([x, out.reshape(x.shape[0], self.value)], -1)

    def forward_branch(self, xs: torch.Tensor, xq: torch.Tensor):
        s, nq = xs.shape[1], xq.shape[1]
        qs, ks, vs = self._qkv(xs)
        qq, kq, vq = self._qkv(xq)
        # query i sees the S support steps and itself, never another query
        mask = torch.cat([torch.ones(nq, s, dtype=torch.bool, device=xq.device),
                          torch.eye(nq, dtype=torch.bool, device=xq.device)], 1)
        out_q = F.scaled_dot_product_attention(qq, torch.cat([ks, kq], 2), torch.cat([vs, vq], 2),
                                               attn_mask=mask)
        out_s = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        return torch.cat([xs, out_s.squeeze(1)], -1), torch.cat([xq, out_q.squeeze(1)], -1)
