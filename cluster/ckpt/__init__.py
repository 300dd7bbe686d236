"""Checkpoints, storage and export (cluster/__init__.py)."""
