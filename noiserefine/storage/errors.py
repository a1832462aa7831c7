"""Errors of the storage layer that callers tell apart (``retries.StorageUnavailable``: the store is down)."""


class VersionConflict(Exception):
    """A conditional write lost: ``create`` found the object there, or ``replace`` found it changed or gone."""


class BucketNotFoundError(ValueError):
    """The location's bucket does not exist (or these credentials cannot see it): a configuration error, never
    an empty cache."""
