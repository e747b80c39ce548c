"""Channel equalization (convert/equalize.py) on the real SmolLM2: exact in float, and it lowers HLWQ's KLD."""
from __future__ import annotations

import os

import numpy as np
import pytest

from convert import ConversionError, convert_checkpoint
from convert import equalize as equalizer
from convert.requantize import requantize_gguf
from hlwq_gguf import gguf_types, llama_tools, paths, textdata

CHUNKS = 4


@pytest.fixture(scope="module")
def smollm2_imatrix(llama_build, smollm2_f32_gguf):
    out = paths.cache_root() / "tests" / "smollm2-135m-calibration.imatrix.gguf"
    if not out.exists():
        llama_tools.imatrix(llama_build, smollm2_f32_gguf, textdata.calibration_text_file(), out, ctx=512, chunks=8)
    return out


@pytest.fixture(scope="module")
def kld_base(llama_build, smollm2_f32_gguf, tmp_path_factory):
    base = tmp_path_factory.mktemp("kld") / "f32.kld"
    llama_tools.perplexity(llama_build, smollm2_f32_gguf, textdata.measurement_text_file(), ctx=512, chunks=CHUNKS,
                           save_kld_base=base)
    return base


def _kld(llama_build, model, base) -> float:
    return llama_tools.perplexity(llama_build, model, textdata.measurement_text_file(), ctx=512, chunks=CHUNKS,
                                  kld_base=base).kld_mean


def _tensors(path):
    gguf = gguf_types.register()
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}


def test_equalized_float_model_computes_the_same_function(llama_build, smollm2_f32_gguf, smollm2_imatrix, kld_base,
                                                           tmp_path):
    out = tmp_path / "equalized-f32.gguf"
    stats = requantize_gguf(smollm2_f32_gguf, out, recipe=None, imatrix=smollm2_imatrix, quiet=True)
    # 30 layers x attn_norm, q, k, v (columns and rows), attn_output, ffn_norm, gate, up (columns and rows), down
    assert stats["equalized"] == 30 * 9
    before, after = _tensors(smollm2_f32_gguf), _tensors(out)
    norm = "blk.3.attn_norm.weight"
    ratio = after["blk.3.attn_q.weight"] / before["blk.3.attn_q.weight"]
    # the scales really move (not a no-op), and the norm gain carries exactly their inverse
    assert ratio.max() / ratio.min() > 4
    np.testing.assert_allclose(after[norm] * ratio[0], before[norm], rtol=1e-5)
    np.testing.assert_allclose(after["blk.3.attn_k.weight"] / before["blk.3.attn_k.weight"], ratio[:192], rtol=1e-5)
    assert _kld(llama_build, out, kld_base) < 1e-4


def test_equalization_lowers_hlwq5_kld(llama_build, smollm2_f32_gguf, smollm2_imatrix, kld_base, tmp_path):
    plain, weights, activations = (tmp_path / f"{n}.gguf" for n in ("plain", "weights", "imatrix"))
    convert_checkpoint(smollm2_f32_gguf, plain, "hlwq5", quiet=True)
    convert_checkpoint(smollm2_f32_gguf, weights, "hlwq5", quiet=True, equalize=True)
    convert_checkpoint(smollm2_f32_gguf, activations, "hlwq5", quiet=True, imatrix=smollm2_imatrix)
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in (plain, weights, activations))
    sizes = {p.stat().st_size for p in (plain, weights, activations)}
    assert max(sizes) - min(sizes) < 4096  # the same types: only metadata differs
    kld = {p.stem: _kld(llama_build, p, kld_base) for p in (plain, weights, activations)}
    # measured on 16 chunks: 0.107, 0.089 and 0.050
    assert kld["weights"] < 0.92 * kld["plain"]
    assert kld["imatrix"] < 0.6 * kld["plain"]
    gguf = gguf_types.register()
    field = gguf.GGUFReader(str(activations)).fields["hlwq.equalize"]
    assert field.contents() == "imatrix"


