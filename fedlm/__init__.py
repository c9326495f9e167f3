"""fedlm: train one language model across data silos without moving their text."""

__version__ = "0.1.0"
