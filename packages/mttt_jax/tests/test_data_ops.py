"""Image ops of the ImageNet pipeline against upstream's big_vision / TF semantics."""

import numpy as np

from tttlab.mttt_jax.data import resize_small_center_crop


def test_eval_resize_small_averages_areas_like_tf_area_resize():
    # upstream eval: resize_small(256) with TF method="area", then central_crop(224).  Halving a 512 x 640
    # image, each output pixel is the mean of its 2 x 2 input block.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (512, 640, 3), dtype=np.uint8)
    out = resize_small_center_crop(img, 256, 224)
    blocks = img.astype(np.float64).reshape(256, 2, 320, 2, 3).mean((1, 3))
    top, left = (256 - 224) // 2, (320 - 224) // 2
    expected = blocks[top : top + 224, left : left + 224]
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # Pillow rounds the mean; a bilinear (triangle) filter would be off by ~20 grey levels on noise
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0
