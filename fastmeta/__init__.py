"""fastmeta: kernel-backed PyTorch extension for meta-learning.

>>> import fastmeta
>>> fastmeta.backends()          # what is built, what is available, why not

The layers, each a subpackage (data flows down: ``learners -> func -> nn -> ops``):

* ``fastmeta.ops``: the fused ops (``prototypes``, ``proto_loss``, ``matching_loss``,
  ``inner_update``, ...) and the backend registry;
* ``fastmeta.nn``: backbones, task-batched layers and the losses as modules (``ProtoLoss``,
  ``MatchingLoss``);
* ``fastmeta.func``: model-level transforms (``task_function``: any module over T tasks);
* ``fastmeta.data``: few-shot datasets and episode loaders;
* ``fastmeta.learners``: the meta-learners, also available here at the top level
  (``fastmeta.MAML``, ``fastmeta.ProtoNet``, ...).
"""

from fastmeta import compat, data, func, learners, nn, ops
from fastmeta.learners import ANIL, MAML, MANN, SNAIL, MatchingNet, MetaLSTM, MetaSGD, PixelNN, ProtoNet
from fastmeta.learners import Baseline, Reptile, iMAML
from fastmeta.ops import BackendError, registry

__version__ = "0.1.0"


def backends(print_table: bool = True) -> list[dict]:
    """Print (and return as rows) which backend serves which op here, and why others do not."""
    if print_table:
        print(registry.format_table())
    return registry.table()


__all__ = ["BackendError", "backends", "compat", "data", "func", "learners", "nn", "ops", "__version__"]
__all__ += ["ANIL", "MAML", "MANN", "MatchingNet", "MetaLSTM", "MetaSGD", "PixelNN", "ProtoNet", "SNAIL"]
__all__ += ["Baseline", "Reptile", "iMAML"]
