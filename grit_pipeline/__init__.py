"""grit-pipeline: GRIT-style grounded image-text corpora and a Kosmos-2 trainer."""

__version__ = "0.1.0"
