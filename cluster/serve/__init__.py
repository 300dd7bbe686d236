"""After training: serving the trained network (`python -m cluster.evaluate`, `cluster.predict`,
`cluster.infer`)."""
