"""Lossless import of the reference implementation's code checkpoints (shared/hlwq/fixtures/checkpoints).

Every miniature checkpoint converts; the GGUF's weights, decoded by the patched ggml, equal the reference's own
dequantization (the fixtures' expected/*.bf16 files); every block's codes are copied, not re-quantized; codeless
releases are refused; corrupted inputs fail in one line without an output file.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert import ConversionError, convert_checkpoint, polarquant
from hlwq_gguf import codec, gguf_types, runtime

# the whole reference set beside the checkout when there is one, else the subset every clone carries
# (tests/fixtures/reference/README.md)
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared/hlwq/fixtures"
REPO_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
FIXTURES = Path(os.environ.get("HLWQ_FIXTURES") or (SHARED_FIXTURES if SHARED_FIXTURES.is_dir() else REPO_FIXTURES))
CHECKPOINTS = FIXTURES / "checkpoints"
if not (CHECKPOINTS / "checkpoints.json").is_file():
    pytest.skip(f"HLWQ reference checkpoints not found at {CHECKPOINTS}", allow_module_level=True)


def _needs(*paths: Path):
    """Skip where the fixture set in use lacks a file (the in-repo subset has two of the seven import cases)."""
    __tracebackhide__ = True
    missing = [p for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"not in the fixture set at {FIXTURES}: {', '.join(p.name for p in missing)}")

safetensors_torch = pytest.importorskip("safetensors.torch")
gguf = gguf_types.register(pytest.importorskip("gguf"))

# folder, --codebook, expected file, table the GGUF types must carry
CASES = {
    "dot_v5_q5": ("dot_v5_q5", None, "dot_v5_q5.bf16", "A"),
    "quantizer_v5_mixed": ("quantizer_v5_mixed", None, "quantizer_v5_mixed.bf16", "A"),
    "quantizer_v4_mixed": ("quantizer_v4_mixed", None, "quantizer_v5_mixed.bf16", "A"),
    "pq_multi_PQ3": ("pq_multi", None, "pq_multi_PQ3.tableB.bf16", "B"),
    "pq_multi_PQ3_tableA": ("pq_multi/PQ3", "A", "pq_multi_PQ3.tableA_subset.bf16", "A"),
    "hlwq_q5": ("hlwq_q5", None, "hlwq_q5.tableA.bf16", "A"),
    "hlwq_q5_tableB": ("hlwq_q5", "B", "hlwq_q5.tableB_subset.bf16", "B"),
}


@pytest.fixture(scope="session")
def stand_in_tokenizer(tmp_path_factory) -> Path:
    """The fixtures carry no tokenizer; llama.cpp needs one with the model's 128 tokens (a SentencePiece BPE)."""
    spm = pytest.importorskip("sentencepiece")
    import random
    folder = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from his her an which are were this be or has had it "
             "not but their they one all also two first new more its other after time when who there year can been some "
             "into most only over than city may such where while between many during under both known later would about").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + "." for _ in range(3000)]
    (folder / "text.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "tok"), vocab_size=128,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return folder / "tok.model"


def _checkpoint(tmp_path: Path, folder: str, tokenizer: Path) -> Path:
    target = tmp_path / Path(folder).name
    _needs(CHECKPOINTS / folder)
    shutil.copytree(CHECKPOINTS / folder, target)
    for sub in [target, *[p.parent for p in target.glob("*/config.json")]]:
        shutil.copy(tokenizer, sub / "tokenizer.model")
    return target


def _model_config(source: Path) -> dict:
    """config.json of a checkpoint folder (PQ-Multi keeps it in the parent of its PQ*/ code folder)."""
    for folder in (source, source.parent, *source.glob("*")):
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text())
    raise AssertionError(f"no config.json at {source}")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows in the order its rope kernel pairs them (see LlamaModel.permute upstream)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _bf16(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even), as fp32 values."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return rounded.view(np.float32)


