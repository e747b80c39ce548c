"""Which ggml type each tensor gets: the pure HLWQ types and the mixed recipes.

These rules mirror llama.cpp's llama-quant.cpp as patched by ggml_patch/ (tensor_allows_quantization,
llama_tensor_get_type_hlwq, tensor_type_fallback), so that `hlwq-gguf convert` and `llama-quantize` produce the
same type for every tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import codec
from .typetable import FILE_TYPE_OF_RECIPE


@dataclass(frozen=True)
class Recipe:
    name: str
    ftype: int  # llama_ftype written to general.file_type
    base_bits: int
    # tensor categories (see tensor_category) that get `more_bits`
    more_bits_for: tuple[str, ...] = ()
    more_bits: int = 6
    description: str = ""


RECIPES: dict[str, Recipe] = {
    "hlwq3": Recipe("hlwq3", FILE_TYPE_OF_RECIPE["hlwq3"], 3, description="3-bit HLWQ everywhere (3.125 bpw)"),
    "hlwq4": Recipe("hlwq4", FILE_TYPE_OF_RECIPE["hlwq4"], 4, description="4-bit HLWQ everywhere (4.125 bpw)"),
    "hlwq5": Recipe("hlwq5", FILE_TYPE_OF_RECIPE["hlwq5"], 5, description="5-bit HLWQ everywhere (5.125 bpw)"),
    "hlwq6": Recipe("hlwq6", FILE_TYPE_OF_RECIPE["hlwq6"], 6, description="6-bit HLWQ everywhere (6.125 bpw)"),
    "hlwq5_m": Recipe(
        "hlwq5_m", FILE_TYPE_OF_RECIPE["hlwq5_m"], 5, more_bits_for=("attn_v", "ffn_down", "output"),
        description="HLWQ5 with HLWQ6 for attn_v, ffn_down and the output projection",
    ),
    "hlwq4_m": Recipe(
        "hlwq4_m", FILE_TYPE_OF_RECIPE["hlwq4_m"], 4, more_bits_for=("attn_v", "ffn_down", "output"),
        description="HLWQ4 with HLWQ6 for attn_v, ffn_down and the output projection",
    ),
}


def tensor_category(name: str) -> str:
    """The category llama-quantize's tensor_get_category() gives a GGUF tensor name (the subset recipes use).

    attn_v covers attn_v, attn_qkv and MLA's attn_kv_b (llama.cpp's category_is_attn_v); output is only the
    output projection itself, never attn_output.
    """
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    if any(part in name for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")):
        return "attn_v"
    if "ffn_down" in name:
        return "ffn_down"
    return "other"


# substrings of tensor names that llama.cpp never quantizes (tensor_allows_quantization)
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp would quantize this GGUF tensor at all (2-D/3-D weights that are not norms, routers...)."""
    # ggml_n_dims: trailing ggml dimensions of 1 (leading ones in numpy order) do not count, so a [1, n]
    # matrix such as Qwen's ffn_gate_inp_shexp is a vector to llama-quantize and stays unquantized
    leading_ones = next((i for i, d in enumerate(shape) if d != 1), len(shape))
    if len(shape) - leading_ones < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(fragment in name for fragment in _NEVER_QUANTIZED)


def tensor_type(recipe: Recipe, name: str, shape: tuple[int, ...], tied_embeddings: bool = False) -> str | None:
    """The ggml type name for a tensor (`shape` in numpy order, rows last), or None to keep it unquantized.

    Rows that are not a multiple of 128 use the 64-block variant at the same bit width; rows that are not a
    multiple of 64 fall back to q8_0 (or f16 below 32), as llama-quantize does.
    """
    if not allows_quantization(name, shape):
        return None
    category = tensor_category(name)
    bits = recipe.base_bits
    # with tied embeddings token_embd is the output projection too
    if category in recipe.more_bits_for or (tied_embeddings and category == "token_embd" and "output" in recipe.more_bits_for):
        bits = recipe.more_bits
    width = shape[-1]
    for block_size in (128, 64):
        if width % block_size == 0:
            return codec.block_type(bits, block_size).name.lower()
    return "q8_0" if width % 32 == 0 else "f16"
