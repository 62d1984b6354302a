"""``tttlab-ttt-mae-probe`` / ``python -m tttlab.ttt_mae.probe``: MAE probeing (see ``train.py``)."""

from __future__ import annotations


def main() -> None:
    from .cli import hydra_main

    hydra_main("probe")


if __name__ == "__main__":
    main()
