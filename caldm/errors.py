"""The one error family that commands turn into a single clear line and a non-zero exit."""

from __future__ import annotations


class CaldmError(Exception):
    """Base of every user-facing error; its message is one line that names the file or key."""


class ConfigError(CaldmError, ValueError):
    """A bad config key, value, preset or config file."""


class DataError(CaldmError):
    """Bad or missing input data: a corrupt, truncated or mis-shaped file, NaN, a missing label."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")

    def __reduce__(self):  # picklable across Ray processes despite the two-argument init
        return (type(self), (self.url, self.problem))


class BundleError(CaldmError):
    """A model bundle or checkpoint that lacks a module, or belongs to another stage or preset."""
