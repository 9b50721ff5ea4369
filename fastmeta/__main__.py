"""``python -m fastmeta``: see :mod:`fastmeta.cli`. Under ``torchrun`` the process group is
created from torchrun's environment first (:func:`fastmeta.distributed.session`); ``record``
hands a failing rank's traceback to torchrun, which prints it in its failure summary."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from fastmeta import distributed
from fastmeta.cli import main


@record
def _main() -> int:
    with distributed.session():
        return main()


sys.exit(_main())
