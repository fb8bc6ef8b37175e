"""GetGoodTape's actors, their process runner and the ``getgoodtape`` command."""

#: the release (pyproject.toml reads it from here)
__version__ = "0.1.0"
