"""The error hierarchy: every failure a user can cause is one of these, with a one-line message."""


class EdgeTransferError(Exception):
    """Base class; the CLI turns these into a one-line error and a non-zero exit."""


class DataError(EdgeTransferError):
    """The dataset folder or an image in it cannot be used."""


class ArchError(EdgeTransferError):
    """An unknown architecture name."""


class WeightsError(EdgeTransferError):
    """Weights cannot be found, downloaded, read safely or matched to the architecture."""


class ManifestError(EdgeTransferError):
    """An artifact has no valid edgetransfer manifest."""


class OutputExistsError(EdgeTransferError):
    """An output exists and --force was not given."""


class ExportError(EdgeTransferError):
    """A model could not be exported or failed its export-time check."""


class ParityError(EdgeTransferError):
    """Exported models do not answer like eager PyTorch within tolerance."""


class AccuracyMiss(ParityError):
    """fp32 parity holds, but a quantised or fp16 model lost more top-1 than its bound allows:
    verify's exit status 3, so a script can tell it from a broken export (1)."""

    exit_code = 3


class InputError(EdgeTransferError):
    """An input batch does not match what a model declares (shape or dtype)."""


class EdgeTransferWarning(UserWarning):
    """Something was skipped but the run can go on; the CLI prints it as one `Warning:` line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of `e`'s message (at most `limit` characters, printable), else its type
    name: what a one-line error quotes of a library's many-line exception."""
    text = str(e).strip()
    return printable(text.splitlines()[0][:limit]) if text else type(e).__name__


def printable(text: str) -> str:
    """`text` safe to print or write as UTF-8.

    File names that are not valid UTF-8 reach Python as lone surrogates ("\\udcff"), which
    make print() and UTF-8 encoding raise; they become a visible "\\xff" instead.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so temp files and folders are cleaned up on the
    way out as after Ctrl-C; the CLI ends it with exit 143 and one line. Here (not in cli.py)
    so the training loop, which handles the first SIGTERM itself, can raise it on a second."""
