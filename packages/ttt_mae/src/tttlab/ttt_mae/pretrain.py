"""``tttlab-ttt-mae-pretrain`` / ``python -m tttlab.ttt_mae.pretrain``: MAE pretraining (see ``train.py``)."""

from __future__ import annotations


def main() -> None:
    from .cli import hydra_main

    hydra_main("pretrain")


if __name__ == "__main__":
    main()
