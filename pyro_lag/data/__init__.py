"""Data pipelines: text corpora and image arrays, served as seeded, resumable batch sources."""
from .batching import BatchSource, DataFileError, derive_seed, heldout_split
from .images import ImageBatches, load_images, split_images
from .text import TextBatches, TextCorpus, Vocabulary, num_tokens, read_sentences

__all__ = [
    "BatchSource",
    "DataFileError",
    "derive_seed",
    "heldout_split",
    "ImageBatches",
    "load_images",
    "split_images",
    "TextBatches",
    "TextCorpus",
    "Vocabulary",
    "num_tokens",
    "read_sentences",
]
