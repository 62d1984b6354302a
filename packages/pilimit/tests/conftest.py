"""Tests run with one intra-op thread: the ops here are tiny, and on a busy shared CPU torch's thread pool
makes them up to 100x slower.  ``omniglot_root``: a generated Omniglot folder for the MAML runs.  Hydra's
process-wide state is put back after each test."""

import numpy as np
import pytest
import torch

from tttlab.core.testing import hydra_state_kept

torch.set_num_threads(1)


def write_omniglot(root, n_chars=6, n_imgs=3):
    """<root>/images_background|images_evaluation/<alphabet>/<character>/*.png: ``n_chars`` characters of
    ``n_imgs`` random 105x105 stroke images each, in two alphabets (Omniglot's on-disk layout)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("images_background", "images_evaluation"):
        for c in range(n_chars):
            d = root / split / f"Alphabet_{c % 2}" / f"character{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_imgs):
                img = np.where(rng.random((105, 105)) < 0.1, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{c:02d}_{i:02d}.png")
    return root


@pytest.fixture
def omniglot_root(tmp_path):
    """A generated Omniglot folder (:func:`write_omniglot`, 6 characters of 3 images per split)."""
    return write_omniglot(tmp_path / "omniglot")


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
