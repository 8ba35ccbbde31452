"""What is kept: the schema, the store, the per-worker writer, and the feedback it receives."""
