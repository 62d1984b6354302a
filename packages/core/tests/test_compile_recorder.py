"""core.testing.record_torch_compile in a fresh interpreter: the packages' compile-mode tests failed when
run alone (``TypeError: unhashable type: 'CompileRecorder'``): the first ``torch.compile`` call of a test
imported ``torch._dynamo``, whose tables of torch functions then met the recorder in place of
``torch.compile``.  In the whole suite another test had imported dynamo first, which hid it."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")

CODE = """
import pytest, torch
from tttlab.core.testing import record_torch_compile

mp = pytest.MonkeyPatch()
rec = record_torch_compile(mp)
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # optimizers call torch.compile helpers
f = torch.compile(lambda x: x + 1, mode="reduce-overhead")
assert f(torch.ones(1)).item() == 2 and rec == ["reduce-overhead"] and rec.calls == 1
mp.undo()
assert torch.compile is not rec
print("ok")
"""


def test_the_recorder_works_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
