"""The seed models' architectures convert and run (issue #8): tiny random replicas of Qwen3.5-27B, Gemma-4-31B,
Gemma-4-26B-A4B and GLM-4.7-Flash (see tiny_seeds.py) through the converter to HLWQ5 and HLWQ5_M, then llama.cpp."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from convert import convert_checkpoint
from convert.reference import reference_gguf
from hlwq_gguf import gguf_types, llama_tools, recipes, textdata
from hlwq_gguf.testing.tiny_seeds import SEED_FAMILIES

# GGUF tensors that must come out HLWQ-coded, per family: the big matrices of every layer kind and the experts
MUST_BE_HLWQ = {
    "qwen3.5-27b": ("attn_qkv", "attn_gate", "ssm_out", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                    "ffn_up", "ffn_down", "nextn.eh_proj", "output", "token_embd"),
    "gemma-4-31b": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd"),
    "gemma-4-26b-a4b": ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up_exps",
                        "ffn_down_exps", "token_embd"),
    "glm-4.7-flash": ("attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_k_b", "attn_v_b", "attn_output", "ffn_gate",
                      "ffn_up", "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp",
                      "ffn_up_shexp", "ffn_down_shexp", "nextn.eh_proj", "output", "token_embd"),
}
# ... and tensors that must stay float: norms, routers and their biases/scales, the DeltaNet state parameters
MUST_STAY_FLOAT = {
    "qwen3.5-27b": ("ssm_a", "ssm_dt", "ssm_conv1d", "ssm_norm", "attn_norm", "attn_q_norm", "attn_k_norm",
                    "post_attention_norm", "output_norm", "nextn.enorm", "nextn.hnorm"),
    "gemma-4-31b": ("attn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm",
                    "post_ffw_norm", "layer_output_scale", "rope_freqs", "output_norm"),
    "gemma-4-26b-a4b": ("ffn_gate_inp", "ffn_down_exps.scale", "pre_ffw_norm_2", "post_ffw_norm_1",
                        "post_ffw_norm_2", "attn_norm", "rope_freqs", "output_norm"),
    "glm-4.7-flash": ("ffn_gate_inp", "exp_probs_b", "attn_q_a_norm", "attn_kv_a_norm", "attn_norm", "ffn_norm",
                      "nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm", "output_norm"),
}
FLOAT_TYPES = {"F32", "F16", "BF16"}
N_PREDICT = 16


@dataclass
class SeedModel:
    family: str
    folder: Path
    f32: Path
    hlwq5: Path
    hlwq5_m: Path


@pytest.fixture(scope="module", params=list(SEED_FAMILIES))
def seed(request, smollm2_hf, tmp_path_factory) -> SeedModel:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = SEED_FAMILIES[family](root / "hf", smollm2_hf)
    converted = {recipe: convert_checkpoint(folder, root / f"{recipe}.gguf", recipe=recipe, quiet=True).output
                 for recipe in ("hlwq5", "hlwq5_m")}
    f32 = reference_gguf(folder, root / "f32.gguf", "f32")
    return SeedModel(family, folder, f32, converted["hlwq5"], converted["hlwq5_m"])


def _types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (ggml type name, shape in numpy order)."""
    gguf = gguf_types.register()
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)))
            for t in gguf.GGUFReader(str(path)).tensors}


def _role(name: str) -> str:
    """blk.3.ffn_down_exps.weight -> ffn_down_exps; blk.2.nextn.eh_proj.weight -> nextn.eh_proj; .scale kept."""
    role = re.sub(r"^blk\.\d+\.", "", name)
    return role.removesuffix(".weight") if role.endswith(".weight") else role.removesuffix(".bias")


@pytest.mark.parametrize("recipe", ["hlwq5", "hlwq5_m"])
def test_tensor_types(seed, recipe):
    """Every tensor has the recipe's type; the big matrices and experts are HLWQ, the state params float."""
    types = _types(getattr(seed, recipe))
    assert set(types) == set(_types(seed.f32)), "our converter and upstream's write different tensors"
    tied = "output.weight" not in types
    for name, (type_name, shape) in types.items():
        expected = recipes.tensor_type(recipes.RECIPES[recipe], name, shape, tied_embeddings=tied)
        assert type_name.lower() == (expected or "f32"), (name, shape)
    roles: dict[str, set[str]] = {}
    for name, (type_name, _) in types.items():
        roles.setdefault(_role(name), set()).add(type_name)
    for role in MUST_BE_HLWQ[seed.family]:
        assert role in roles, f"{seed.family}: no {role} tensor"
        assert all(t.startswith("HLWQ") for t in roles[role]), (role, roles[role])
    for role in MUST_STAY_FLOAT[seed.family]:
        assert role in roles, f"{seed.family}: no {role} tensor"
        assert roles[role] <= FLOAT_TYPES, (role, roles[role])


def test_hlwq5_m_matches_llama_quantize(llama_build, seed, tmp_path):
    """llama-quantize's HLWQ5_M of the F32 GGUF and the converter's hlwq5_m choose the same type for every tensor."""
    quantized = llama_tools.llama_quantize(llama_build, seed.f32, tmp_path / "q.gguf", "HLWQ5_M")
    assert quantized.fallbacks == 0
    assert {n: t for n, (t, _) in _types(quantized.output).items()} == \
           {n: t for n, (t, _) in _types(seed.hlwq5_m).items()}


