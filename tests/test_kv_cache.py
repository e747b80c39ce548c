"""The HLWQ KV-cache types (hlwq3_64 / hlwq4_64) in llama.cpp: generation, quality against the f16 cache, the
rotation choice, and a full cache. Kernel-level coverage (CPY/SET_ROWS/GET_ROWS/FLASH_ATTN_EXT at head sizes
64/128/256/512/576) is test-backend-ops' (tests/test_ggml_kernels.py::test_backend_ops_cpu)."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from hlwq_gguf import kvcache, llama_tools, runtime, textdata


@pytest.fixture(scope="module")
def f16_base(smollm2_q8, llama_build, tmp_path_factory):
    """The f16 cache's logits over 2 chunks of 1024 tokens, through the tiled prompt path (batches of 1024)."""
    base = tmp_path_factory.mktemp("kv-base") / "f16.kld"
    llama_tools.perplexity(llama_build, smollm2_q8, textdata.measurement_text_file(), ctx=1024, chunks=2,
                           save_kld_base=base, extra=["-fa", "on"])
    return base


def _kld(build, model, base, cache_type, env=None):
    return llama_tools.perplexity(build, model, textdata.measurement_text_file(), ctx=1024, chunks=2, kld_base=base,
                                  extra=["-fa", "on", "-ctk", cache_type, "-ctv", cache_type], env=env)


def test_hlwq_cache_quality_against_llama_cpp_caches(smollm2_q8, llama_build, f16_base):
    """On real weights (ctx 1024, 2 chunks): the 4-bit HLWQ cache (4.25 bits per value) is as close to the f16
    cache as q4_0 (4.5); the 3-bit one (3.25) is a few times further (measured at ctx 2048: 0.219 vs 0.050, see
    docs/BENCHMARKS.md); keeping llama.cpp's graph rotation on top of the types' own is much worse (at head size 64
    H64 twice is the identity, so the values would be coded unrotated), which is why the types opt out of it."""
    q4_0 = _kld(llama_build, smollm2_q8, f16_base, "q4_0")
    hlwq4 = _kld(llama_build, smollm2_q8, f16_base, "hlwq4_64")
    hlwq3 = _kld(llama_build, smollm2_q8, f16_base, "hlwq3_64")
    hlwq3_rot = _kld(llama_build, smollm2_q8, f16_base, "hlwq3_64", env={"LLAMA_ATTN_ROT_HLWQ": "1"})
    print(f"KLD vs f16 cache: q4_0 {q4_0.kld_mean}, hlwq4 {hlwq4.kld_mean}, hlwq3 {hlwq3.kld_mean}, "
          f"hlwq3 + graph rotation {hlwq3_rot.kld_mean}")
    assert all(np.isfinite(q.ppl) for q in (q4_0, hlwq4, hlwq3, hlwq3_rot))
    assert 0 < hlwq4.kld_mean < 1.15 * q4_0.kld_mean
    assert hlwq4.kld_mean < hlwq3.kld_mean < 6 * q4_0.kld_mean
    assert hlwq3_rot.kld_mean > 2 * hlwq3.kld_mean


def test_f16_cache_summed_one_query_at_a_time_agrees_with_the_prompt_path(smollm2_q8, llama_build, f16_base):
    """Batches under 64 queries (generation) take flash attention's one-query path, which sums an f16 V in an f16
    accumulator with ggml_vec_mad_f16; prompts take fp32 tiles. At head size 64 the two agree to that accumulator's
    rounding (KLD 0.0049-0.0051 measured at ctx 2048, Intel Xeon, before and after patch 0008, which moved the
    head-64 sum on AVX512-FP16 CPUs from scalar code to vector registers); a sum that dropped or repeated values
    would be orders of magnitude further."""
    one_query = llama_tools.perplexity(llama_build, smollm2_q8, textdata.measurement_text_file(), ctx=1024, chunks=2,
                                       kld_base=f16_base, batch=32, extra=["-fa", "on", "-ub", "32"])
    print(f"f16 cache in batches of 32 against its prompt path: KLD {one_query.kld_mean}, "
          f"same top {one_query.same_top_p} %")
    assert 0 <= one_query.kld_mean < 0.02
    assert one_query.same_top_p > 90


GENERATION_PROMPTS = ("The capital of France is Paris, and the capital of Italy is", "Water boils at a temperature of")
# A cache type must pick f16's token wherever f16's top logit leads the next by at least this much. Measured on
# SmolLM2-135M (Intel Xeon, 2026-12-05): along these continuations a winning margin shrank by at most 1.0 logit with
# hlwq4 and 1.5 with a 3-bit K (hlwq3 forced), while the smallest f16 margins are 0.03: a word-for-word match of the
# whole greedy text flipped on such near-ties between CPUs.
DECISIVE_MARGIN = {"hlwq4": 2.0, "hlwq3": 3.0}


