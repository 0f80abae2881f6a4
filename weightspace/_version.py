"""The package version, in a module of its own so that nothing imports the package root to learn it."""

__all__ = ["__version__"]

__version__ = "0.1.0"
