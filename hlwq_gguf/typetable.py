"""The one table of HLWQ's ggml types and file types: their ids, block sizes, bit widths and codebooks.

Everything else follows it. In Python: `gguf_types` (registration into gguf-py), `recipes` (the ftypes written
to general.file_type), `plan` (the KV-cache types). In the patches: the rows of ggml.h (`ggml_type`,
`ggml_ftype`), llama.h (`llama_ftype`) and gguf-py's constants.py, and docs/TYPES.md, which
`python scripts/gen_codebook_tables.py types --tree <patched llama.cpp>` writes from this table
(`--check` compares; tests/test_type_table.py runs it).

The ids continue the pinned upstream's enums, so `GGML_TYPE_COUNT` grows by exactly the number of HLWQ types and
every array indexed by type stays dense. The price: an upstream type added after b11312 takes the same id, so a
llama.cpp newer than the pin needs the table renumbered.
"""
from __future__ import annotations

from dataclasses import dataclass

# b11312's GGML_TYPE_COUNT, one past its last ggml_ftype (MOSTLY_Q2_0 = 28) and past its last llama_ftype
# (LLAMA_FTYPE_MOSTLY_Q2_0 = 41)
UPSTREAM_GGML_TYPE_COUNT = 43
UPSTREAM_GGML_FTYPE_END = 29
UPSTREAM_LLAMA_FTYPE_END = 42
# the ids of format v2's first release (ggml types 100-121, ftypes 100-105): scripts/renumber_hlwq_types.py
# rewrites files that carry them
LEGACY_GGML_TYPE_IDS = {
    "HLWQ3": 100, "HLWQ4": 101, "HLWQ5": 102, "HLWQ6": 103, "HLWQ3_64": 104, "HLWQ4_64": 105, "HLWQ5_64": 106,
    "HLWQ6_64": 107, "HLWQ3_A": 108, "HLWQ4_A": 109, "HLWQ5_A": 110, "HLWQ6_A": 111, "HLWQ3_B": 112, "HLWQ4_B": 113,
    "HLWQ5_B": 114, "HLWQ6_B": 115, "Q8_HLWQ": 120, "Q8_HLWQ_64": 121,
}
LEGACY_FILE_TYPE_IDS = {"MOSTLY_HLWQ3": 100, "MOSTLY_HLWQ4": 101, "MOSTLY_HLWQ5": 102, "MOSTLY_HLWQ6": 103,
                        "MOSTLY_HLWQ5_M": 104, "MOSTLY_HLWQ4_M": 105}

CODEBOOK_OF_TABLE_LETTER = {"": "lloyd_int8", "A": "reference_A", "B": "reference_B"}


@dataclass(frozen=True)
class GGMLType:
    """One ggml type: an HLWQ weight/KV type (fp16 scale + codes) or an activation type (fp32 scale + int8)."""
    name: str         # as in GGML_TYPE_<name> and gguf-py's GGMLQuantizationType
    id: int
    block_size: int
    bits: int
    codebook: str     # hlwq_gguf/data/codebooks.json table; "" for the int8 activation types
    note: str = ""    # the comment on its enum row

    @property
    def is_activation(self) -> bool:
        return not self.codebook

    @property
    def type_size(self) -> int:
        return 4 + self.block_size if self.is_activation else 2 + self.block_size * self.bits // 8

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


@dataclass(frozen=True)
class FileType:
    """One llama_ftype (general.file_type), and the llama-quantize / `hlwq-gguf convert` recipe that writes it."""
    name: str         # as in LLAMA_FTYPE_<name> and gguf-py's LlamaFileType
    id: int
    recipe: str
    note: str = "except 1d tensors"
    ggml_ftype_id: int | None = None  # the ggml_ftype of a single-type file


def _ggml_types() -> list[GGMLType]:
    rows: list[tuple[str, int, int, str, str]] = []
    for block_size, suffix, note in ((128, "", "128 weights: fp16 scale + Lloyd-Max codes of the Hadamard-rotated block"),
                                     (64, "_64", "64-weight blocks: rows that are not a multiple of 128, the KV cache")):
        rows += [(f"HLWQ{bits}{suffix}", block_size, bits, "lloyd_int8", note if bits == 3 else "") for bits in range(3, 7)]
    for letter in ("A", "B"):
        note = f"the reference implementation's codebook {letter} (lossless import)"
        rows += [(f"HLWQ{bits}_{letter}", 128, bits, CODEBOOK_OF_TABLE_LETTER[letter], note if bits == 3 else "")
                 for bits in range(3, 7)]
    rows += [("Q8_HLWQ", 128, 8, "", "activations rotated per 128-block, int8 (vec_dot_type of the HLWQ types)"),
             ("Q8_HLWQ_64", 64, 8, "", "")]
    return [GGMLType(name, UPSTREAM_GGML_TYPE_COUNT + i, block, bits, codebook, note)
            for i, (name, block, bits, codebook, note) in enumerate(rows)]


GGML_TYPES: list[GGMLType] = _ggml_types()
GGML_TYPE_COUNT = UPSTREAM_GGML_TYPE_COUNT + len(GGML_TYPES)

FILE_TYPES: list[FileType] = [
    FileType(f"MOSTLY_HLWQ{bits}", UPSTREAM_LLAMA_FTYPE_END + i, f"hlwq{bits}", ggml_ftype_id=UPSTREAM_GGML_FTYPE_END + i)
    for i, bits in enumerate(range(3, 7))
] + [
    FileType("MOSTLY_HLWQ5_M", UPSTREAM_LLAMA_FTYPE_END + 4, "hlwq5_m", "HLWQ5 with HLWQ6 for attn_v, ffn_down and output"),
    FileType("MOSTLY_HLWQ4_M", UPSTREAM_LLAMA_FTYPE_END + 5, "hlwq4_m", "HLWQ4 with HLWQ6 for attn_v, ffn_down and output"),
]

GGML_TYPE_IDS: dict[str, int] = {t.name: t.id for t in GGML_TYPES}
FILE_TYPE_IDS: dict[str, int] = {f.name: f.id for f in FILE_TYPES}
FILE_TYPE_OF_RECIPE: dict[str, int] = {f.recipe: f.id for f in FILE_TYPES}
# the KV-cache types llama.cpp accepts for -ctk/-ctv (the 64-blocks fit every head size that is a multiple of 64)
KV_CACHE_TYPES: list[GGMLType] = [t for t in GGML_TYPES if t.block_size == 64 and not t.is_activation]
