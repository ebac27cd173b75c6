"""Errors a user can act on. The CLI and the service print their message, never a traceback."""


class SelavprError(Exception):
    """Base class: the message alone says what went wrong and what was expected."""


class CheckpointError(SelavprError):
    """A checkpoint is missing, unreadable, unsafe, of an unknown layout or of the wrong shapes."""


class ImageDecodeError(SelavprError):
    """An image is missing, empty, corrupt, truncated, of an unknown format or too large. `kind` says
    which, so that a service can answer with the right status."""

    EMPTY = "empty"
    MISSING = "missing"
    UNRECOGNISED = "unrecognised"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class DownloadError(SelavprError):
    """A named checkpoint could not be fetched: the host is unreachable, answered with an error, or sent
    something other than the expected file (wrong size or hash)."""