@pytest.mark.parametrize("kv_type", ["hlwq3", "hlwq4"])
def test_generation_with_an_hlwq_cache(smollm2_q8, kv_type):
    """llama-cpp-python with type_k/type_v set to the HLWQ types (flash attention switched on for the quantized V),
    decoding token by token along the f16 cache's greedy continuation: at every step where f16 is decisive, the HLWQ
    cache's top token is f16's."""
    def step_logits(llm, prompt_tokens, continuation):
        llm.reset()
        llm.eval(prompt_tokens)
        rows = [np.array(llm.scores[llm.n_tokens - 1])]
        for token in continuation[:-1]:
            llm.eval([token])  # one token at a time: the generation path, not the prompt's
            rows.append(np.array(llm.scores[llm.n_tokens - 1]))
        return np.array(rows)

    f16 = runtime.open_model(smollm2_q8, n_ctx=512, kv_type_k="f16", kv_type_v="f16", logits_all=True)
    coded = runtime.open_model(smollm2_q8, n_ctx=512, kv_type_k=kv_type, kv_type_v=kv_type, logits_all=True)
    decisive = 0
    for prompt in GENERATION_PROMPTS:
        prompt_tokens = f16.tokenize(prompt.encode())
        text = f16.create_completion(prompt, max_tokens=16, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
        continuation = f16.tokenize(text.encode(), add_bos=False)
        want, got = step_logits(f16, prompt_tokens, continuation), step_logits(coded, prompt_tokens, continuation)
        assert [int(t) for t in want.argmax(axis=1)] == continuation, prompt  # the f16 steps are its greedy text
        top_two = np.sort(want, axis=1)[:, -2:]
        for step in np.flatnonzero(top_two[:, 1] - top_two[:, 0] >= DECISIVE_MARGIN[kv_type]):
            decisive += 1
            assert got[step].argmax() == continuation[step], (prompt, step, text)
        print(f"{kv_type}: {coded.detokenize(list(got.argmax(axis=1))).decode(errors='replace')!r} vs f16 {text!r}")
    print(f"{decisive} decisive steps")
    assert decisive >= 4  # measured: 7 for hlwq4, 5 for hlwq3


def test_full_cache_is_llama_cpp_s_normal_error(smollm2_q8, llama_build):
    """More tokens than the cache holds (256 cells, the smallest llama.cpp allocates): llama-completion stops with
    its own message and exit code 0; with --context-shift the K cache is dequantized, re-roped and re-quantized
    and generation goes on. That shift used to crash (SIGSEGV) for every quantized cache without llama.cpp's graph
    rotation, which the HLWQ types opt out of; patch 0003 fixes it."""
    base = [llama_build.tool("llama-completion"), "-m", smollm2_q8, "-p", "Once upon a time", "-c", "256", "-n", "400",
            "--temp", "0", "-no-cnv", "--no-warmup", "--ignore-eos", "-fa", "on", "-ctk", "hlwq3_64", "-ctv", "hlwq3_64",
            "-t", llama_tools.default_threads()]
    stop = subprocess.run([str(c) for c in base], capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL, timeout=600)
    assert stop.returncode == 0 and "context full and context shift is disabled" in stop.stderr, stop.stderr[-2000:]
    shift = subprocess.run([str(c) for c in base + ["--context-shift"]], capture_output=True, text=True, errors="replace",
                           stdin=subprocess.DEVNULL, timeout=600)
    assert shift.returncode == 0, shift.stderr[-2000:]
    assert "context full" not in shift.stderr


def test_kv_shorthand_keeps_a_4_bit_k_under_a_3_bit_v(smollm2_q8, monkeypatch):
    """`--kv hlwq3` (kv_type) means K hlwq4 / V hlwq3 and says so in one line; --kv-k hlwq3 (kv_type_k) forces it,
    switching the K-outlier rule off for that model's cache only (it once stayed off for the rest of the process)."""
    monkeypatch.delenv("LLAMA_KV_HLWQ_K_OUTLIER", raising=False)
    assert kvcache.kv_pair("hlwq4") == ("hlwq4", "hlwq4", None)
    assert kvcache.kv_pair("q4_0") == ("q4_0", "q4_0", None)
    type_k, type_v, note = kvcache.kv_pair("hlwq3")
    assert (type_k, type_v) == ("hlwq4", "hlwq3") and "--kv-k hlwq3 forces it" in note and "\n" not in note
    said = runtime.open_model(smollm2_q8, n_ctx=256, kv_type="hlwq3").kv_note
    forced = runtime.open_model(smollm2_q8, n_ctx=256, kv_type="hlwq3", kv_type_k="hlwq3").kv_note
    assert said.startswith(note) and "K is hlwq4" not in forced
    assert "LLAMA_KV_HLWQ_K_OUTLIER" not in os.environ
    # this file has no mean keys: both also say how to add them (tests/test_kv_calibration.py)
    assert all("kv-calibrate" in line and "\n" not in line for line in (said, forced))
