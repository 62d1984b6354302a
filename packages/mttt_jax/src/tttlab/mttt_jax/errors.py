"""Errors of tttlab.mttt_jax (subclasses of the core's user-facing errors)."""

from __future__ import annotations

from tttlab.core.errors import CheckpointError, ConfigError, InvalidInputError

__all__ = ["CheckpointError", "InvalidInputError", "MTTTConfigError"]


class MTTTConfigError(ConfigError):
    """An MTTT option (``inner.*``, model size, batch split) has an invalid value."""
