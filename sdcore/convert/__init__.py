"""Checkpoint conversion: readers (checkpoint.py, torch_pickle.py), original-format mapping
(original.py), and the converter that writes an sdcore model directory (convert.py)."""

from sdcore.convert.convert import convert

__all__ = ["convert"]