def _expected(name: str) -> dict[str, np.ndarray]:
    tensors = safetensors_torch.load_file(str(CHECKPOINTS / "expected" / f"{name}.safetensors"))
    return {k: v.float().numpy() for k, v in tensors.items()}


def _gguf_weights(path: Path, ggml) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        if type_name.startswith("HLWQ"):
            rows = np.asarray(t.data).reshape(-1, np.asarray(t.data).shape[-1])
            values = np.stack([ggml.dequantize(type_name, row, int(t.shape[0])) for row in rows])
        else:
            values = np.asarray(t.data, dtype=np.float32)
        out[t.name] = (type_name, values)
    return out, reader


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_imports_to_the_reference_weights(case, tmp_path, stand_in_tokenizer, ggml, llama_build):
    folder, codebook, expected_name, letter = CASES[case]
    _needs(CHECKPOINTS / "expected" / f"{expected_name}.safetensors")
    source = _checkpoint(tmp_path, folder, stand_in_tokenizer)
    out = tmp_path / "model.gguf"
    report = convert_checkpoint(source, out, quiet=True, codebook=codebook)
    assert report.import_format in ("dot", "quantizer", "pq_multi", "hlwq")

    # every coded tensor went in as its own codes: all blocks copied, nothing re-encoded
    assert report.imported_tensors and all(t["copied"] == t["blocks"] > 0 for t in report.imported_tensors)
    assert all(t["added_rel_rms"] == 0.0 for t in report.imported_tensors)

    weights, reader = _gguf_weights(out, ggml)
    assert reader.fields["hlwq.import.codebook"].contents() == polarquant.TABLE_LETTERS[letter]
    config = _model_config(source)
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected = _expected(expected_name)
    assert expected
    for hf_name, reference in expected.items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        type_name, ours = weights[gguf_name]
        assert type_name.endswith(f"_{letter}"), (gguf_name, type_name)
        if ".q_proj." in hf_name:
            reference = _permute(reference, n_head)
        elif ".k_proj." in hf_name:
            reference = _permute(reference, n_head_kv)
        assert ours.shape == reference.shape
        # the fixtures' criterion for BF16 expectations (GEMM vs butterfly sums may differ by one bf16 ulp)
        got = _bf16(ours)
        tolerance = 2.0**-7 * np.abs(reference) + 1e-6 * np.abs(reference).max()
        assert np.all(np.abs(got - reference) <= tolerance), gguf_name
        assert np.mean(got == reference) > 0.999, gguf_name

    # tensors the checkpoint kept unquantized: norms pass through unchanged
    kept = polarquant.load(polarquant.code_folder(source), codebook).plain["model.layers.0.input_layernorm.weight"]
    assert np.array_equal(weights["blk.0.attn_norm.weight"][1], kept.load_f32())

    # the patched libllama loads the file and decodes with the _A/_B kernels (random weights: EOS masked). Through
    # llama-cpp-python: llama-completion loses its whole output on some runs of a model this small (its log thread
    # is not flushed before a ~20 ms process exits; 3 of 10 runs of the fixture's own F32 GGUF printed nothing)
    llm = runtime.open_model(out, n_ctx=256)
    completion = llm.create_completion("The city of", max_tokens=8, temperature=0.0, repeat_penalty=1.0,
                                       logit_bias={llm.token_eos(): -1e9})
    assert completion["usage"]["completion_tokens"] == 8 and completion["choices"][0]["text"].strip()


