"""evomerge: search the best way to merge fine-tuned models."""

__version__ = "0.1.0"