def test_plain_gguf_path_matches_the_checkpoint_path(smollm2_f32_gguf, smollm2_hf, tmp_path):
    from_gguf, from_checkpoint = tmp_path / "from-gguf.gguf", tmp_path / "from-checkpoint.gguf"
    convert_checkpoint(smollm2_f32_gguf, from_gguf, "hlwq5_m", quiet=True)
    convert_checkpoint(smollm2_hf, from_checkpoint, "hlwq5_m", quiet=True)
    a, b = _tensors(from_gguf), _tensors(from_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_unsupported_architecture_and_bad_inputs_are_refused(smollm2_f32_gguf, tmp_path):
    with pytest.raises(ConversionError, match="not available for architecture 'phi3'"):
        equalizer.plan("phi3", {}, {"block_count": 1})
    with pytest.raises(ConversionError, match="weights alone is not reliable for architecture 'gemma3'"):
        equalizer.plan("gemma3", {}, {"block_count": 1})
    bogus = tmp_path / "bogus.imatrix.gguf"
    bogus.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=str(bogus)):
        convert_checkpoint(smollm2_f32_gguf, out, "hlwq5", quiet=True, imatrix=bogus)
    with pytest.raises(ConversionError, match="no such importance-matrix file"):
        convert_checkpoint(smollm2_f32_gguf, out, "hlwq5", quiet=True, imatrix=tmp_path / "missing.gguf")
    # a quantized GGUF is not a source
    convert_checkpoint(smollm2_f32_gguf, tmp_path / "first.gguf", "hlwq5", quiet=True)
    with pytest.raises(ConversionError, match="not a full-precision GGUF"):
        convert_checkpoint(tmp_path / "first.gguf", out, "hlwq4", quiet=True)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_channel_scales_balance_importance_against_column_norms():
    rng = np.random.default_rng(0)
    a = rng.lognormal(0, 2, 512)
    n2 = rng.lognormal(0, 1, 512)
    s = equalizer.channel_scales(a, n2).astype(np.float64)
    assert np.exp(np.mean(np.log(s))) == pytest.approx(1, rel=1e-5)
    # the closed form minimises (sum a/s^2)(sum n2 s^2): any perturbation costs
    cost = lambda scale: np.sum(a / scale**2) * np.sum(n2 * scale**2)  # noqa: E731
    assert cost(s) < cost(np.ones_like(s))
    for _ in range(5):
        assert cost(s) <= cost(s * np.exp(0.05 * rng.standard_normal(s.size)))
    # a dead channel or an empty column stays within the clamp instead of 0 or inf
    a[0], n2[1] = 0.0, 0.0
    s = equalizer.channel_scales(a, n2)
    assert np.all(np.isfinite(s)) and s.min() >= 1 / equalizer.MAX_SCALE_RATIO - 1e-6 and s.max() <= equalizer.MAX_SCALE_RATIO + 1e-6


