"""The demo's corruption grid: every label inside the picture."""

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
    assert err.startswith("demo: unknown method 'tent_typo'") and "\n" not in err
    assert not out.exists()
