"""The checkpoint error, apart from the code that needs torch, so the CLI can catch it cheaply."""


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for, or that must exist, cannot be used."""
