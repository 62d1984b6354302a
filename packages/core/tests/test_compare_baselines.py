"""compare's highlights say why the gain column is empty when a subpackage's baseline was not run."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tttlab.core import compare as cmp


def _row(method, package, mean, delta):
    return {"method": method, "package": package, "setting": "reset_each_shift", "fog": mean, "mean": mean,
            "delta": delta, "s_per_image": 0.001}  # fmt: skip


def test_highlights_name_the_baseline_that_was_not_run():
    """``tttlab-compare 'methods=[torch_ttt.tent,torch_ttt.bn]'`` (root README) printed a gain column of
    dashes only, without saying why: torch_ttt.source, the baseline of the gains, was not among the methods.
    The highlights now name it once per subpackage; a subpackage whose baseline ran gets no such line."""
    c = {"setting": ["reset_each_shift"], "corruptions": ["fog"],
         "baselines": {"p": "p.base", "q": "q.base"}}  # fmt: skip
    table = pd.DataFrame([
        _row("p.tent", "p", 0.9, np.nan), _row("p.bn", "p", 0.8, np.nan),
        _row("q.base", "q", 0.5, np.nan), _row("q.up", "q", 0.7, 0.2),
    ])  # fmt: skip
    lines = cmp.highlights(table, c)
    assert lines[0] == "Best mean accuracy: p.tent (90.0%)."
    assert "q.up +20.0" in lines[1]
    missing = [ln for ln in lines if ln.startswith("No gain column")]
    assert missing == [
        "No gain column for p.bn, p.tent: their baseline p.base was not among the methods (add it)."
    ]
    # chosen (by a glob) but without results, e.g. it failed: said so, not "add it"
    failed = [
        ln for ln in cmp.highlights(table, {**c, "methods": ["p.*", "q.*"]}) if ln.startswith("No gain")
    ]
    assert failed == ["No gain column for p.bn, p.tent: their baseline p.base has no results (see its run)."]
    # with every baseline run there is nothing to explain
    table.loc[table["method"] == "p.bn", ["method", "delta"]] = ["p.base", np.nan]
    table.loc[table["method"] == "p.tent", "delta"] = 0.1
    assert not [ln for ln in cmp.highlights(table, c) if ln.startswith("No gain column")]
