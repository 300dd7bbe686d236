"""What runs inside each actor (cluster/__init__.py)."""