def test_codes_and_norms_are_copied_bit_for_bit(tmp_path, stand_in_tokenizer):
    """The GGUF blocks of a tensor hold exactly the checkpoint's fp16 norms and codes (here v_proj, whose rows
    llama.cpp does not reorder)."""
    source = _checkpoint(tmp_path, "quantizer_v5_mixed", stand_in_tokenizer)
    out = tmp_path / "model.gguf"
    convert_checkpoint(source, out, quiet=True)
    imported = polarquant.load(source)
    reader = gguf.GGUFReader(out)
    for hf_name, gguf_name in (("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"),
                               ("model.layers.0.mlp.gate_proj.weight", "blk.0.ffn_gate.weight"),
                               ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                               ("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight")):
        weight = imported.coded[hf_name]
        tensor = next(t for t in reader.tensors if t.name == gguf_name)
        block_type = codec.BLOCK_TYPES[tensor.tensor_type.name]
        assert (block_type.bits, block_type.table) == (weight.bits, weight.table)
        d, codes = block_type.unpack_blocks(np.asarray(tensor.data).reshape(-1, block_type.type_size))
        assert np.array_equal(d.view(np.uint16), weight.norms().reshape(-1).view(np.uint16))
        assert np.array_equal(codes, weight.codes().reshape(-1, 128))


def test_reference_layouts_unpack_the_fixture_packings():
    """Each reader of a packed layout inverts the reference's own packer (vectors/packing.safetensors)."""
    packings = safetensors_torch.load_file(str(FIXTURES / "vectors" / "packing.safetensors"))
    for group in ("gauss", "pattern"):
        for bits in (2, 3, 4, 5, 6):
            codes = packings[f"{group}.b{bits}.codes"].numpy()
            n = codes.shape[1]
            if bits <= 4:
                nibble = packings[f"{group}.b{bits}.half_block_nibble"].numpy()
                assert np.array_equal(polarquant.unpack_half_block_nibbles(nibble, n), codes)
                msb = packings[f"{group}.b{bits}.msb_bitpacker"].numpy()
                assert np.array_equal(np.stack([polarquant.unpack_msb_stream(r, bits, n) for r in msb]), codes)
            if bits == 5:
                assert np.array_equal(polarquant.unpack_lsb_stream(packings[f"{group}.b5.q5_lsb"].numpy(), 5, n), codes)
                msb = packings[f"{group}.b5.q5_msb"].numpy()
                assert np.array_equal(np.stack([polarquant.unpack_msb_stream(r, 5, n) for r in msb]), codes)
            if bits == 6:
                msb = packings[f"{group}.b6.msb6_skill"].numpy()
                assert np.array_equal(np.stack([polarquant.unpack_msb_stream(r, 6, n) for r in msb]), codes)


def test_padded_rows_decode_exactly_and_are_trimmed(tmp_path):
    """A layer whose real width (320) is not a multiple of 128: the reader's dequantization equals the reference's
    (fixture weights_padded_16x320, table A, 5 bits) with the padded tail dropped."""
    vectors = safetensors_torch.load_file(str(FIXTURES / "vectors" / "weights_padded_16x320.safetensors"))
    codes, dequant = vectors["A5.codes"].numpy(), vectors["A5.dequant_f32"].numpy()
    folder = tmp_path / "padded"
    folder.mkdir()
    import torch
    safetensors_torch.save_file({"layer.codes": torch.from_numpy(codes.astype(np.int8)),
                                 "layer.norms": vectors["norms_f16"],
                                 "layer.ct": torch.from_numpy(codec.load_codebook(5, "reference_A").copy())},
                                str(folder / "model.safetensors"))
    (folder / "polar_config.json").write_text(json.dumps({"format": "polar_engine_v5", "layers": {"layer": {
        "in_features": 320, "out_features": 16, "in_f_padded": 384, "n_blocks": 3, "bits": 5, "block_size": 128}}}))
    weight = polarquant.load(folder).coded["layer.weight"]
    assert weight.shape == (16, 320) and weight.table == "reference_A"
    ours = weight.dequantize()
    assert np.abs(ours - dequant[:, :320]).max() <= 1e-6 * np.abs(dequant).max()


@pytest.mark.parametrize("folder", ["int4_only", "int4_only_hlwq_config"])
def test_codeless_int4_release_is_refused_unread(folder, tmp_path, monkeypatch):
    import pickle
    source = tmp_path / folder
    shutil.copytree(CHECKPOINTS / folder, source)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a pickle was opened"))
    out = tmp_path / "model.gguf"
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(source, out, quiet=True)
    message = str(err.value)
    assert "\n" not in message and "torchao INT4" in message and "fixture/tiny-llama-random" in message
    assert not out.exists() and not list(tmp_path.glob(".model.gguf*"))


