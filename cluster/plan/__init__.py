"""Pure arithmetic of the mesh: no Ray, no processes (cluster/__init__.py)."""
