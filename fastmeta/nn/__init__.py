"""Models: the standard few-shot backbones (task-batched layers arrive with the MAML issue)."""

from fastmeta.nn.backbones import Conv4, ResNet12

__all__ = ["Conv4", "ResNet12"]
