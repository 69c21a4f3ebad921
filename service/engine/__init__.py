"""The engine: one process per device that owns the model session(s) and batches the images of
every front process; the fronts reach it through ``protocol`` (Unix socket + shared memory)."""
