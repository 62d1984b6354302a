"""Image ops of the ImageNet pipeline against upstream's big_vision / TF semantics."""

import numpy as np
import pytest

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
    # TF casts the float result back to uint8 (truncation); a bilinear filter would be ~20 levels off on noise
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0


def _coverage(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF's area resize, written out: output o covers [o s, (o + 1) s), s = n_in /
    n_out, and takes each input pixel i by the length of [i, i + 1) inside that interval, over s."""
    s = n_in / n_out
    weights = np.zeros((n_out, n_in))
    for o in range(n_out):
        lo, hi = o * s, (o + 1) * s
        for i in range(int(lo), min(n_in, int(hi) + 1)):
            weights[o, i] = max(0.0, min(hi, i + 1) - max(lo, i)) / s
    return weights


@pytest.mark.parametrize("shape", [(375, 500), (333, 500), (200, 150)])  # ImageNet's usual sizes; enlarging
def test_eval_resize_small_weights_partly_covered_pixels_as_tf_area_resize(shape):
    """At a non-integer ratio (375 -> 256: 1.46 input pixels per output) TF's area resize weights the input
    pixels an output only partly covers by the covered fraction and the uint8 cast truncates.  Pillow's BOX
    filter (the code before) gives whole weight to the pixels whose centres fall inside: ~20 levels off."""
    h, w = shape
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    nh, nw = int(round(h * 256 / min(h, w))), int(round(w * 256 / min(h, w)))
    rows = np.tensordot(_coverage(h, nh), img.astype(np.float64), axes=(1, 0))  # (nh, w, 3)
    full = np.tensordot(_coverage(w, nw), rows, axes=(1, 1)).transpose(1, 0, 2)  # (nh, nw, 3)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    expected = np.floor(full[top : top + 224, left : left + 224] + 1e-6)
    out = resize_small_center_crop(img, 256, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    flat = np.full((h, w, 1), 200, np.uint8)  # a flat image stays flat (no truncation to 199)
    assert np.all(resize_small_center_crop(flat, 256, 224) == 200)


@pytest.mark.parametrize("size, resize", [(224, 256), (16, 18)])
def test_eval_resizes_an_image_that_already_has_the_model_size(size, resize):
    """Upstream's eval is ``resize_small(256)|central_crop(224)`` for every image: one of exactly 224 x 224 is
    enlarged by 256/224 and cropped back, not passed through (the code before took it as it was)."""
    from tttlab.core.data import ArrayDataset
    from tttlab.mttt_jax.data import Source, value_range

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    src = Source(ArrayDataset(images, np.array([0, 1])), train=False, image_size=size, augment={},
                 eval_resize=resize, per_image=True, workers=1)  # fmt: skip
    got, labels = src.load(np.arange(2), None, None)
    # the same crop written out: enlarge by area (each output pixel of [o s, (o + 1) s) in one or two inputs)
    expected = []
    for img in images:
        grid = np.tensordot(_coverage(size, resize), img.astype(np.float64), axes=(1, 0))
        grid = np.tensordot(_coverage(size, resize), grid, axes=(1, 1)).transpose(1, 0, 2)
        off = (resize - size) // 2
        expected.append(np.floor(grid[off : off + size, off : off + size] + 1e-6).astype(np.uint8))
    np.testing.assert_allclose(got, value_range(np.stack(expected), -1.0, 1.0), atol=1e-6)
    assert labels.tolist() == [0, 1]
    assert not np.allclose(got, value_range(images, -1.0, 1.0)), "the image was passed through unresized"
