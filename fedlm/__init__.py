"""fedlm: train one language model across data silos without moving their text."""

from fedlm import threadsafe as _threadsafe

_threadsafe.install()

__version__ = "0.1.0"
