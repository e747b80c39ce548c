"""Measured mean keys (hlwq_gguf.kvcalib, `blk.N.attn_k_mean`) and the K centering llama.cpp does with them.

The means are checked against SmolLM2's HF model run in torch on the same tokens; the centering is checked to be
exact in float (an f32 cache) and to cut a 4-bit K's KL divergence on the real model.
"""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from hlwq_gguf import gguf_files, kvcache, kvcalib, llama_tools, textdata

CHUNKS, CHUNK_TOKENS = 2, 128


@pytest.fixture(scope="module")
def calibrated(llama_build, smollm2_f32_gguf, tmp_path_factory):
    """SmolLM2-135M (F32) with its mean keys over 2 chunks of 128 tokens of the calibration text."""
    out = tmp_path_factory.mktemp("kv-calibration") / "smollm2-kmean.gguf"
    key_means = kvcalib.calibrate(smollm2_f32_gguf, out, chunks=CHUNKS, chunk_tokens=CHUNK_TOKENS, progress=False)
    return out, key_means


def test_mean_keys_are_the_hf_model_s(calibrated, smollm2_hf):
    """Every layer's mean of k_proj's output over the same tokens (BOS left out), in llama.cpp's channel order:
    the llama converter permutes each K head's rows so that RoPE turns adjacent channels, HF turns i with i + 32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, key_means = calibrated
    assert key_means.tokens == CHUNKS * (CHUNK_TOKENS - 1) and sorted(key_means.means) == list(range(30))
    assert sorted(kvcalib.read_key_means(path)) == list(range(30))

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    text = textdata.calibration_text_file().read_text(encoding="utf-8")
    ids = tokenizer(text[:20000], add_special_tokens=False).input_ids
    step = CHUNK_TOKENS - 1
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda _m, _i, out, il=il: outputs.setdefault(il, []).append(out[0, 1:].double()))
        for il, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for start in range(0, CHUNKS * step, step):
            model(torch.tensor([[model.config.bos_token_id, *ids[start:start + step]]]))
    for hook in hooks:
        hook.remove()
    head = model.config.head_dim
    for il, chunks in outputs.items():
        mean = torch.cat(chunks).mean(dim=0).numpy()
        in_gguf_order = mean.reshape(-1, 2, head // 2).transpose(0, 2, 1).reshape(-1)
        np.testing.assert_allclose(key_means.means[il], in_gguf_order, rtol=0, atol=2e-3 * np.abs(mean).max())
    assert max(np.abs(m).max() for m in key_means.means.values()) > 1.0  # keys share a large mean: what is centered


def test_centering_on_the_mean_is_exact_and_helps_a_4_bit_k(llama_build, calibrated, smollm2_f32_gguf, tmp_path):
    path, _ = calibrated
    text = textdata.measurement_text_file()

    def kld(model, base, cache, env=None, flash_attn="on"):
        return llama_tools.perplexity(llama_build, model, text, ctx=256, chunks=8, kld_base=base, env=env,
                                      extra=["-fa", flash_attn, "-ctk", cache, "-ctv", cache]).kld_mean

    f32_base = tmp_path / "f32.kld"
    llama_tools.perplexity(llama_build, smollm2_f32_gguf, text, ctx=256, chunks=8, save_kld_base=f32_base,
                           extra=["-fa", "off", "-ctk", "f32", "-ctv", "f32"])
    exact = kld(path, f32_base, "f32", env={"LLAMA_KV_K_CENTER": "2"}, flash_attn="off")
    f16_base = tmp_path / "f16.kld"
    llama_tools.perplexity(llama_build, smollm2_f32_gguf, text, ctx=256, chunks=8, save_kld_base=f16_base,
                           extra=["-fa", "on"])
    plain, centered = kld(smollm2_f32_gguf, f16_base, "hlwq4_64"), kld(path, f16_base, "hlwq4_64")
    print(f"KLD f32 cache centered on the mean {exact}; hlwq4_64 {plain} plain, {centered} centered on the mean")
    assert exact <= 2e-6  # llama-perplexity prints 6 decimals: measured 0.000001
    assert centered < 0.85 * plain  # measured: 0.0350 vs 0.0474 at ctx 2048 (docs/BENCHMARKS.md)

    log = llama_tools.run_tool([llama_build.tool("llama-completion"), "-m", path, "-p", "Hello", "-n", "2", "-no-cnv",
                                "--no-warmup", "-v", "-fa", "on", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64", "-c", "256"],
                               timeout=300)
    assert "K centered in 30 layers" in log and "K stays" not in log, log[-2000:]
    assert kvcache.safe_k_layers(path, n_ctx=256) == []  # the rule weighs what is left of the mean: nothing here


def test_recalibrating_replaces_the_means(calibrated, smollm2_f32_gguf, tmp_path):
    path, _ = calibrated
    assert kvcache.calibration_hint(path, "hlwq4_64") is None
    assert "kv-calibrate" in kvcache.calibration_hint(smollm2_f32_gguf, "hlwq4_64")
    again = tmp_path / "again.gguf"
    kvcalib.calibrate(path, again, chunks=1, chunk_tokens=64, progress=False)
    reader = gguf_files.read_gguf(again)
    names = [t.name for t in reader.tensors]
    assert names.count("blk.0.attn_k_mean") == 1 and len(names) == len(set(names))
    assert "over 63 tokens" in reader.fields[kvcalib.CALIBRATION_KEY].contents()


def test_bad_input_is_one_line_and_writes_nothing(llama_build, smollm2_f32_gguf, tmp_path):
    out = tmp_path / "out.gguf"
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    for model, text, message in ((tmp_path / "missing.gguf", None, r"missing\.gguf: no such file"),
                                 (garbage, None, r"garbage\.gguf: not a valid GGUF file"),
                                 (smollm2_f32_gguf, short, r"short\.txt: \d+ tokens, fewer than one chunk of 512")):
        done = subprocess.run(["hlwq-gguf", "kv-calibrate", str(model), str(out), *(["--text", str(text)] if text else [])],
                              capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and re.match(f"Error: .*{message}", lines[0]), done.stderr
        assert not out.exists() and not list(tmp_path.glob("*.partial"))
