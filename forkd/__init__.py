"""forkd: a pre-fork process manager for Python WSGI and ASGI apps."""

__version__ = "0.1.0"
__all__ = ["__version__"]
