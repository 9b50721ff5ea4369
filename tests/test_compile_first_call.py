"""torch.compile(fullgraph=True) must work when a compiled function is the process's FIRST use of
a fastmeta op (it failed while ``fastmeta._C`` was loaded lazily under a lock on the first call:
Dynamo cannot trace the lock). The op tests compile after eager calls, so they cannot see this;
here a fresh interpreter compiles first."""

import subprocess
import sys


_FIRST_CALL = r"""
import torch
from fastmeta.ops import proto_loss

q = torch.randn(2, 6, 8, requires_grad=True)
p, y = torch.randn(2, 3, 8), torch.randint(0, 3, (2, 6))

@torch.compile(fullgraph=True, backend="eager")  # the failure is Dynamo's: any backend shows it
def step(q, p, y):
    return proto_loss(q * 2.0, p, y)

loss, acc = step(q, p, y)
loss.backward()
ref, _ = proto_loss(q.detach() * 2.0, p, y, backend="reference")
torch.testing.assert_close(loss, ref)
print("ok")
"""


def test_compile_as_first_call_in_a_fresh_process(tmp_path):
    out = subprocess.run([sys.executable, "-I", "-c", _FIRST_CALL], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