def test_imatrix_without_an_equalization_rule_still_weights_the_codes(llama_build, smollm2_hf, tmp_path, monkeypatch):
    """For an architecture without an equalization rule (GLM-4.7-Flash's, with its rule taken away here: every seed
    architecture has one now) --imatrix is not refused, it reaches ggml's quantizer as importance weights."""
    from convert.reference import reference_gguf
    from hlwq_gguf.testing.tiny_seeds import write_tiny_glm4_moe_lite

    f32 = tmp_path / "f32.gguf"
    reference_gguf(write_tiny_glm4_moe_lite(tmp_path / "hf", smollm2_hf), f32, "f32")
    monkeypatch.setattr(equalizer, "SUPPORTED_ARCHITECTURES",
                        tuple(a for a in equalizer.SUPPORTED_ARCHITECTURES if a != "deepseek2"))
    imatrix = llama_tools.imatrix(llama_build, f32, textdata.calibration_text_file(), tmp_path / "imatrix.gguf",
                                  ctx=128, chunks=4)
    requantize_gguf(f32, tmp_path / "plain.gguf", "hlwq5", quiet=True)
    stats = requantize_gguf(f32, tmp_path / "weighted.gguf", "hlwq5", imatrix=imatrix, quiet=True)
    assert stats["equalized"] == 0 and stats["weighted"] >= 4

    gguf = gguf_types.register()
    source, plain, weighted = ({t.name: t for t in gguf.GGUFReader(str(p)).tensors}
                               for p in (f32, tmp_path / "plain.gguf", tmp_path / "weighted.gguf"))
    ratios = []
    for name, columns in equalizer.load_imatrix(imatrix).items():
        if name not in plain or not plain[name].tensor_type.name.startswith("HLWQ"):
            continue
        x = gguf.quants.dequantize(source[name].data, source[name].tensor_type)
        if columns.size != x.shape[-1]:
            continue  # per-head statistics of a batched product (MLA's attn_k_b): not passed on
        errors = [float((((x - gguf.quants.dequantize(q[name].data, q[name].tensor_type)) ** 2) * columns).sum())
                  for q in (plain, weighted)]
        ratios.append(errors[1] / errors[0])
    assert len(ratios) == stats["weighted"]
    # random weights give a flat importance matrix, so the gain is small, but every tensor gains
    assert max(ratios) < 1.0 and float(np.mean(ratios)) < 0.995


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_equalized_qwen_replica_computes_the_same_function(architecture, llama_build, smollm2_hf, tmp_path):
    """The qwen2 (q/k/v biases) and qwen3 (q/k norms after the projections) rules: exact in float."""
    import json

    from convert.reference import reference_gguf
    from hlwq_gguf.testing.tiny_llama import write_tiny_llama

    rng = np.random.default_rng(5)
    heads, kv_heads, head_dim, hidden = 2, 1, 64, 128
    overrides = {}
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        if architecture == "qwen2":
            for name, rows in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
                overrides[p + name + ".bias"] = (rng.standard_normal(rows * head_dim) * 0.3).astype(np.float32)
        else:
            for name in ("q_norm", "k_norm"):
                overrides[p + name + ".weight"] = (1 + 0.2 * rng.standard_normal(head_dim)).astype(np.float32)
        # uneven activations, so that the scales move
        overrides[f"model.layers.{layer}.input_layernorm.weight"] = rng.lognormal(0, 1, hidden).astype(np.float32)
        overrides[f"model.layers.{layer}.post_attention_layernorm.weight"] = rng.lognormal(0, 1, hidden).astype(np.float32)
    folder = write_tiny_llama(tmp_path / "hf", smollm2_hf, layers=2, overrides=overrides)
    config = json.loads((folder / "config.json").read_text())
    # model_type stays llama: AutoTokenizer would pick the Qwen tokenizer class from it, whose hash of SmolLM2's
    # vocabulary upstream does not know; the converter picks the model class from "architectures"
    config.update({"architectures": ["Qwen2ForCausalLM" if architecture == "qwen2" else "Qwen3ForCausalLM"],
                   "attention_bias": architecture == "qwen2"})
    (folder / "config.json").write_text(json.dumps(config))
    f32 = reference_gguf(folder, tmp_path / "f32.gguf", "f32")
    assert gguf_types.register().GGUFReader(str(f32)).fields["general.architecture"].contents() == architecture
    out, stats = _equalize_with_calibration(llama_build, f32, tmp_path, smooth_keys=False)
    # per layer: attn_norm, q, k, v (columns and rows), attn_output, ffn_norm, gate, up (columns and rows), down
    assert stats["equalized"] == 2 * 9 + (2 if architecture == "qwen2" else 0)  # + attn_v.bias
    before, after = _tensors(f32), _tensors(out)
    assert not np.allclose(before["blk.0.attn_q.weight"], after["blk.0.attn_q.weight"])
    assert _float_kld(llama_build, f32, out, tmp_path) < 1e-5


def _equalize_with_calibration(llama_build, f32, tmp_path, **options):
    """`f32` equalized (kept in float) from an importance matrix of 4 x 128 calibration tokens: (file, stats)."""
    imatrix = llama_tools.imatrix(llama_build, f32, textdata.calibration_text_file(), tmp_path / "imatrix.gguf",
                                  ctx=128, chunks=4)
    out = tmp_path / "equalized.gguf"
    return out, requantize_gguf(f32, out, recipe=None, imatrix=imatrix, quiet=True, **options)


