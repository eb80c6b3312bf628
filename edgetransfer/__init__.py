"""edgetransfer: adapt a pretrained CNN on-device, export it, and prove the exports agree."""

__version__ = "0.1.0"
