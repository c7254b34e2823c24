"""Batch video annotator: faces, 7 expression probabilities and valence/arousal per sampled frame."""

__version__ = "0.1.0"
