"""Checkpoint -> HLWQ GGUF conversion (`hlwq-gguf convert`)."""
from .hf import ConversionReport, convert_checkpoint
from .source import ConversionError

__all__ = ["ConversionError", "ConversionReport", "convert_checkpoint"]
