"""End to end: a real model converted to HLWQ, loaded and run by llama.cpp and llama-cpp-python."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from convert import convert_checkpoint
from hlwq_gguf import gguf_stats, gguf_types, llama_tools, recipes, textdata


@pytest.fixture(scope="module")
def smollm2_hlwq5(smollm2_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("hlwq5") / "smollm2-hlwq5.gguf"
    report = convert_checkpoint(smollm2_hf, out, recipe="hlwq5", quiet=True)
    return out, report


def test_converted_file_layout(smollm2_hlwq5, smollm2_f32_gguf):
    path, report = smollm2_hlwq5
    gguf = gguf_types.register()
    reader = gguf.GGUFReader(str(path))
    reference = {t.name: t for t in gguf.GGUFReader(str(smollm2_f32_gguf)).tensors}
    assert {t.name for t in reader.tensors} == set(reference)
    recipe = recipes.RECIPES["hlwq5"]
    n_quantized = 0
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        expected = recipes.tensor_type(recipe, tensor.name, shape, tied_embeddings=True) or "f32"
        assert tensor.tensor_type.name.lower() == expected, tensor.name
        if expected.startswith("hlwq"):
            n_quantized += 1
            # the numpy dequantizer of the gguf registration decodes the stored codes near the source weights
            decoded = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            source = gguf.quants.dequantize(reference[tensor.name].data, reference[tensor.name].tensor_type)
            assert decoded.shape == source.shape
            rel = float(np.sum((decoded - source) ** 2) / np.sum(source ** 2))
            assert rel < 0.01, (tensor.name, rel)
    assert n_quantized == sum(report.tensor_types.values()) > 0
    # SmolLM2's 576-wide rows take the 64-block type; its 1536-wide ffn_down rows the 128-block one
    assert set(report.tensor_types) == {"hlwq5", "hlwq5_64"}
    fields = reader.fields
    assert fields["hlwq.codebook"].contents() == "lloyd_int8"
    assert fields["hlwq.codebook_fingerprint"].contents() == gguf_types.codebook_fingerprint()
    assert fields["general.file_type"].contents() == recipe.ftype
    stats = gguf_stats.gguf_stats(path)
    assert 5.125 <= stats.matrix_bpw <= 5.25


def test_llama_cpp_generates(llama_build, smollm2_hlwq5):
    path, _ = smollm2_hlwq5
    text = llama_tools.generate(llama_build, path, "The capital of France is", n_predict=16)
    assert "paris" in text.lower(), text


def test_llama_cpp_python_generates(smollm2_hlwq5):
    from hlwq_gguf import runtime

    path, _ = smollm2_hlwq5
    llm = runtime.open_model(path, n_ctx=256)
    out = llm("The capital of France is", max_tokens=16, temperature=0.0)
    assert "paris" in out["choices"][0]["text"].lower(), out


def test_kl_divergence_bound(llama_build, smollm2_hlwq5, smollm2_f32_gguf, tmp_path):
    """HLWQ5 against the F32 model on real text.

    Bound: llama.cpp's own 5-bit block type, Q5_0 on every matrix (--pure: 32-weight blocks fit every row, so
    no fallback muddles it, unlike the K-quants on SmolLM2's 576-wide rows), measured in the same run. Q5_0
    spends 5.5 bits per weight, HLWQ5 5.125-5.25; a sound HLWQ5 is no worse (measured on 8 chunks: KLD 0.112
    vs 0.132), while a broken kernel, codebook or scale gives several times more.
    """
    path, _ = smollm2_hlwq5
    text = textdata.measurement_text_file()
    base = tmp_path / "f32.kld"
    llama_tools.perplexity(llama_build, smollm2_f32_gguf, text, ctx=512, chunks=4, save_kld_base=base)
    q5_0 = llama_tools.llama_quantize(llama_build, smollm2_f32_gguf, tmp_path / "q5_0.gguf", "Q5_0", pure=True)
    assert q5_0.fallbacks == 0
    hlwq = llama_tools.perplexity(llama_build, path, text, ctx=512, chunks=4, kld_base=base)
    legacy = llama_tools.perplexity(llama_build, q5_0.output, text, ctx=512, chunks=4, kld_base=base)
    assert hlwq.kld_mean is not None and legacy.kld_mean is not None
    assert hlwq.kld_mean <= legacy.kld_mean, (hlwq, legacy)
    assert gguf_stats.gguf_stats(path).matrix_bpw < gguf_stats.gguf_stats(q5_0.output).matrix_bpw
    assert hlwq.same_top_p > 75.0


@pytest.mark.parametrize("recipe", ["hlwq5_m", "hlwq4_m"])
def test_llama_quantize_mixed_recipe_matches_converter(llama_build, smollm2_hf, smollm2_f32_gguf, tmp_path, recipe):
    """llama-quantize's HLWQ5_M/HLWQ4_M and the converter's recipe choose the same type for every tensor."""
    quantized = llama_tools.llama_quantize(llama_build, smollm2_f32_gguf, tmp_path / "q.gguf", recipe.upper())
    assert quantized.fallbacks == 0
    converted = convert_checkpoint(smollm2_hf, tmp_path / "c.gguf", recipe=recipe, quiet=True)
    gguf = gguf_types.register()
    types_q = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(quantized.output)).tensors}
    types_c = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(converted.output)).tensors}
    assert types_q == types_c
    assert "HLWQ6_64" in types_c.values() or "HLWQ6" in types_c.values()


def test_codebook_mismatch_is_refused(llama_build, smollm2_hlwq5, tmp_path):
    path, _ = smollm2_hlwq5
    data = bytearray(path.read_bytes())
    fingerprint = gguf_types.codebook_fingerprint().to_bytes(4, "little")
    key = b"hlwq.codebook_fingerprint"
    at = data.index(key) + len(key) + 4  # the value follows the key and its 4-byte type
    assert bytes(data[at:at + 4]) == fingerprint
    data[at:at + 4] = (gguf_types.codebook_fingerprint() ^ 1).to_bytes(4, "little")
    bad = tmp_path / "other-codebook.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(llama_tools.ToolError) as info:
        llama_tools.generate(llama_build, bad, "Hello", n_predict=2)
    assert "codebook" in str(info.value)


def test_dump_names_the_hlwq_types(smollm2_hlwq5):
    """`hlwq-gguf dump` is gguf-dump with the types registered: every quantized tensor is listed by its HLWQ name."""
    path, report = smollm2_hlwq5
    result = subprocess.run(["hlwq-gguf", "dump", "--no-tensors", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "hlwq.codebook" in result.stdout
    result = subprocess.run(["hlwq-gguf", "dump", str(path)], capture_output=True, text=True, check=True)
    listed = [line.split("|")[2].strip() for line in result.stdout.splitlines() if line.count("|") == 3]
    counts = {name.lower(): listed.count(name) for name in set(listed) if name.startswith("HLWQ")}
    assert counts == report.tensor_types


def test_memory_does_not_grow_with_model_size(smollm2_hf, tmp_path):
    """Streaming: a model with 12x the layers (same largest tensor) needs about the same converter memory.

    The two checkpoints differ by 115 MiB of float32 layers; holding converted tensors until the end would add
    all of it to the peak; streaming adds nothing but allocator noise (measured: +0.2 MiB over a 328 MiB peak).
    """
    from hlwq_gguf.testing.tiny_llama import write_tiny_llama

    peaks, sizes = {}, {}
    for layers in (2, 24):
        folder = write_tiny_llama(tmp_path / f"layers{layers}", smollm2_hf, hidden=256, intermediate=1536,
                                  layers=layers)
        sizes[layers] = (folder / "model.safetensors").stat().st_size
        report = convert_checkpoint(folder, tmp_path / f"layers{layers}.gguf", recipe="hlwq5", quiet=True)
        peaks[layers] = report.peak_anon_bytes
        shutil.rmtree(folder)
    growth = peaks[24] - peaks[2]
    assert peaks[2] > 0
    assert growth < 0.15 * (sizes[24] - sizes[2]), (peaks, sizes)
