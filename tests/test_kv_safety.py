"""A low-bit HLWQ K cache never silently wrecks a model: layers whose key bias has outlier channels keep K at q8_0.

The rule reads the weights (hlwq_gguf.kvcache, and llama_kv_k_outlier_ratio in the KV cache patch). The model here is a
tiny llama with attention biases and one huge channel in layer 0's key bias, the shape of Qwen2's (Qwen2.5-Coder-1.5B:
layers 0, 1, 7, 15 score 29-2215, the rest under 4; docs/BENCHMARKS.md has its perplexities).
"""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from conftest import write_tiny_llama
from hlwq_gguf import kvcache, llama_tools, textdata
from hlwq_gguf import plan as planner


@pytest.fixture(scope="module")
def biased_llama(smollm2_hf, tmp_path_factory):
    """Two layers, head size 64; layer 0's key bias has one channel of 40 among values of about 0.1."""
    from convert.reference import reference_gguf

    work = tmp_path_factory.mktemp("kv-safety")
    rng = np.random.default_rng(0)
    head, heads, kv_heads = 64, 2, 1
    overrides = {}
    for layer in range(2):
        k_bias = (rng.standard_normal(kv_heads * head) * 0.1).astype(np.float32)
        if layer == 0:
            k_bias[7] = 40.0
        overrides[f"model.layers.{layer}.self_attn.k_proj.bias"] = k_bias
        overrides[f"model.layers.{layer}.self_attn.q_proj.bias"] = (rng.standard_normal(heads * head) * 0.1).astype(np.float32)
        overrides[f"model.layers.{layer}.self_attn.v_proj.bias"] = (rng.standard_normal(kv_heads * head) * 0.1).astype(np.float32)
    folder = write_tiny_llama(work / "hf", smollm2_hf, hidden=128, intermediate=320, layers=2, overrides=overrides)
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return reference_gguf(folder, work / "biased-f32.gguf", "f32")


def _completion_log(llama_build, model, *args, env=None) -> str:
    cmd = [llama_build.tool("llama-completion"), "-m", model, "-p", "hello", "-n", "2", "-no-cnv", "-fa", "on",
           "--no-warmup", "-v", *args]
    return llama_tools.run_tool(cmd, timeout=300, env=env)


def test_rule_finds_the_outlier_layer_in_python_and_llama_cpp(llama_build, biased_llama):
    ratios = kvcache.layer_ratios(biased_llama)
    assert set(ratios) == {0, 1}
    assert ratios[0] > 4 * kvcache.OUTLIER_LIMIT and ratios[1] < kvcache.OUTLIER_LIMIT / 10
    assert kvcache.safe_k_layers(biased_llama) == [0]

    log = _completion_log(llama_build, biased_llama, "-ctk", "hlwq4_64", "-ctv", "hlwq4_64")
    assert re.search(r"K stays q8_0 instead of hlwq4_64 in 1 of 2 layers \(0\)", log), log[-2000:]
    # llama.cpp's K buffer (the last context it creates; the memory estimate before it loads no weights): one
    # layer of q8_0 rows (34 bytes per 32 values), one of hlwq4_64 (34 per 64)
    def k_mib(log):
        return float(re.findall(r"K \(hlwq4_64\):\s+([0-9.]+) MiB", log)[-1])

    size = k_mib(log)
    forced = _completion_log(llama_build, biased_llama, "-ctk", "hlwq4_64", "-ctv", "hlwq4_64",
                             env={"LLAMA_KV_HLWQ_K_OUTLIER": "0"})
    assert "K stays" not in forced
    forced_size = k_mib(forced)
    assert size == pytest.approx(1.5 * forced_size, rel=0.02)
    # nothing is kept for a K type that is not HLWQ, nor for a model without key biases
    assert "K stays" not in _completion_log(llama_build, biased_llama, "-ctk", "q4_0", "-ctv", "q4_0")


def test_rule_keeps_attention_quality(llama_build, biased_llama, tmp_path):
    """KL divergence against the f16 cache: the kept layer takes most of what the forced 4-bit K loses."""
    text = textdata.measurement_text_file()
    base = tmp_path / "f16.kld"
    llama_tools.perplexity(llama_build, biased_llama, text, ctx=256, chunks=8, save_kld_base=base)

    def kld(env):
        cmd = [llama_build.tool("llama-perplexity"), "-m", biased_llama, "-f", text, "-c", "256", "--chunks", "8",
               "-fa", "on", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64", "--kl-divergence-base", base, "--kl-divergence"]
        log = llama_tools.run_tool(cmd, timeout=600, env=env)
        return float(re.search(r"Mean\s+KLD:\s+([0-9.e-]+)", log).group(1))

    kept, forced = kld(None), kld({"LLAMA_KV_HLWQ_K_OUTLIER": "0"})
    print(f"KLD hlwq4_64 with layer 0's K at q8_0 {kept}, forced hlwq4_64 {forced}")
    assert kept < 0.6 * forced


def test_no_layer_is_kept_without_key_biases(smollm2_f32_gguf):
    assert kvcache.layer_ratios(smollm2_f32_gguf) == {}
    assert kvcache.k_type_note(smollm2_f32_gguf, "hlwq4") is None


def test_cli_says_which_layers_and_plans_their_size(biased_llama):
    def plan(*args):
        return subprocess.run(["hlwq-gguf", "plan", str(biased_llama), "--vram", "1GiB", "--ctx", "4096", *args],
                              capture_output=True, text=True, timeout=300)

    safe = plan("--kv", "hlwq4")
    assert safe.returncode == 0, safe.stderr
    assert "K stays q8_0 instead of hlwq4 in layer 0 of biased-f32.gguf" in safe.stderr
    forced = plan("--kv", "hlwq4", "--kv-k", "hlwq4")
    assert forced.returncode == 0 and "K stays" not in forced.stderr

    def kv_bytes(out):
        size = re.search(r"KV cache \(4096 x [^)]*\)\s+([0-9.]+ \w+)", out).group(1)
        return planner.parse_size(size.replace(" ", ""))

    assert kv_bytes(safe.stdout) > kv_bytes(forced.stdout)
