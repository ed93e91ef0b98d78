"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class SuwenError(Exception):
    """Base for every error that names its input and says what went wrong, in one line."""


class InputError(SuwenError):
    """A file, image, question or manifest line that cannot be used."""


class IndexMissingError(SuwenError):
    """The named index does not exist in the data home."""


class IndexMismatchError(SuwenError):
    """An index was built with another encoder than the one configured now."""


class ModelError(SuwenError):
    """The model server failed, timed out, or returned something unusable."""


class StructuredOutputError(ModelError):
    """The model's JSON did not validate even after the repair attempt."""


class ServerError(SuwenError):
    """The managed vLLM server could not start or died."""


class IndexDamagedError(SuwenError):
    """An index's files are not what its manifest records (damaged, truncated, swapped, linked
    elsewhere) or not files Suwen wrote; refused before any parser reads them."""
