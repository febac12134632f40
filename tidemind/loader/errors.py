"""The loader's exception, shared by its modules."""


class CheckpointError(ValueError):
    """A model directory or file that cannot be read as a model; the message names the file and the fix."""
