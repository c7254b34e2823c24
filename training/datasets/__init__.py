"""Readers for the public release formats (Aff-Wild2, AffectNet, ExpW, AFEW-VA) and the streams.

Every reader returns ``list[Sample]`` in the Aff-Wild2 label space (``training.labels``); images
are only checked for existence here and decoded later by ``training.datasets.images``.
"""
