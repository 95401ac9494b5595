"""uda: unsupervised domain adaptation experiments from the command line."""

__version__ = "0.1.0"
