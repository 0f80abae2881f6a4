"""One exception family: every user-facing failure names the file and, where there is one, the key."""
from __future__ import annotations


class WeightspaceError(Exception):
    """Base class of every error weightspace raises on bad input."""


class CheckpointError(WeightspaceError):
    """A checkpoint cannot be read: missing, truncated, corrupt, or holds no tensors."""


class SourceError(WeightspaceError):
    """A source string cannot be resolved: unknown scheme, missing Hub file, offline cache miss."""


class UnsafeCheckpoint(CheckpointError):
    """A pickle needs more than tensors to load and was refused."""


class IncompatibleCheckpoints(WeightspaceError):
    """Checkpoints disagree on keys, shapes or dtype kinds."""


class NonFiniteError(WeightspaceError):
    """An input tensor holds NaN or Inf."""


class OutputExists(WeightspaceError):
    """The output path exists and --force was not given."""


class ConfigError(WeightspaceError):
    """Bad options or configuration (a model spec, a data spec, a recipe)."""


def key_sample(keys: list[str], n: int = 3) -> str:
    """'2 keys (e.g. 'a', 'b')': how an error names a set of keys without flooding the line."""
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} (e.g. {shown}{', ...' if len(keys) > n else ''})"


class DataError(ConfigError):
    """Evaluation data cannot be used: an unreadable image, a class map that does not fit the model.

    ``path`` names the file (an image, a map file, a cache entry) where there is one."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path
