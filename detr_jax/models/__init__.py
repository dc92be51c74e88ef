"""The detectors and their parts: backbone, position encodings, transformer, heads, the panoptic
mask head, the official initialisers and post-processing. `families.py` builds them by name."""
