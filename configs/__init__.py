"""Checkpoint and preprocessing metadata as data: one JSON file per model family (read by wszoo.registry)."""
