"""The package version (its own module, so that importing it never runs the plugin entry point)."""

__version__ = "0.1.0"
