"""``tttlab-ttt-mae-baseline`` / ``python -m tttlab.ttt_mae.baseline``: the model without adaptation (``evaluate.py``)."""

from __future__ import annotations


def main() -> None:
    from .cli import hydra_main

    hydra_main("baseline")


if __name__ == "__main__":
    main()
