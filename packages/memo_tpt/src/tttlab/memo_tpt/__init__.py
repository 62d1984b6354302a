"""tttlab-memo-tpt: MEMO, TPT (CLIP test-time prompt tuning) and their ensemble (seed 002)."""

__version__ = "0.1.0"
