"""``--help`` as a user runs it: Hydra's page names the command."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("tttlab.torch_ttt.train", "tttlab-torch-ttt-train"),
        ("tttlab.torch_ttt.evaluate", "tttlab-torch-ttt-evaluate"),
    ],
)
def test_help_names_the_command(module, command):
    """The first line of ``--help`` said "evaluate is powered by Hydra." / "train is powered by Hydra." (the
    Python file's name); it names the console script, as ttt_mae's and memo_tpt's commands do, and the page
    still lists the experiments and engines."""
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines()[0] == f"{command} is powered by Hydra.", res.stdout[:300]
    assert "experiment: " in res.stdout and "mnist_tutorial" in res.stdout
