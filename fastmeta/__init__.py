"""fastmeta: kernel-backed PyTorch extension for meta-learning.

>>> import fastmeta
>>> fastmeta.backends()          # what is built, what is available, why not
"""

from fastmeta import compat, ops
from fastmeta.ops import BackendError
from fastmeta.learners.maml import ANIL, MAML, MetaSGD

__version__ = "0.1.0"


def backends(print_table: bool = True) -> list[dict]:
    """Print (and return as rows) which backend serves which op here, and why others do not."""
    from fastmeta.ops import _registry

    if print_table:
        print(_registry.format_table())
    return _registry.table()


__all__ = ["BackendError", "backends", "compat", "ops", "__version__"]
__all__ += ["ANIL", "MAML", "MetaSGD"]