def test_gptq_release_is_refused(tmp_path):
    source = tmp_path / "gptq"
    _needs(CHECKPOINTS / "source_bf16")
    shutil.copytree(CHECKPOINTS / "source_bf16", source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config["_name_or_path"] = "someone/base-model"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="gptq weights, not HLWQ codes; convert the base model someone/base-model"):
        convert_checkpoint(source, tmp_path / "model.gguf", quiet=True)


def _rewrite(path: Path, change) -> None:
    tensors = safetensors_torch.load_file(str(path))
    change(tensors)
    safetensors_torch.save_file(tensors, str(path))


def _truncate_packed(tensors):
    key = "model.layers.0.mlp.down_proj.weight__packed"
    tensors[key] = tensors[key][:-80].clone()


def _meta_disagrees(tensors):
    key = "model.layers.1.self_attn.k_proj.weight__meta"
    meta = tensors[key].clone()
    meta[1] += 1  # n_blocks: one more than the packed codes hold
    tensors[key] = meta


def _norms_wrong_shape(tensors):
    import torch
    key = "model.layers.0.self_attn.q_proj.norms"
    tensors[key] = torch.zeros((256, 3), dtype=torch.float16)


def _codes_out_of_range(tensors):
    key = "lm_head.codes"
    codes = tensors[key].clone()
    codes[3, 7] = 40  # a 5-bit table has 32 entries
    tensors[key] = codes


def _foreign_table(tensors):
    key = "model.layers.0.self_attn.v_proj.ct"
    tensors[key] = tensors[key] * 1.01


