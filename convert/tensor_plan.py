"""Which ggml type each tensor of one conversion gets: the one place that decides it.

A TensorPlan combines the recipe (recipes.tensor_type: llama-quantize's rules), the per-tensor bit widths of a
`--target-bpw` allocation (convert/allocate.py) and, for an imported code checkpoint, whether a tensor keeps the
checkpoint's codes. Both conversion paths ask it: the checkpoint path (convert/_worker.py) for each tensor llama.cpp's
converter writes, the GGUF path (convert/requantize.py) for each tensor of the source file.
"""
from __future__ import annotations

from dataclasses import dataclass

from hlwq_gguf import codec, recipes


@dataclass(frozen=True)
class ImportDecision:
    """An imported tensor's type; `reason` None means its blocks are the checkpoint's codes, copied bit for bit,
    otherwise why it is re-encoded from their exact dequantization."""
    type_name: str
    reason: str | None


@dataclass
class TensorPlan:
    recipe: recipes.Recipe | None  # None: every tensor keeps its type (an equalized full-precision GGUF)
    tied_embeddings: bool = False
    bits_for: dict[str, int] | None = None  # tensor name -> HLWQ bits, overriding the recipe's width
    keep_unquantized: bool = False  # imported checkpoints: what the checkpoint left unquantized stays BF16

    def type_for(self, name: str, shape: tuple[int, ...]) -> str | None:
        """The ggml type name of a full-precision tensor (numpy-order `shape`), or None to keep its type."""
        if self.recipe is None:
            return None
        type_name = recipes.tensor_type(self.recipe, name, shape, tied_embeddings=self.tied_embeddings)
        if type_name is not None and self.bits_for and name in self.bits_for:
            type_name = recipes.tensor_type(recipes.Recipe("", 0, self.bits_for[name]), name, shape)
        return type_name

    def type_for_plain(self, name: str, shape: tuple[int, ...]) -> str | None:
        """An imported checkpoint's tensor that it stored unquantized: the recipe's type, or BF16 for a matrix with
        `keep_unquantized`."""
        if self.keep_unquantized and len(shape) >= 2:
            return "bf16"
        return self.type_for(name, shape)

    def type_for_imported(self, name: str, shape: tuple[int, ...], coded) -> ImportDecision:
        """An output tensor made of the checkpoint's coded matrices `coded` (objects with bits, table and
        in_features): their own HLWQ type when every block can come from the checkpoint unchanged, else the
        recipe's type (F16 where the recipe keeps it) and the reason."""
        kinds = {(w.bits, w.table, w.in_features % 128 == 0) for w in coded}
        if len(kinds) == 1 and next(iter(kinds))[2] and shape[-1] % 128 == 0 and shape[-1] == coded[0].in_features:
            bits, table, _ = kinds.pop()
            return ImportDecision(codec.block_type(bits, 128, table).name.lower(), None)
        reason = "padded rows" if not all(w.in_features % 128 == 0 for w in coded) else \
            "mixed bits" if len(kinds) > 1 else "rows re-laid by the model's converter"
        return ImportDecision(self.type_for(name, shape) or "f16", reason)
