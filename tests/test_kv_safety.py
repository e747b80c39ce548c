"""A low-bit HLWQ K cache never silently wrecks a model: layers whose key bias has outlier channels keep K at q8_0.

The rule reads the weights (hlwq_gguf.kvcache, and llama_kv_k_outlier_ratio in the KV cache patch). The model here is a
tiny llama with attention biases and one huge channel in layer 0's key bias, the shape of Qwen2's (Qwen2.5-Coder-1.5B:
layers 0, 1, 7, 15 score 29-2215, the rest under 4; docs/BENCHMARKS.md has its perplexities).
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from hlwq_gguf.testing.tiny_llama import write_tiny_llama
from hlwq_gguf import kvcache, llama_tools, textdata
from hlwq_gguf import plan as planner


def _write_biased(folder, smollm2_hf, architecture: str | None = None, outlier_channel: int = 7, qk_std: float = 0.0,
                  outlier: float = 40.0):
    """Two layers, head size 64; layer 0's key bias has one channel of `outlier` among values of about 0.1 (HF's channel 7
    turns with 39 at 0.08 rad per position after RoPE, which averages it out over a context; 63 turns with 31,
    the slowest pair, 1.4e-5 rad per position, like the biases of Qwen2's layers 0 and 1). qk_std: q/k weights of
    that spread instead of write_tiny_llama's 0.05, whose scores (std 0.3) leave attention nearly uniform, so that
    what a K code loses shows."""
    rng = np.random.default_rng(0)
    head, heads, kv_heads = 64, 2, 1
    overrides = {}
    for layer in range(2):
        k_bias = (rng.standard_normal(kv_heads * head) * 0.1).astype(np.float32)
        if layer == 0:
            k_bias[outlier_channel] = outlier
        overrides[f"model.layers.{layer}.self_attn.k_proj.bias"] = k_bias
        overrides[f"model.layers.{layer}.self_attn.q_proj.bias"] = (rng.standard_normal(heads * head) * 0.1).astype(np.float32)
        overrides[f"model.layers.{layer}.self_attn.v_proj.bias"] = (rng.standard_normal(kv_heads * head) * 0.1).astype(np.float32)
        if qk_std:
            for name, rows in (("q_proj", heads * head), ("k_proj", kv_heads * head)):
                overrides[f"model.layers.{layer}.self_attn.{name}.weight"] = \
                    (rng.standard_normal((rows, 128)) * qk_std).astype(np.float32)
    folder = write_tiny_llama(folder, smollm2_hf, hidden=128, intermediate=320, layers=2, overrides=overrides)
    config = json.loads((folder / "config.json").read_text())
    config["attention_bias"] = True
    if architecture == "qwen2":
        # the converter picks the model class from "architectures"; model_type stays llama because AutoTokenizer
        # would pick Qwen2's tokenizer class from it, whose hash of SmolLM2's vocabulary upstream does not know
        config["architectures"] = ["Qwen2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def biased_llama(smollm2_hf, tmp_path_factory):
    from convert.reference import reference_gguf

    work = tmp_path_factory.mktemp("kv-safety")
    return reference_gguf(_write_biased(work / "hf", smollm2_hf), work / "biased-f32.gguf", "f32")


@pytest.fixture(scope="module")
def slow_biased_llama(smollm2_hf, tmp_path_factory):
    """Layer 0's huge key-bias channel on the slowest RoPE pair; sharp attention (scores of std about 5)."""
    from convert.reference import reference_gguf

    work = tmp_path_factory.mktemp("kv-centering")
    return reference_gguf(_write_biased(work / "hf", smollm2_hf, outlier_channel=63, qk_std=0.2,
                                        outlier=160.0), work / "slow-f32.gguf", "f32")


@pytest.fixture(scope="module")
def biased_qwen2(smollm2_hf, tmp_path_factory):
    """The same weights as a Qwen2 checkpoint (NEOX RoPE: channel i pairs with i + 32)."""
    return _write_biased(tmp_path_factory.mktemp("kv-safety-qwen2") / "hf", smollm2_hf, "qwen2")


def _completion_log(llama_build, model, *args, env=None) -> str:
    cmd = [llama_build.tool("llama-completion"), "-m", model, "-p", "hello", "-n", "2", "-no-cnv", "-fa", "on",
           "--no-warmup", "-v", *args]
    return llama_tools.run_tool(cmd, timeout=300, env=env)


