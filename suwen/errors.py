"""Errors a user can act on. The CLI prints their message as one line and exits with the code
of their kind (``ExitCode``), so a script can tell a bad input from a missing index or a model
that failed."""

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """How ``suwen`` ends: one code per kind of outcome (meanings below, in ``suwen --help``)."""

    OK = 0
    FAILED = 1
    INPUT = 2
    INDEX = 3
    MODEL = 4
    DOWNLOAD = 5
    INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.FAILED: "the job is not done: no answer, inputs that failed (listed), a failed check",
    ExitCode.INPUT: "a command-line value, file, image, question or setting cannot be used",
    ExitCode.INDEX: "an index is missing, built with another encoder, or damaged",
    ExitCode.MODEL: "a model could not be loaded, or its server failed or replied unusably",
    ExitCode.DOWNLOAD: "fetching models or data failed (re-run to resume)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); what was finished is kept",
}


class SuwenError(Exception):
    """Base for every error that names its input and says what went wrong, in one line."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


class NotDoneError(SuwenError):
    """The command ran, and its job is not done (no answer, questions or files that failed);
    what it did is printed or saved, and the message says what is missing."""


class InputError(SuwenError):
    """A file, image, question, option or manifest line that cannot be used."""

    exit_code = ExitCode.INPUT


class IndexUnusableError(SuwenError):
    """Base of the errors that leave an index unusable for this command."""

    exit_code = ExitCode.INDEX


class IndexMissingError(IndexUnusableError):
    """The named index does not exist in the data home."""


class IndexMismatchError(IndexUnusableError):
    """An index was built with another encoder than the one configured now."""


class IndexDamagedError(IndexUnusableError):
    """An index's files are not what its manifest records (damaged, truncated, swapped, linked
    elsewhere) or not files Suwen wrote; refused before any parser reads them."""


class ModelError(SuwenError):
    """The model server failed, timed out, or returned something unusable."""

    exit_code = ExitCode.MODEL


class StructuredOutputError(ModelError):
    """The model's JSON did not validate even after the repair attempt."""


class ServerError(SuwenError):
    """The managed vLLM server could not start or died."""

    exit_code = ExitCode.MODEL


class DownloadError(SuwenError):
    """A model or data file could not be fetched or verified."""

    exit_code = ExitCode.DOWNLOAD


class InterruptedRunError(SuwenError):
    """Ctrl-C stopped a long job; the message says what was kept and how to resume."""

    exit_code = ExitCode.INTERRUPTED
