from __future__ import annotations

import numpy as np
import pytest

from tttlab.core.testing import hydra_state_kept


@pytest.fixture(scope="session")
def photos224() -> np.ndarray:
    """Four scikit-image photos, resized (shorter side 256) and centre-cropped to 224 px, uint8 (4,224,224,3)."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from tttlab.core.data import resize_center_crop

    transform = resize_center_crop(256, 224)
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
        out.append(np.asarray(transform(img)))
    return np.stack(out)


@pytest.fixture(scope="session")
def digits28() -> np.ndarray:
    """Eight synthetic 28x28 single-channel digit-like images (strokes on black), uint8 (8,28,28,1)."""
    rng = np.random.default_rng(0)
    x = np.zeros((8, 28, 28, 1), np.uint8)
    for i in range(8):
        r0, c0 = rng.integers(4, 10, size=2)
        x[i, r0 : r0 + 14, c0 : c0 + 3, 0] = 255
        x[i, r0 : r0 + 3, c0 : c0 + 10, 0] = 230
        x[i, r0 + 12 : r0 + 15, c0 : c0 + 12, 0] = 200
    return x


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
