"""Sizes of a GGUF file: parameters, bytes and bits per weight, overall and over the quantized matrices."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gguf_files

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class GGUFStats:
    path: Path
    file_bytes: int
    params: int
    matrix_params: int
    matrix_bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        """File bytes x 8 / parameter count (metadata and tokenizer included, as users see it)."""
        return self.file_bytes * 8 / self.params

    @property
    def matrix_bpw(self) -> float:
        """Bits per weight over the quantized matrices only."""
        return self.matrix_bytes * 8 / self.matrix_params if self.matrix_params else float("nan")


def gguf_stats(path: str | Path) -> GGUFStats:
    reader = gguf_files.header_reader(path)  # tensors only: the tokenizer arrays are slow to parse and not needed
    params = matrix_params = matrix_bytes = 0
    types: Counter[str] = Counter()
    for tensor in reader.tensors:
        n = int(tensor.n_elements)
        params += n
        type_name = tensor.tensor_type.name
        types[type_name] += 1
        if type_name not in _FLOAT_TYPES:
            matrix_params += n
            matrix_bytes += int(tensor.n_bytes)
    return GGUFStats(Path(path), Path(path).stat().st_size, params, matrix_params, matrix_bytes, dict(types))
