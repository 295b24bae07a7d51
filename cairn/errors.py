"""Errors that carry meaning. A UserError is the user's to fix: the CLI prints it on one line and exits 2,
the server turns it into a 4xx in OpenAI's error shape."""

from __future__ import annotations


class CairnError(Exception):
    """Base of every error cairn raises on purpose."""


class UserError(CairnError):
    """Bad input: a path, a file, a parameter. The message says what was wrong and what to do."""

    code: str = "invalid_request_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class ModelLoadError(UserError):
    """A model directory is missing, incomplete or corrupt."""

    code = "model_load_error"


class UnsupportedModelError(UserError):
    """The checkpoint uses an architecture or option cairn does not implement."""

    code = "unsupported_model"


class ContextLengthError(UserError):
    """Prompt plus requested tokens do not fit the model's context."""

    code = "context_length_exceeded"


class EngineClosedError(CairnError):
    """The engine was shut down while a request was pending."""


class GenerationError(CairnError):
    """Generating failed for a reason that is not the user's (a bug or a device failure); the cause is chained."""


class CapacityError(UserError):
    """The devices available cannot hold the model; retry when capacity returns (the server answers 503)."""

    code = "insufficient_capacity"


class WorkerLostError(CairnError):
    """A process working for cairn on a pool device died or left (its node was lost)."""
