import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*batching rule.*")

from tttlab.ttt_mae.model import build_model  # noqa: E402
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


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """A model cache shared by the tests that run the evaluate contract (the smoke model trains once)."""
    return str(tmp_path_factory.mktemp("ttt_mae_models"))
