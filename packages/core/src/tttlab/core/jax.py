"""JAX adapter: numpy uint8 NHWC batches -> float ``jax.Array``s sharded over a device mesh.

Needs the ``[jax]`` extra (``pip install -c constraints.txt -e 'packages/core[jax]'``).  Only this module imports jax.  Images
stay NHWC (the layout Flax convolutions use).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidInputError, require

jax = require("jax", "jax")
jnp = jax.numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

DATA_AXIS = "data"


def data_mesh(devices: Sequence[Any] | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over all (global) devices, for data parallelism."""
    devs = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devs.reshape(-1), (axis,))


def to_float(images: np.ndarray, mean=None, std=None, dtype=np.float32) -> np.ndarray:
    """uint8 NHWC -> float NHWC in [0, 1] (then normalised), on the host; NaN/inf input raises."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InvalidInputError(f"images must be (N, H, W, C), got {getattr(images, 'shape', type(images))}")
    if images.dtype == np.uint8:
        x = images.astype(dtype) * dtype(1 / 255)
    elif np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise InvalidInputError("images contain NaN or inf values; expected finite numbers in [0, 1]")
        x = images.astype(dtype)
    else:
        raise InvalidInputError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if mean is not None:
        x = x - np.asarray(mean, dtype)
    if std is not None:
        x = x / np.asarray(std, dtype)
    return x


def shard(tree, mesh: Mesh | None = None, axis: str = DATA_AXIS):
    """Put every array of ``tree`` on ``mesh``, split along its first (batch) axis.

    With several processes (``jax.distributed.initialize()``), each passes its local part and the
    global array is assembled with ``jax.make_array_from_process_local_data``.
    """
    mesh = mesh or data_mesh()
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    n_dev = mesh.shape[axis]

    def put(x):
        x = np.asarray(x)
        local = n_dev // jax.process_count()
        if x.shape[0] % max(local, 1):
            raise InvalidInputError(
                f"batch of {x.shape[0]} cannot be split evenly over {local} local devices; "
                f"use a batch size divisible by {local}"
            )
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh: Mesh | None = None):
    """Copy every array of ``tree`` to all devices of ``mesh`` (parameters, optimizer state)."""
    mesh = mesh or data_mesh()
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def batch_to_jax(batch, *, mean=None, std=None, mesh: Mesh | None = None, dtype=np.float32):
    """A ``tttlab.core.benchmark.Batch`` -> sharded ``(images, labels)``."""
    x = to_float(batch.images, mean=mean, std=std, dtype=dtype)
    return shard((x, np.asarray(batch.labels, np.int32)), mesh)
