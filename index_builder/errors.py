"""Index problems a user can act on."""

from __future__ import annotations

from model.errors import SelavprError


class IndexStoreError(SelavprError):
    """An index problem a user can act on."""


class IndexNotFound(IndexStoreError):
    pass


class BuildInProgress(IndexStoreError):
    pass


class CheckpointMismatch(IndexStoreError):
    """The index was built with another model or other settings than the one given."""
