"""Damaged HLWQ blocks in a GGUF are caught by llama.cpp's tensor validation (`--check-tensors`, which runs
ggml_validate_row_data on every tensor): a NaN or infinite block scale names the tensor and the block. A code
field cannot be invalid: every bit pattern of a b-bit field indexes the 2^b-entry codebook (tests/test_fuzz.py
dequantizes random blocks)."""
from __future__ import annotations

import subprocess

import pytest

from convert import convert_checkpoint
from hlwq_gguf import codec, gguf_types

from hlwq_gguf.testing.tiny_llama import write_tiny_llama

FP16_BITS = {"nan": 0x7E00, "+inf": 0x7C00, "-inf": 0xFC00}


@pytest.fixture(scope="module")
def tiny_hlwq5(tmp_path_factory, smollm2_hf, llama_build):
    root = tmp_path_factory.mktemp("validation")
    return convert_checkpoint(write_tiny_llama(root / "hf", smollm2_hf), root / "tiny.gguf", recipe="hlwq5",
                              quiet=True).output


def _load(build, model, check: bool) -> subprocess.CompletedProcess:
    cmd = [build.tool("llama-completion"), "-m", model, "-p", "Hello", "-n", "1", "--no-warmup", "-no-cnv", "-c", "256",
           "-t", "1", *(["--check-tensors"] if check else [])]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL, timeout=300)


def _with_block_scale(model, tmp_path, tensor_name: str, block: int, bits: int):
    import gguf

    gguf_types.register(gguf)
    tensor = next(t for t in gguf.GGUFReader(model).tensors if t.name == tensor_name)
    type_name = gguf.GGMLQuantizationType(int(tensor.tensor_type)).name
    type_size = codec.BLOCK_TYPES[type_name].type_size
    data = bytearray(model.read_bytes())
    at = int(tensor.data_offset) + block * type_size  # the block's fp16 scale leads it
    data[at:at + 2] = int(bits).to_bytes(2, "little")
    damaged = tmp_path / f"{tensor_name}-{block}.gguf"
    damaged.write_bytes(bytes(data))
    return damaged, type_name


def test_clean_file_passes_validation(tiny_hlwq5, llama_build):
    result = _load(llama_build, tiny_hlwq5, check=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("value", list(FP16_BITS))
@pytest.mark.parametrize("tensor_name, block", [("blk.0.ffn_up.weight", 17), ("blk.1.ffn_down.weight", 5),
                                                 ("token_embd.weight", 40000)])
def test_non_finite_block_scale_is_caught(tiny_hlwq5, llama_build, tmp_path, tensor_name, block, value):
    damaged, type_name = _with_block_scale(tiny_hlwq5, tmp_path, tensor_name, block, FP16_BITS[value])
    assert type_name.startswith("HLWQ")
    result = _load(llama_build, damaged, check=True)
    assert result.returncode != 0
    assert f"tensor '{tensor_name}' has invalid data" in result.stderr, result.stderr[-2000:]
    kind = "nan" if value == "nan" else "inf"
    assert f"found {kind} value at block {block}" in result.stderr
    # without the check the file loads: validation is what catches it
    assert _load(llama_build, damaged, check=False).returncode == 0
