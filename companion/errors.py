"""Exceptions shared by several modules (kept here so that no module imports another just for an error type)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model/optimizer it is loaded into.

    The message names the file and lists the mismatch (missing, unexpected and mis-shaped keys)."""
