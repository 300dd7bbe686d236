"""What the driver measures and shows (cluster/__init__.py)."""
