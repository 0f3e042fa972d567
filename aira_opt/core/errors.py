"""Domain errors: what a user (of the CLI or the Python API) did wrong or must fix, in one line. They do not know
about the command line: the CLI turns each into its one-line `Error: ...` and exit code (cli.AiraGroup)."""

from __future__ import annotations


class AiraOptError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1  # what the CLI exits with

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OptionError(AiraOptError):
    """Options that do not fit together or do not fit the model: Click's usage exit code."""

    exit_code = 2


class ModelLoadError(AiraOptError):
    """A --model spec could not be resolved or loaded."""


class ArtifactExistsError(AiraOptError):
    """An output folder exists and --force was not given."""


class ExportFolderError(AiraOptError):
    """An export folder is missing files or does not follow the ONNX contract."""


class ValidationError(AiraOptError):
    """Numerical validation against PyTorch failed; the message lists every mismatch."""

    def __init__(self, mismatches: list[str], hint: str = ""):
        self.mismatches = mismatches
        super().__init__(f"validation failed ({len(mismatches)} mismatch(es)): " + "; ".join(mismatches)
                         + (f" ({hint})" if hint else ""))


class ProviderUnavailableError(AiraOptError):
    """An execution provider (CUDA, TensorRT) was asked for but is not installed."""


class MissingExtraError(AiraOptError):
    """An optional part (an exporter, a bench backend) needs a package extra that is not installed."""

    def __init__(self, what: str, extra: str, note: str = ""):
        super().__init__(f"{what} needs the `{extra}` extra: pip install 'aira-opt[{extra}]'" + (f" ({note})" if note else ""))


class DraftMismatchError(OptionError):
    """A draft model that cannot propose for this target: another tokenizer, vocabulary, or a shorter context."""


class PromptTooLongError(AiraOptError):
    """A prompt plus the requested new tokens does not fit the model's context."""


class TensorRTUnavailableError(AiraOptError):
    """TensorRT or an NVIDIA GPU is missing."""


class DiskFullError(AiraOptError):
    """The disk (or a file-size limit) ran out while writing an artifact."""


class UnexpectedError(AiraOptError):
    """Anything else that went wrong, shown as one line; `-v` shows the traceback."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every `finally` and cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
