"""Models: the standard few-shot backbones, SNAIL's sequence blocks (``snail_blocks``), the
task-batched layers (params ``[T, *shape]``) and the few-shot losses as modules
(:class:`ProtoLoss`, :class:`MatchingLoss`)."""

from fastmeta.nn import task as _task
from fastmeta.nn import task_models as _task_models
from fastmeta.nn.backbones import Conv4, ResNet12
from fastmeta.nn.episode import episode_forward, supports_episode_forward
from fastmeta.nn.losses import MatchingLoss, ProtoLoss
from fastmeta.nn.snail_blocks import AttentionBlock, DenseBlock, TCBlock
from fastmeta.nn.task import (
    TaskActivation,
    TaskAvgPool2d,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskConv1d,
    TaskConv2d,
    TaskDropout,
    TaskFlatten,
    TaskGroupNorm,
    TaskLayerNorm,
    TaskLinear,
    TaskMaxPool2d,
    TaskModule,
)
from fastmeta.nn.task_models import TaskConv4, TaskMLP, TaskSequential, to_task_batched

__all__ = ["AttentionBlock", "Conv4", "DenseBlock", "MatchingLoss", "ProtoLoss", "ResNet12", "TCBlock",
           "episode_forward", "supports_episode_forward",
           *(n for n in _task.__all__ if n != "UnsupportedModuleError"), *_task_models.__all__]
