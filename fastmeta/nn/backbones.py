"""Standard few-shot backbones as plain ``nn.Module``s.

* :class:`Conv4` -- Vinyals et al. 2016 / Snell et al. 2017: 4 x [conv3x3-64, BN, ReLU,
  maxpool2]. On 28x28 Omniglot-sized inputs it yields a 64-d embedding; on 84x84
  mini-ImageNet a 1600-d one (64 x 5 x 5).
* :class:`ResNet12` -- Oreshkin et al. 2018 (TADAM) / Lee et al. 2019 (MetaOptNet):
  four residual blocks of three conv3x3-BN-LeakyReLU(0.1), a 1x1 conv shortcut and a 2x2
  max-pool; widths 64-160-320-640.

Both are ordinary modules (``[N, C, H, W]`` in, BatchNorm over the whole batch); the episodic
learners run them through :func:`fastmeta.nn.episode_forward`, which gives every episode of a
batch its own BatchNorm statistics (Conv4 as an ``nn.Sequential``, ResNet12 through its
``forward_episodes``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastmeta.nn.episode import run_episodes


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Sequential):
    """Conv4 embedding network: ``[N, C, H, W] -> [N, hidden * (H/16) * (W/16)]``.

    Args:
        in_channels: 1 for Omniglot/glyphs, 3 for mini-ImageNet.
        hidden: channels of every block (64 in the papers).

    Example::

        >>> Conv4(1)(torch.randn(10, 1, 28, 28)).shape
        torch.Size([10, 64])
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, blocks: int = 4):
        layers = [_conv_block(in_channels if i == 0 else hidden, hidden) for i in range(blocks)]
        super().__init__(*layers, nn.Flatten())
        self.in_channels = in_channels
        self.hidden = hidden


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))

    def forward_episodes(self, h: torch.Tensor, episodes: int) -> torch.Tensor:
        body = run_episodes(self.body, h, episodes)
        return self.out(body + run_episodes(self.shortcut, h, episodes))


class ResNet12(nn.Module):
    """ResNet-12 embedding network: ``[N, C, H, W] -> [N, widths[-1]]`` (global average pool)
    or ``[N, widths[-1] * h * w]`` with ``avg_pool=False``.

    Example::

        >>> ResNet12(3)(torch.randn(2, 3, 84, 84)).shape
        torch.Size([2, 640])
    """

    def __init__(self, in_channels: int = 3, widths=(64, 160, 320, 640), avg_pool: bool = True):
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*[_ResBlock(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.avg_pool = avg_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.blocks(x))

    def forward_episodes(self, h: torch.Tensor, episodes: int) -> torch.Tensor:
        """Example-major ``h [M * episodes, C, H, W]`` with per-episode BatchNorm
        (:func:`fastmeta.nn.episode_forward`)."""
        return self._pool(run_episodes(self.blocks, h, episodes))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) if self.avg_pool else x.flatten(1)
