"""The package's version, owned by the client so that it imports nothing above it
(``strictconsume.__version__`` is this one; pyproject.toml holds the same)."""

__version__ = "0.1.0.dev0"
