import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*batching rule.*")

from tttlab.core.testing import hydra_state_kept  # noqa: E402
from tttlab.ttt_mae.model import build_model  # noqa: E402
from tttlab.ttt_mae.ttt import TTTSettings  # noqa: E402
from tttlab.ttt_mae.views import Normalizer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """A tiny 28x28 single-channel MAE with a 1-block vit_head (seeded)."""

    def make(**kw):
        torch.manual_seed(kw.pop("seed", 0))
        return build_model("mae_vit_smoke_patch7", **kw)

    return make


@pytest.fixture
def norm():
    return Normalizer((0.1307,), (0.3081,))


@pytest.fixture
def settings():
    """Small TTT settings (3 steps x 4 copies, lr 0.05, random-crop views unless ``single_crop=True``),
    with overrides."""

    def make(**kw):
        base = dict(steps_per_example=3, batch_size=4, lr=0.05, single_crop=False)
        return TTTSettings(**{**base, **kw})

    return make


@pytest.fixture
def images():
    """``images(n, seed=0)``: n uniform random 1x28x28 images in [0, 1] (seeded)."""

    def make(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(1, 28, 28, generator=g) for _ in range(n)]

    return make


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """A model cache shared by the tests that run the evaluate contract (the smoke model trains once)."""
    return str(tmp_path_factory.mktemp("ttt_mae_models"))


@pytest.fixture(autouse=True)
def _hydra_state_kept():
    """Every test leaves Hydra's and logging's process-wide state as it found it: a command run in this process
    leaves its HydraConfig, log handlers and levels behind (:func:`tttlab.core.testing.hydra_state_kept`)."""
    with hydra_state_kept():
        yield
