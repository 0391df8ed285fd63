"""ktproxy: a root-free successor to kt-connect's ktctl."""

__version__ = "0.1.0"
