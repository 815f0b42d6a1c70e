"""The project's version (as in pyproject.toml), at the bottom of the layers: the artifact cache
(runtime/cache.py) keys on it, and `dsr_compiler.__version__` is this value."""
VERSION = "0.1.0"

__all__ = ["VERSION"]
