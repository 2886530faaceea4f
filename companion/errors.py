"""Exceptions shared by several modules (kept here so that no module imports another just for an error type)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model/optimizer it is loaded into.

    The message names the file and lists the mismatch (missing, unexpected and mis-shaped keys)."""


class UsageError(ValueError):
    """Bad command-line input found only after parsing (a config file that does not load, values that do not fit
    together, a device that is not there). ``python -m companion`` reports it the way argparse reports a bad flag:
    the usage, one ``error:`` line naming the value, exit status 2, no traceback."""