@pytest.mark.parametrize("recipe", ["hlwq5", "hlwq5_m"])
def test_llama_cpp_generates(llama_build, seed, recipe):
    """llama-completion loads the file and decodes N_PREDICT tokens (EOS ignored: the weights are random)."""
    cmd = [llama_build.tool("llama-completion"), "-m", getattr(seed, recipe), "-p", "The capital of France is",
           "-n", N_PREDICT, "--temp", "0", "--seed", "1", "-t", llama_tools.default_threads(), "-no-cnv",
           "--no-display-prompt", "--no-warmup", "--ignore-eos"]
    # random weights emit arbitrary byte tokens: the output is bytes, not necessarily UTF-8
    result = subprocess.run([str(c) for c in cmd], capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    log = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, log[-3000:]
    # the first token comes from the prompt pass; the other N_PREDICT - 1 are single-token evals
    runs = re.search(r"\beval time =.*?/\s*(\d+) runs", log)
    assert runs and int(runs.group(1)) == N_PREDICT - 1, log[-3000:]
    assert result.stdout.strip()


def test_kl_divergence_bound(llama_build, seed, tmp_path):
    """HLWQ5 against the F32 GGUF of the same tiny model, with Q5_0 (--pure, 5.5 bpw) measured in the same run.

    The bound is the one test_convert uses on SmolLM2: a sound HLWQ5 (5.125-5.25 bpw) is no worse than Q5_0,
    while a broken kernel, codebook or layout gives many times more. Measured (ctx 256, 4 chunks), HLWQ5 with the
    int8-grid codebooks vs Q5_0: Qwen3.5 0.111 vs 0.108, GLM-4.7 0.060 vs 0.059, Gemma-4 dense 3.2e-5 vs 3.2e-5,
    Gemma-4 MoE 5.7e-5 vs 5.0e-5. Random weights make HLWQ5 and Q5_0 trade places by a few percent (Qwen3.5's
    recurrent state amplifies errors), hence the 10% slack. The random Gemma-4 replicas put nearly all mass on one
    token (top-1 agreement 100%), so their KLD is a weak signal and gets 25%; the type and generation tests carry
    those two.
    """
    text = textdata.measurement_text_file()
    base = tmp_path / "f32.kld"
    llama_tools.perplexity(llama_build, seed.f32, text, ctx=256, chunks=4, save_kld_base=base)
    q5_0 = llama_tools.llama_quantize(llama_build, seed.f32, tmp_path / "q5_0.gguf", "Q5_0", pure=True)
    hlwq = llama_tools.perplexity(llama_build, seed.hlwq5, text, ctx=256, chunks=4, kld_base=base)
    legacy = llama_tools.perplexity(llama_build, q5_0.output, text, ctx=256, chunks=4, kld_base=base)
    print(f"{seed.family}: KLD hlwq5 {hlwq.kld_mean} (top {hlwq.same_top_p}%), q5_0 {legacy.kld_mean} "
          f"(top {legacy.same_top_p}%)")
    assert hlwq.kld_mean is not None and legacy.kld_mean is not None
    assert hlwq.kld_mean <= (1.25 if seed.family.startswith("gemma-4") else 1.1) * legacy.kld_mean, (hlwq, legacy)


def test_hlwq_kv_cache_on_every_family(llama_build, seed, tmp_path):
    """The HLWQ KV-cache types run on every family with flash attention: head sizes 256 and 512 (Gemma 4), the
    576-wide MLA K rows with V a view of K (GLM-4.7-Flash), Qwen3.5's attention layers beside its DeltaNet state.
    Against the same model's f16 cache their KLD is finite and at most a few times q4_0's (4.5 bits per value)."""
    text = textdata.measurement_text_file()
    base = tmp_path / "f16.kld"
    llama_tools.perplexity(llama_build, seed.hlwq5, text, ctx=256, chunks=2, save_kld_base=base, extra=["-fa", "on"])
    kld = {}
    for cache in ("q4_0", "hlwq4_64", "hlwq3_64"):
        q = llama_tools.perplexity(llama_build, seed.hlwq5, text, ctx=256, chunks=2, kld_base=base,
                                   extra=["-fa", "on", "-ctk", cache, "-ctv", cache])
        assert q.kld_mean is not None and q.ppl == q.ppl, (seed.family, cache, q)
        kld[cache] = q.kld_mean
    print(f"{seed.family}: KV KLD vs f16 cache {kld}")
    assert kld["hlwq4_64"] <= 2 * kld["q4_0"] + 1e-4 and kld["hlwq3_64"] <= 6 * kld["q4_0"] + 1e-4, kld


def test_size_estimate_matches_the_converted_file(seed):
    """scripts/seed_sizes.py, which gives the README's expected GGUF sizes of the real seed models from their
    configs, predicts the tensor bytes of the converted tiny replicas within 0.5 % (HLWQ5 and HLWQ5_M)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import seed_sizes

    estimate = seed_sizes.sizes(seed.folder / "config.json")
    gguf = gguf_types.register()
    for recipe, path in (("HLWQ5", seed.hlwq5), ("HLWQ5_M", seed.hlwq5_m)):
        real = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
        assert estimate[recipe] == pytest.approx(real, rel=0.005), (seed.family, recipe, estimate[recipe], real)
