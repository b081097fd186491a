"""The package version, in a module of its own so that any stage can read it without importing
the front door (``hf_grass/__init__.py`` names every public class)."""

__version__ = "0.2.0"
