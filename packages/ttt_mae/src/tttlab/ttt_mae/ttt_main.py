"""``tttlab-ttt-mae-ttt`` / ``python -m tttlab.ttt_mae.ttt_main``: TTT-MAE on a benchmark (``evaluate.py``)."""

from __future__ import annotations


def main() -> None:
    from .cli import hydra_main

    hydra_main("ttt")


if __name__ == "__main__":
    main()
