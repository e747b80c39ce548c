"""A 3-bit HLWQ K calibrated per layer (hlwq.kv_k_bits, hlwq_gguf.kvbits): the choice, the sizes the planner
counts, what llama.cpp allocates for it, and that the measured choice beats its opposite."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from hlwq_gguf import kvbench, kvbits, kvcalib, kvcache, llama_tools, plan, textdata


def _layout(n_layer_all: int, cached: list[int], width: int = 192, k_bits: str = "") -> plan.ModelLayout:
    attention = [plan.AttentionLayer(il, width, width, False) for il in cached]
    return plan.ModelLayout(path=Path("model.gguf"), arch="llama", n_layer=n_layer_all, n_layer_all=n_layer_all,
                            n_embd=576, n_vocab=1000, n_head=9, n_ff=1536, n_expert=0, n_expert_used=0, n_ff_expert=0,
                            n_swa=0, head_dim_max=64, tied_output=True, tensors=[], attention=attention, k_bits=k_bits)


def test_the_3_bit_k_goes_where_it_costs_least():
    """Four cached layers of one width, V hlwq3_64 (3.25 bits): 3.5 bits per value leaves K 3.75 on average, so
    two of the four layers take 3.25 and they are the two cheapest; a layer without a cache (4) keeps the digit 4."""
    layout = _layout(5, [0, 1, 2, 4])
    costs = {0: 0.010, 1: -0.002, 2: 0.050, 4: 0.003}
    assert kvbits.choose(layout, costs, 3.5) == ("43443", 3.5)
    assert kvbits.choose(layout, costs, 3.25)[0] == "33343"
    assert kvbits.choose(layout, costs, 3.75)[0] == "44444"
    assert kvbits.choose(layout, costs, 3.6)[0] == "43443"  # one 3-bit layer gives 3.625: not enough
    with pytest.raises(kvbits.KBitsError, match="model.gguf: no mix"):
        kvbits.choose(layout, costs, 3.2)
    # a layer the outlier rule keeps at q8_0 (8.5 bits) takes budget the others must give up
    with pytest.raises(kvbits.KBitsError, match=r"3\.906"):
        kvbits.choose(layout, {0: 0.0, 1: 0.0, 4: 0.0}, 3.5, safe_k_layers=(2,))


def test_the_planner_counts_the_calibrated_k(monkeypatch):
    """A hlwq3_64 K on a file with digits: 3-bit rows (3 blocks of 26 bytes per 192 values) where the digit is 3,
    4-bit (34 bytes a block) where it is 4; other K types, LLAMA_KV_HLWQ_K_BITS=0 and malformed digits (which
    llama.cpp ignores) leave every layer as asked."""
    monkeypatch.delenv(kvbits.K_BITS_ENV, raising=False)
    cells = 256
    v_row, k3_row, k4_row = 3 * 26, 3 * 26, 3 * 34
    layout = _layout(4, [0, 1, 2, 3], k_bits="4334")
    calibrated = cells * (4 * v_row + 2 * k3_row + 2 * k4_row)
    assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3") == calibrated
    assert plan.kv_cache_bytes(layout, cells, "hlwq3_64", "hlwq3_64") == calibrated
    assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3", k_bits="") == cells * 4 * (v_row + k3_row)
    assert plan.kv_cache_bytes(layout, cells, "hlwq4", "hlwq3") == cells * 4 * (v_row + k4_row)
    assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3", safe_k_layers=(0,)) == \
        cells * (4 * v_row + 2 * k3_row + k4_row + 192 // 32 * 34)
    assert kvbench.layer_bits_per_value(layout, "hlwq3_64", "hlwq3_64") == pytest.approx((3.25 + 3.75) / 2)
    monkeypatch.setenv(kvbits.K_BITS_ENV, "0")
    assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3") == cells * 4 * (v_row + k3_row)
    monkeypatch.setenv(kvbits.K_BITS_ENV, "3333")
    assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3") == cells * 4 * (v_row + k3_row)
    for malformed in ("433", "43345", "4a34"):
        monkeypatch.delenv(kvbits.K_BITS_ENV)
        assert plan.kv_cache_bytes(_layout(4, [0, 1, 2, 3], k_bits=malformed), cells, "hlwq3", "hlwq3") == \
            cells * 4 * (v_row + k3_row)
        monkeypatch.setenv(kvbits.K_BITS_ENV, malformed)
        assert plan.kv_cache_bytes(layout, cells, "hlwq3", "hlwq3") == cells * 4 * (v_row + k3_row)


def _with_digits(source: Path, output: Path, digits: str) -> Path:
    bits = kvbits.LayerKBits(digits, 0.0, 0.0, {}, "test")
    kvcalib.write_key_means(source, output, kvcalib.KeyMeans({}, 0, "test"), bits)
    return output


def _cache_sizes(build, model: Path, env: dict | None = None) -> tuple[float, float, str]:
    """(K MiB, K+V MiB, log) of llama.cpp's hlwq3_64 cache of 256 cells for `model` (one sequence: -b 256, as
    llama-perplexity runs n_batch / n_ctx sequences at once)."""
    cmd = [build.tool("llama-perplexity"), "-m", model, "-f", textdata.measurement_text_file(), "-c", "256",
           "-b", "256", "--chunks", "1", "-t", llama_tools.default_threads(), "--no-warmup", "-fa", "on", "-ctk", "hlwq3_64",
           "-ctv", "hlwq3_64", "-lv", "4"]
    run = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", timeout=600,
                         env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    size = re.search(r"llama_kv_cache: size = +([0-9.]+) MiB .*K \(hlwq3_64\): +([0-9.]+) MiB", run.stderr)
    assert size, run.stderr[-3000:]
    return float(size.group(2)), float(size.group(1)), run.stderr


def test_llama_cpp_gives_each_layer_the_calibrated_k(llama_build, smollm2_q8, tmp_path, monkeypatch):
    """SmolLM2 (30 layers) with 10 digits 4: llama.cpp's K cache is the uniform 3-bit one plus 10/30 of the step to
    the uniform 4-bit one (both measured by llama.cpp itself), says so at info level, and the planner's K+V bytes
    are what it allocates; LLAMA_KV_HLWQ_K_BITS=0 and malformed digits give the uniform 3-bit cache, the latter
    with a warning."""
    monkeypatch.delenv(kvbits.K_BITS_ENV, raising=False)
    digits = "433" * 10
    calibrated = _with_digits(smollm2_q8, tmp_path / "calibrated.gguf", digits)
    k3, _, _ = _cache_sizes(llama_build, smollm2_q8)
    k4, _, _ = _cache_sizes(llama_build, smollm2_q8, {kvbits.K_BITS_ENV: "4" * 30})
    k_mixed, total, log = _cache_sizes(llama_build, calibrated)
    assert k4 > k3 * 1.25
    assert k_mixed == pytest.approx(k3 + (k4 - k3) * 10 / 30, abs=0.006)
    assert "K is hlwq3_64 in 20 and hlwq4_64 in 10 of these layers" in log
    assert total == pytest.approx(plan.kv_cache_bytes(plan.read_layout(calibrated), 256, "hlwq3", "hlwq3") / 2**20,
                                  abs=0.006)
    assert _cache_sizes(llama_build, calibrated, {kvbits.K_BITS_ENV: "0"})[0] == k3
    malformed = _with_digits(smollm2_q8, tmp_path / "malformed.gguf", digits[:-1])
    k_malformed, _, log = _cache_sizes(llama_build, malformed)
    assert k_malformed == k3 and "ignoring the K bits '" + digits[:-1] + "' (hlwq.kv_k_bits)" in log
    # a budget no mix reaches (here: layer 0's K held at q8_0, as the outlier rule would) is one line before any
    # perplexity run, and writes nothing
    from click.testing import CliRunner

    from hlwq_gguf.cli import main

    monkeypatch.setattr(kvcache, "safe_k_layers", lambda *args, **kwargs: [0])
    monkeypatch.setattr(llama_tools, "perplexity", None)
    refused = CliRunner().invoke(main, ["kv-calibrate", str(smollm2_q8), str(tmp_path / "out.gguf"), "--kv-bits",
                                        "3.3", "--chunks", "1"])
    assert refused.exit_code == 1 and "smollm2-q8_0.gguf: no mix of 3- and 4-bit K" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("hlwq-kvcalib-*"))
    monkeypatch.undo()
    # hlwq-gguf's --kv hlwq3 asks for the calibrated K there and says so in one line; a 4-bit K elsewhere
    type_k, type_v, note = kvcache.kv_pair("hlwq3", calibrated)
    assert (type_k, type_v) == ("hlwq3", "hlwq3") and "3-bit in 20 and 4-bit in 10 layers" in note
    assert "3.42 bits per value" in note and "\n" not in note
    assert kvcache.kv_pair("hlwq3", malformed)[0] == "hlwq4"


@pytest.mark.slow
def test_kv_calibrate_chooses_layers_that_matter(llama_build, smollm2_q8, tmp_path, monkeypatch):
    """`kv-calibrate --kv-bits 3.5` end to end on SmolLM2 (runs of 2 chunks of 512 tokens of the calibration text
    here, to keep the test short): half of the 30 layers get a 3-bit K, the file says which, and on the measurement
    text (which the calibration never reads) that choice is closer to the f16 cache than its opposite, the other
    half at 3 bits, which has the same size."""
    from click.testing import CliRunner

    from hlwq_gguf.cli import main

    monkeypatch.delenv(kvbits.K_BITS_ENV, raising=False)
    monkeypatch.setattr(kvbits, "DEFAULT_CTX", 512)
    out = tmp_path / "calibrated.gguf"
    result = CliRunner().invoke(main, ["kv-calibrate", str(smollm2_q8), str(out), "--kv-bits", "3.5"])
    assert result.exit_code == 0, result.output
    digits = plan.read_layout(out).k_bits
    assert len(digits) == 30 and digits.count("3") == 15
    assert f"3-bit in 15 ({3.5:.3f} bits per value; hlwq.kv_k_bits {digits})" in result.output
    assert kvcalib.read_key_means(out).keys() == set(range(30))
    opposite = digits.translate(str.maketrans("34", "43"))
    base = tmp_path / "f16.kld"
    text = textdata.measurement_text_file()
    llama_tools.perplexity(llama_build, out, text, ctx=1024, chunks=2, save_kld_base=base, extra=["-fa", "on"])

    def kld(env):
        return llama_tools.perplexity(llama_build, out, text, ctx=1024, chunks=2, kld_base=base, env=env,
                                      extra=["-fa", "on", "-ctk", "hlwq3_64", "-ctv", "hlwq3_64"]).kld_mean

    chosen, reverse = kld(None), kld({kvbits.K_BITS_ENV: opposite})
    print(f"KLD against the f16 cache: calibrated {chosen}, opposite {reverse}")
    assert chosen < 0.95 * reverse  # 0.110 against 0.121 measured (Intel Xeon); equal costs would give about 1
