"""The package version, in a module of its own: setup.cfg reads it without importing torch, and submodules that
record it (the teacher cache) need not import the package root."""

__version__ = "0.1.0"
