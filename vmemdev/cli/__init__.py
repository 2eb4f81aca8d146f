"""The command line: ``vmemdev serve``, ``vmemdev ctl``, ``vmemdev demo``."""

from .main import main

__all__ = ["main"]
