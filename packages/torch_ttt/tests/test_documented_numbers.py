"""Numbers quoted in the shipped configs' comments are the ones the README's measured tables hold."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _sweep_means(setting: str) -> dict[str, str]:
    """``{engine: mean}`` of the README's first ``**<setting>**`` table after "Every engine on MNIST-C"."""
    text = README.read_text()
    section = text[text.index("## Every engine on MNIST-C") :]
    table = section[section.index(f"**{setting}**") :].split("\n\n")[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    return {r[0].strip(): r[-2].strip().strip("*") for r in rows[1:] if r[0].strip() != "---"}


def test_memo_config_quotes_the_readme_sweep():
    """conf/engine/memo.yaml quoted "84.4 % episodic" from a model the README's sweep no longer uses (its
    table: MEMO 80.4 against source 79.4)."""
    comment = (resources.files("tttlab.torch_ttt.conf") / "engine" / "memo.yaml").read_text()
    episodic, continual = _sweep_means("episodic"), _sweep_means("continual")
    quoted = set(re.findall(r"(\d+\.\d) % episodic", comment))
    assert quoted <= {episodic["memo"]}, f"memo.yaml quotes {quoted} episodic, the README {episodic['memo']}"
    assert f"{episodic['memo']} % episodic" in comment and episodic["memo"] == continual["memo"]
    assert f"against source {episodic['source']} %" in comment
