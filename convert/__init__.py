"""Checkpoint -> HLWQ GGUF conversion (`hlwq-gguf convert`)."""
from .pipeline import ConversionOptions, ConversionReport, convert_checkpoint
from .source import ConversionError

__all__ = ["ConversionError", "ConversionOptions", "ConversionReport", "convert_checkpoint"]
