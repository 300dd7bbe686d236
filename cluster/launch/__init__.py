"""Ray: the actor mesh, its placement groups and the session (cluster/__init__.py)."""