@pytest.mark.parametrize("neox", [False, True])
def test_center_is_the_mean_of_the_bias_after_rope(neox):
    """kvcache.center's closed form against RoPE applied position by position (pure numpy)."""
    rng = np.random.default_rng(1)
    head_dim, n_rot, n_pos, base = 64, 48, 300, 10000.0  # 16 channels RoPE does not turn
    bias = rng.standard_normal(2 * head_dim) * 10
    c, seen = kvcache.center(bias, head_dim, n_rot, base, n_pos, neox)
    rows = bias.reshape(2, head_dim)
    half = n_rot // 2
    i = np.arange(half)
    first, second = (i, i + half) if neox else (2 * i, 2 * i + 1)
    turned = np.repeat(rows[None], n_pos, axis=0)
    angle = np.arange(n_pos)[:, None] * base ** (-2.0 * i / n_rot)[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    b0, b1 = rows[None, :, first], rows[None, :, second]
    turned[:, :, first], turned[:, :, second] = b0 * cos - b1 * sin, b0 * sin + b1 * cos
    np.testing.assert_allclose(c, turned.mean(axis=0).reshape(-1), atol=1e-9)
    np.testing.assert_allclose(seen, ((turned - turned.mean(axis=0)) ** 2).mean(axis=0).reshape(-1), atol=1e-9)
    # channels RoPE does not turn: c = b, the cache sees nothing of their bias
    assert np.all(seen.reshape(2, head_dim)[:, n_rot:] == 0)


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


def _kld(llama_build, model, base, cache: str = "hlwq4_64", env=None, flash_attn: str = "on") -> float:
    """KL divergence of `model` with a `cache` K/V against the logits saved in `base` (ctx 256 x 8 chunks)."""
    text = textdata.measurement_text_file()
    cmd = [llama_build.tool("llama-perplexity"), "-m", model, "-f", text, "-c", "256", "--chunks", "8",
           "-fa", flash_attn, "-ctk", cache, "-ctv", cache, "--kl-divergence-base", base, "--kl-divergence"]
    log = llama_tools.run_tool(cmd, timeout=600, env=env)
    return float(re.search(r"Mean\s+KLD:\s+([0-9.e-]+)", log).group(1))


def _save_f16_cache_logits(llama_build, model, base):
    llama_tools.perplexity(llama_build, model, textdata.measurement_text_file(), ctx=256, chunks=8, save_kld_base=base)


def test_rule_keeps_attention_quality(llama_build, biased_llama, tmp_path):
    """KL divergence against the f16 cache: the kept layer takes most of what the forced 4-bit K loses."""
    base = tmp_path / "f16.kld"
    _save_f16_cache_logits(llama_build, biased_llama, base)
    kept, forced = _kld(llama_build, biased_llama, base), _kld(llama_build, biased_llama, base, env=_FORCE)
    print(f"KLD hlwq4_64 with layer 0's K at q8_0 {kept}, forced hlwq4_64 {forced}")
    assert kept < 0.6 * forced


_FORCE = {"LLAMA_KV_HLWQ_K_OUTLIER": "0"}


def test_key_smoothing_is_exact_and_lets_a_4_bit_cache_hold_k(llama_build, biased_qwen2, biased_llama, tmp_path):
    """convert/equalize.py's K smoothing (`--smooth-keys`): the same function in float, no layer left to keep at
    q8_0 without K centering, and a forced 4-bit K loses less than before."""
    from convert.reference import reference_gguf
    from convert.requantize import requantize_gguf

    plain, smoothed = tmp_path / "plain-f32.gguf", tmp_path / "smoothed-f32.gguf"
    reference_gguf(biased_qwen2, plain, "f32")
    stats = requantize_gguf(plain, smoothed, None, quiet=True, smooth_keys=True)
    assert stats["smoothed_layers"] == 2 and stats["equalized"] == 2 * 4  # q, k and their biases per layer
    assert kvcache.safe_k_layers(plain) == [0] and kvcache.safe_k_layers(smoothed) == []
    assert requantize_gguf(plain, tmp_path / "off.gguf", None, quiet=True)["smoothed_layers"] == 0  # opt-in
    # llama pairs RoPE channels 2i, 2i+1 in GGUF order (its converter permutes q/k rows): exact there too
    llama_smoothed = tmp_path / "llama-smoothed-f32.gguf"
    assert requantize_gguf(biased_llama, llama_smoothed, None, quiet=True, smooth_keys=True)["smoothed_layers"] == 2
    llama_base = tmp_path / "llama-f16.kld"
    _save_f16_cache_logits(llama_build, biased_llama, llama_base)
    assert _kld(llama_build, llama_smoothed, llama_base, cache="f16") < 1e-5

    base = tmp_path / "f16.kld"
    _save_f16_cache_logits(llama_build, plain, base)
    assert _kld(llama_build, smoothed, base, cache="f16") < 1e-5
    before, after = _kld(llama_build, plain, base, env=_FORCE), _kld(llama_build, smoothed, base, env=_FORCE)
    print(f"KLD forced hlwq4_64: {before} plain, {after} smoothed")
    assert after < 0.7 * before  # measured: 0.45x
    # K centering (on by default for a quantized K) does better without smoothing, and llama.cpp says so
    low_bit_k = ("-ctk", "hlwq4_64", "-ctv", "hlwq4_64")
    assert "K was smoothed (hlwq.smooth_keys)" in _completion_log(llama_build, smoothed, *low_bit_k)
    assert "K was smoothed" not in _completion_log(llama_build, plain, *low_bit_k)


def test_centering_is_exact_and_lets_a_4_bit_cache_hold_a_slow_bias(llama_build, slow_biased_llama, tmp_path):
    """The cache stores k - c (c: the key bias's mean after RoPE over the cache's positions, llama_kv_k_center): the
    same attention in float, and a bias on a slow RoPE pair no longer needs a q8_0 K."""
    model = slow_biased_llama
    assert kvcache.layer_ratios(model, n_ctx=None)[0] > 4 * kvcache.OUTLIER_LIMIT
    assert kvcache.layer_ratios(model, n_ctx=256)[0] < kvcache.OUTLIER_LIMIT / 10
    assert kvcache.safe_k_layers(model, n_ctx=256) == []

    log = _completion_log(llama_build, model, "-c", "256", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64")
    assert "K centered in 2 layers" in log and "K stays" not in log, log[-2000:]
    off = _completion_log(llama_build, model, "-c", "256", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64", env=_NO_CENTER)
    assert "K centered" not in off and re.search(r"K stays q8_0 instead of hlwq4_64 in 1 of 2 layers \(0\)", off)
    assert "K centered" not in _completion_log(llama_build, model, "-c", "256")  # an f16 cache stores K as is
    # the Python mirror centers for the cache llama.cpp makes, whose size is the asked context rounded up
    padded = _completion_log(llama_build, model, "-c", "1000", "-ctk", "hlwq4_64", "-ctv", "hlwq4_64")
    assert int(re.search(r"llama_context: n_ctx\s+=\s+(\d+)", padded).group(1)) == kvcache.centering(1000) == 1024

    # exact with an f32 cache and f32 attention (CPU flash attention rounds to f16 inside, and an uncentered bias of
    # 160 loses more there: KLD 2e-5 between the two, the centered one nearer the f32 result)
    f32_base = tmp_path / "f32.kld"
    llama_tools.perplexity(llama_build, model, textdata.measurement_text_file(), ctx=256, chunks=8,
                           save_kld_base=f32_base, extra=["-fa", "off", "-ctk", "f32", "-ctv", "f32"])
    exact = _kld(llama_build, model, f32_base, cache="f32", env={"LLAMA_KV_K_CENTER": "2"}, flash_attn="off")
    base = tmp_path / "f16.kld"
    _save_f16_cache_logits(llama_build, model, base)
    centered = _kld(llama_build, model, base, env=_FORCE)
    uncentered = _kld(llama_build, model, base, env={**_FORCE, **_NO_CENTER})
    print(f"KLD f32 cache centered {exact}; forced hlwq4_64 centered {centered}, not centered {uncentered}")
    assert exact < 1e-6
    assert centered < 0.3 * uncentered  # measured: 0.028 vs 0.178


_NO_CENTER = {"LLAMA_KV_K_CENTER": "0"}


def test_centered_cache_survives_a_context_shift(llama_build, slow_biased_llama):
    """A context shift re-ropes the cached keys: a centered K gets its center added back around RoPE, so with an
    f32 cache (LLAMA_KV_K_CENTER=2 centers it too) greedy generation across two shifts is the uncentered cache's."""
    cmd = [llama_build.tool("llama-completion"), "-m", slow_biased_llama, "-p", "Once upon a time", "-c", "256",
           "-n", "600", "--temp", "0", "-no-cnv", "--no-warmup", "--ignore-eos", "-fa", "off", "-ctk", "f32",
           "-ctv", "f32", "--context-shift", "-v", "-t", llama_tools.default_threads()]

    def generate(env):
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=600, env={**os.environ, **env})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, done.stderr

    (centered, log), (plain, _) = generate({"LLAMA_KV_K_CENTER": "2"}), generate(_NO_CENTER)
    assert "K centered in 2 layers" in log
    assert len(plain) > 1000 and centered == plain


def test_key_smoothing_is_opt_in_and_takes_the_gguf_path(biased_qwen2, tmp_path):
    from convert import convert_checkpoint
    from hlwq_gguf import gguf_types

    gguf = gguf_types.register()
    smoothed, plain = tmp_path / "smoothed.gguf", tmp_path / "plain.gguf"
    assert convert_checkpoint(biased_qwen2, smoothed, "hlwq5", quiet=True, smooth_keys=True).smoothed_layers == 2
    assert convert_checkpoint(biased_qwen2, plain, "hlwq5", quiet=True).smoothed_layers == 0
    readers = [gguf.GGUFReader(str(p)) for p in (smoothed, plain)]
    a, b = ({t.name: np.array(t.data) for t in r.tensors} for r in readers)
    assert not np.array_equal(a["blk.0.attn_k.bias"], b["blk.0.attn_k.bias"])
    np.testing.assert_array_equal(a["blk.0.attn_v.bias"], b["blk.0.attn_v.bias"])
    assert [r.fields["hlwq.smooth_keys"].contents() if "hlwq.smooth_keys" in r.fields else None for r in readers] == \
        ["weights", None]


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
    assert "that RoPE turns too fast to center over 4096 positions" in safe.stderr  # HF channel 7: 0.08 rad/position
    forced = plan("--kv", "hlwq4", "--kv-k", "hlwq4")
    assert forced.returncode == 0 and "K stays" not in forced.stderr

    def kv_bytes(out):
        size = re.search(r"KV cache \(4096 x [^)]*\)\s+([0-9.]+ \w+)", out).group(1)
        return planner.parse_size(size.replace(" ", ""))

    assert kv_bytes(safe.stdout) > kv_bytes(forced.stdout)


def test_kv_bench_scores_smoothed_weights_against_the_plain_f16_cache(llama_build, tmp_path):
    """`hlwq-gguf bench --kv` variants with the +sk suffix run on K-smoothed weights (+km: with measured mean keys); on SmolLM2 (llama, RoPE on
    adjacent channel pairs, no key biases) the smoothed weights with an f16 cache compute the plain ones' function."""
    from hlwq_gguf import kvbench

    result = kvbench.run_kv_bench("smollm2-135m", tmp_path, variants=("f16+sk", "hlwq4", "hlwq4+sk", "hlwq4+km"),
                                  ctx=256, chunks=2, rounds=0, log=lambda *_: None)
    rows = {r.name: r for r in result.results}
    assert list(rows) == ["f16", "f16+sk", "hlwq4", "hlwq4+sk", "hlwq4+km"]
    # +km: the same weights with their mean keys measured, which llama.cpp centers K on (tests/test_kv_calibration.py)
    assert rows["hlwq4+km"].kld_mean < rows["hlwq4"].kld_mean and "Q8_0-kmean.gguf" in result.weights
    # Q8_0's block scales absorb the row scales up to their f16 rounding, which SmolLM2's attention notices:
    # rescaling every q/k row by a uniform 1.37 moves its Q8_0 KLD by 0.0041 (measured); in float it is 1e-6
    assert rows["f16+sk"].kld_mean < 0.01
    assert rows["hlwq4"].kld_mean > 3 * rows["f16+sk"].kld_mean
    assert "Q8_0-smoothK.gguf" in result.weights
    assert "| hlwq4+sk |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown KV variant 'hlwq9\\+sk'"):
        kvbench.run_kv_bench("smollm2-135m", tmp_path, variants=("hlwq9+sk",))
