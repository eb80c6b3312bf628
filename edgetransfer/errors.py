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