def _float_kld(llama_build, reference, model, tmp_path) -> float:
    """KLD of `model` against `reference` on 4 x 128 measurement tokens."""
    base = tmp_path / "f32.kld"
    text = textdata.measurement_text_file()
    llama_tools.perplexity(llama_build, reference, text, ctx=128, chunks=4, save_kld_base=base)
    return llama_tools.perplexity(llama_build, model, text, ctx=128, chunks=4, kld_base=base).kld_mean


# seed replica -> tensors equalization must change, and one it must leave alone
REPLICAS = {
    # the DeltaNet layers' qkv, z gate and alpha/beta and the full-attention layers' q, k, v share attn_norm; the
    # FFN reads post_attention_norm; ssm_out follows a per-head gated norm, so it keeps its columns
    "qwen3.5": ("write_tiny_qwen3_5", ("blk.0.attn_gate.weight", "blk.0.ssm_alpha.weight", "blk.0.attn_qkv.weight",
                                       "blk.3.attn_q.weight", "blk.0.post_attention_norm.weight",
                                       "blk.3.attn_output.weight"), "blk.0.ssm_out.weight"),
    # V is RMS-normalised after its projection, so attn_output keeps its columns
    "gemma4-dense": ("write_tiny_gemma4_dense", ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.ffn_norm.weight"),
                     "blk.0.attn_output.weight"),
    # the routed experts, the shared expert, the router and the shared expert's gate all read post_attention_norm
    "qwen3.5-moe": ("write_tiny_qwen3_5_moe", ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_down_exps.weight",
                                               "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight",
                                               "blk.0.ffn_gate_inp_shexp.weight", "blk.0.attn_gate.weight"),
                    "blk.0.ssm_out.weight"),
    # MLA: attn_norm -> q_a, kv_a_mqa; q_a_norm -> q_b; the kv latent's norm -> k_b's rows, v_b's columns; a dense
    # lead layer; then the router, experts and shared expert behind ffn_norm. exp_probs_b biases the router's
    # probabilities, which do not change
    "glm-4.7-flash": ("write_tiny_glm4_moe_lite", ("blk.0.attn_kv_a_mqa.weight", "blk.0.attn_q_b.weight",
                                                   "blk.0.attn_kv_a_norm.weight", "blk.0.attn_k_b.weight",
                                                   "blk.1.attn_v_b.weight", "blk.0.ffn_down.weight",
                                                   "blk.2.ffn_gate_inp.weight", "blk.1.ffn_down_exps.weight",
                                                   "blk.1.ffn_down_shexp.weight"),
                      "blk.1.exp_probs_b.bias"),
    # the experts read pre_ffw_norm_2 into one fused gate_up tensor; the router reads another normalisation
    "gemma4-moe": ("write_tiny_gemma4_moe", ("blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.weight",
                                             "blk.0.pre_ffw_norm_2.weight", "blk.0.ffn_up.weight"),
                   "blk.0.ffn_gate_inp.weight"),
}


@pytest.mark.parametrize("family", list(REPLICAS))
def test_equalized_seed_replica_computes_the_same_function(family, llama_build, smollm2_hf, tmp_path):
    """The rules for the seed architectures (Qwen3.5 dense and MoE, GLM-4.7-Flash, Gemma-4 dense and MoE): exact in
    float."""
    from convert.reference import reference_gguf
    from hlwq_gguf.testing import tiny_seeds

    writer, changed, kept = REPLICAS[family]
    folder = getattr(tiny_seeds, writer)(tmp_path / "hf", smollm2_hf, **({} if "glm" in family else {"text_only": True}))
    f32 = reference_gguf(folder, tmp_path / "f32.gguf", "f32")
    out, stats = _equalize_with_calibration(llama_build, f32, tmp_path)
    before, after = _tensors(f32), _tensors(out)
    for name in changed:
        assert not np.allclose(before[name], after[name]), name
    np.testing.assert_array_equal(before[kept], after[kept])
    assert stats["equalized"] >= 4 * len(changed)
    assert _float_kld(llama_build, f32, out, tmp_path) < 1e-5
