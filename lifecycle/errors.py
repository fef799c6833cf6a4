"""Errors a user can act on: each message names the problem and the fix."""


class LifecycleError(Exception):
    """Base class: the CLI prints these without a traceback and exits 2."""


class ConfigError(LifecycleError):
    """A config value is missing, mistyped or out of range."""


class DataError(LifecycleError):
    """The corpus or the token shards cannot be used."""


class CheckpointError(LifecycleError):
    """A checkpoint cannot be loaded safely."""


class NonFiniteLossError(LifecycleError):
    """Training produced a NaN or infinite loss."""


class GateFailed(LifecycleError):
    """The evaluation gate rejected the candidate (every rule's result is in the run's manifest); the CLI exits 3."""