CORRUPTIONS = {
    "truncated packed tensor": ("hlwq_q5", "model.safetensors", _truncate_packed, "down_proj.weight__packed"),
    "meta disagrees with shapes": ("hlwq_q5", "model.safetensors", _meta_disagrees, "k_proj.weight__"),
    "norms of the wrong shape": ("dot_v5_q5", "model-00000-of-00001.safetensors", _norms_wrong_shape, "q_proj"),
    "code out of range": ("dot_v5_q5", "model-00000-of-00001.safetensors", _codes_out_of_range, "lm_head"),
    "unknown codebook": ("dot_v5_q5", "model-00000-of-00001.safetensors", _foreign_table, "neither the reference's table A nor B"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoints_fail_cleanly(case, tmp_path, stand_in_tokenizer):
    folder, file, change, needle = CORRUPTIONS[case]
    source = _checkpoint(tmp_path, folder, stand_in_tokenizer)
    _rewrite(source / file, change)
    out = tmp_path / "model.gguf"
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(source, out, quiet=True)
    message = str(err.value)
    assert "\n" not in message and needle in message and str(source) in message and "conversion failed" not in message
    assert not out.exists() and not list(tmp_path.glob(".model.gguf*"))


def test_a_stored_table_cannot_be_overridden(tmp_path, stand_in_tokenizer):
    source = _checkpoint(tmp_path, "dot_v5_q5", stand_in_tokenizer)
    with pytest.raises(ConversionError, match="stores table A; --codebook B would decode wrong weights"):
        convert_checkpoint(source, tmp_path / "model.gguf", quiet=True, codebook="B")


MOE_FAMILIES = {
    # family: (writer, GGUF expert tensor checked, its HF source(s), tensors expected to be re-encoded and why)
    "gemma4_moe": ("write_tiny_gemma4_moe", "blk.1.ffn_gate_up_exps.weight",
                   "model.language_model.layers.1.experts.gate_up_proj", {"ffn_down": "padded rows"}),
    "glm4_moe_lite": ("write_tiny_glm4_moe_lite", "blk.1.ffn_gate_exps.weight",
                      "model.layers.1.mlp.experts.{}.gate_proj.weight", {"attn_k_b": "rows re-laid"}),
}


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_experts_are_stacked_from_their_codes(family, tmp_path, smollm2_hf, ggml, llama_build):
    """MoE checkpoints coded per expert: 3-D parameters as `_e{i}` slices (Gemma-4-26B-A4B-like) or one tensor per
    expert (GLM-4.7-Flash-like) land in llama.cpp's stacked expert tensors with their codes copied. Rows llama.cpp
    cannot take block for block (Gemma's 704/2112-wide rows padded to 768/2176, GLM's kv_b split and transposed into
    k_b) are decoded exactly, trimmed and re-encoded, with the added error reported."""
    from hlwq_gguf.testing import tiny_seeds
    from hlwq_gguf.testing.reference_checkpoints import write_dot_checkpoint

    writer, gguf_name, hf_name, reencoded = MOE_FAMILIES[family]
    source = getattr(tiny_seeds, writer)(tmp_path / "hf", smollm2_hf)
    expected = write_dot_checkpoint(source, tmp_path / "pq")
    report = convert_checkpoint(tmp_path / "pq", tmp_path / "model.gguf", quiet=True)
    assert report.import_format == "dot"
    for entry in report.imported_tensors:
        kind = next((k for k in reencoded if f".{k}." in entry["name"] or f".{k}_exps." in entry["name"]), None)
        if kind is None:
            assert entry["copied"] == entry["blocks"] > 0 and entry["added_rel_rms"] == 0.0, entry
        else:
            assert entry["copied"] == 0 and reencoded[kind] in entry["reason"], entry
            # one more 5-bit rounding of already 5-bit weights: about the size of the first one, never zero
            assert 0.01 < entry["added_rel_rms"] < 0.08, entry
    assert any("exps" in e["name"] and e["copied"] == e["blocks"] for e in report.imported_tensors)

    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    assert tensor.tensor_type.name == "HLWQ5_A"
    n_experts, rows, cols = (int(v) for v in reversed(tensor.shape))
    reference = expected[hf_name] if "{}" not in hf_name else np.stack([expected[hf_name.format(e)] for e in range(n_experts)])
    data = np.asarray(tensor.data).reshape(n_experts * rows, -1)
    ours = np.stack([ggml.dequantize("HLWQ5_A", row, cols) for row in data]).reshape(n_experts, rows, cols)
    assert np.abs(ours - reference).max() <= 1e-6 * np.abs(reference).max()

    llm = runtime.open_model(tmp_path / "model.gguf", n_ctx=256)
    completion = llm.create_completion("The city of", max_tokens=4, temperature=0.0, repeat_penalty=1.0,
                                       logit_bias={llm.token_eos(): -1e9})
    assert completion["usage"]["completion_tokens"] == 4


def test_unquantized_tensors_follow_the_recipe_or_stay_bf16(tmp_path, stand_in_tokenizer):
    """hlwq_q5 keeps its embedding in BF16: a normal conversion codes it by the recipe (as a BF16 checkpoint would
    be), --keep-unquantized leaves it BF16, with the same values; the coded tensors are copied either way."""
    source = _checkpoint(tmp_path, "hlwq_q5", stand_in_tokenizer)
    types = {}
    for keep in (False, True):
        out = tmp_path / f"keep{keep}.gguf"
        report = convert_checkpoint(source, out, quiet=True, keep_unquantized=keep)
        assert all(t["copied"] == t["blocks"] > 0 for t in report.imported_tensors)
        reader = gguf.GGUFReader(out)
        types[keep] = {t.name: t for t in reader.tensors}
    assert types[False]["token_embd.weight"].tensor_type.name == "HLWQ5"
    kept = types[True]["token_embd.weight"]
    assert kept.tensor_type.name == "BF16"
    stored = polarquant.load(source).plain["model.embed_tokens.weight"].load_f32()
    values = (np.asarray(kept.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(values.reshape(stored.shape), stored)
    assert types[True]["blk.0.attn_norm.weight"].tensor_type.name == "F32"
