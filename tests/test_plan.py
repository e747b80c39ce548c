"""The MoE placement planner and the tensor-override plumbing (issue #6), on CPU.

The planner runs on real GGUF metadata: the tiny Gemma-4-26B-A4B, GLM-4.7-Flash and Qwen3.5-35B-A3B replicas of
tiny_seeds.py, converted to HLWQ5. Its KV-cache sizes are checked against llama.cpp's own report and its compute-buffer
estimate against llama.cpp's CPU compute buffer. The overrides are proven on the CPU build: llama.cpp's verbose
log must name every planned expert tensor as overridden to CPU, and the logits must not change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert import convert_checkpoint
from hlwq_gguf import plan as planner
from hlwq_gguf import kvcache, runtime
from hlwq_gguf.cli import main as cli_main
from hlwq_gguf.testing.tiny_seeds import MOE_TEST_FAMILIES

MOE_FAMILIES = tuple(MOE_TEST_FAMILIES)  # gemma-4-26b-a4b, glm-4.7-flash, qwen3.5-35b-a3b
MiB = 2**20
KV_LOG = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
COMPUTE_LOG = re.compile(r"CPU compute buffer size =\s*([\d.]+) MiB")
OVERRIDE_LOG = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


@dataclass
class MoeModel:
    family: str
    gguf: Path
    layout: planner.ModelLayout


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe(request, smollm2_hf, tmp_path_factory) -> MoeModel:
    root = tmp_path_factory.mktemp(request.param)
    folder = MOE_TEST_FAMILIES[request.param](root / "hf", smollm2_hf)
    gguf = convert_checkpoint(folder, root / "hlwq5.gguf", recipe="hlwq5", quiet=True).output
    return MoeModel(request.param, Path(gguf), planner.read_layout(gguf))


def _tensor_names(path: Path) -> list[str]:
    from hlwq_gguf import gguf_types

    return [t.name for t in gguf_types.register().GGUFReader(str(path)).tensors]


# ------------------------------------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("layers", [[0], [0, 1], list(range(20)), list(range(20, 40)), [3, 5, 7, 12, 13, 14, 99],
                                    list(range(9, 12)), [1, 10, 100], list(range(0, 94, 2))])
def test_layer_regex_matches_exactly(layers):
    group = planner.layer_regex(layers)
    matched = [n for n in range(200) if re.fullmatch(group, str(n))]
    assert matched == sorted(layers), group


def test_parse_size():
    assert planner.parse_size("24GiB") == 24 * 2**30
    assert planner.parse_size("16 GB") == 16 * 10**9
    assert planner.parse_size("512MiB") == 512 * MiB
    assert planner.parse_size(1234) == 1234
    with pytest.raises(planner.PlanError, match="memory size"):
        planner.parse_size("lots")


# ------------------------------------------------------------------------------------------------ layout and sizes

def test_layout_classifies_experts(moe):
    """Routed experts (*_exps, including Gemma-4's per-expert scale) per MoE layer; shared experts are not
    routed; GLM's and Qwen3.5's MTP layers are left out (llama.cpp does not load them by default); Qwen3.5's
    DeltaNet layers are recurrent (no KV cache) and its shared-expert gate is neither a routed nor a shared expert."""
    L = moe.layout
    experts = L.expert_bytes_by_layer()
    if moe.family == "gemma-4-26b-a4b":
        assert list(experts) == [0, 1, 2, 3] and L.tied_output and L.n_swa == 128
        assert any(t.name == "blk.0.ffn_down_exps.scale" and t.is_routed_expert for t in L.tensors)
    elif moe.family == "glm-4.7-flash":
        assert list(experts) == [1] and L.n_layer == 2 and L.n_layer_all == 3 and L.mtp_bytes > 0
        assert all(t.layer != 2 for t in L.tensors)
        shexp = [t for t in L.tensors if "shexp" in t.name]
        assert shexp and all(t.is_shared_expert and not t.is_routed_expert for t in shexp)
    else:
        assert moe.family == "qwen3.5-35b-a3b"
        assert list(experts) == [0, 1, 2, 3] and L.n_layer == 4 and L.n_layer_all == 5 and L.mtp_bytes > 0
        assert all(t.layer != 4 for t in L.tensors)
        assert L.recurrent_layers == [0, 1, 2] and [a.index for a in L.attention] == [3]
        assert (L.n_expert, L.n_expert_used, L.n_ff_expert, L.n_ff) == (8, 2, 320, 0)
        for il in experts:
            names = {t.name for t in L.tensors if t.layer == il}
            assert {f"blk.{il}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")} <= names
            assert {f"blk.{il}.ffn_{k}_shexp.weight" for k in ("gate", "up", "down", "gate_inp")} <= names
        routed = {t.name.split(".")[2] for t in L.tensors if t.is_routed_expert}
        shared = {t.name.split(".")[2] for t in L.tensors if t.is_shared_expert}
        assert routed == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
        assert shared == {"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}  # not the ffn_gate_inp_shexp gate
    assert all(b > 0 for b in experts.values())


def test_kv_bits_per_value_are_the_types_own(moe):
    """`hlwq-gguf bench --kv` reports bits per value from the cache types, whatever the sliding windows save: a
    cache's bytes per token at a long context, divided by every layer's values, would fall below the type's bits
    for Gemma-4's sliding layers."""
    from hlwq_gguf import kvbench

    L = moe.layout
    for kv_type, bits in (("f16", 16.0), ("q8_0", 8.5), ("q4_0", 4.5), ("hlwq4_64", 4.25), ("hlwq3_64", 3.25)):
        assert kvbench.layer_bits_per_value(L, kv_type, kv_type) == pytest.approx(bits)
    first = L.attention[0].index
    assert kvbench.layer_bits_per_value(L, "hlwq4_64", "hlwq4_64", [first]) > 4.25  # one layer's K kept at q8_0
    values = sum(a.k_width + a.v_width for a in L.attention)
    n_ctx = 8192
    footprint_bits = planner.kv_cache_bytes(L, n_ctx, "f16") * 8 / n_ctx / values
    if moe.family == "gemma-4-26b-a4b":
        assert footprint_bits < 12.0
    else:
        assert footprint_bits == pytest.approx(16.0, rel=1e-3)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "hlwq3"])
def test_kv_and_compute_sizes_match_llama_cpp(llama_build, moe, kv_type, capfd):
    """The planner's KV bytes equal what llama.cpp allocates (SWA and MLA caches included); its compute-buffer
    estimate is an upper bound of llama.cpp's CPU compute buffer, within 50%."""
    n_ctx = 1000  # padded to 1024 cells; Gemma's SWA layers get min(1024, 128 + 512 -> 768) cells
    model = runtime.open_model(moe.gguf, n_ctx=n_ctx, n_threads=1, verbose=True, kv_type=kv_type,
                               swa_full=False, flash_attn=kv_type != "f16")
    del model
    log = capfd.readouterr().err
    reported = sum(float(m) for m in KV_LOG.findall(log))
    assert reported > 0, log[-2000:]
    type_k, type_v, _ = kvcache.kv_pair(kv_type, moe.gguf)  # hlwq3: K is hlwq4 (not for MLA)
    assert planner.kv_cache_bytes(moe.layout, n_ctx, type_k, type_v) / MiB == pytest.approx(reported, abs=0.01)
    if kv_type == "f16":  # without flash attention, as llama.cpp ran it here
        measured = float(COMPUTE_LOG.findall(log)[-1])
        estimate = planner.compute_buffer_bytes(moe.layout, n_ctx, flash_attn=False) / MiB
        assert measured <= estimate <= 1.5 * measured, (estimate, measured)


# ------------------------------------------------------------------------------------------------ placement cases

def _fixed_bytes(moe: MoeModel, n_ctx: int, kv: str, reserve: int) -> int:
    """What the GPU needs before any expert: the planner's own parts, recomputed from its public functions."""
    p = planner.make_plan(moe.layout, 1 << 50, n_ctx, kv, reserve=reserve)
    return p.gpu_weights + p.kv_bytes + p.compute_bytes + reserve


@pytest.mark.parametrize("kv", ["f16", "q8_0", "q4_0"])
def test_plan_cases(moe, kv):
    """Budgets that force each case: all on GPU, some experts in RAM, only attention on GPU, nothing fits."""
    n_ctx, reserve = 32768, 64 * MiB
    experts = moe.layout.expert_bytes_by_layer()
    fixed = _fixed_bytes(moe, n_ctx, kv, reserve)
    names = _tensor_names(moe.gguf)

    everything = planner.make_plan(moe.layout, fixed + sum(experts.values()), n_ctx, kv, reserve=reserve)
    assert everything.case == "all on GPU" and everything.overrides() == [] and everything.gpu_total <= fixed + sum(experts.values())

    only_attention = planner.make_plan(moe.layout, fixed, n_ctx, kv, reserve=reserve)
    assert only_attention.case == "experts in RAM" and only_attention.cpu_expert_layers == list(experts)
    assert only_attention.gpu_total == fixed

    if len(experts) > 1:
        last = max(experts)
        some = planner.make_plan(moe.layout, fixed + experts[last] + experts[last] // 2, n_ctx, kv, reserve=reserve)
        assert some.case == "some experts in RAM"
        assert some.gpu_expert_layers == [last] and some.cpu_expert_layers == sorted(set(experts) - {last})
        assert some.n_cpu_moe() == last

    for p in (only_attention, *([some] if len(experts) > 1 else [])):
        (override,) = p.overrides()
        regex, device = override.rsplit("=", 1)
        assert device == "CPU"
        moved = {n for n in names if re.search(regex, n)}
        wanted = {t.name for t in moe.layout.tensors if t.is_routed_expert and t.layer in p.cpu_expert_layers}
        assert moved == wanted
        assert "-ot" in p.llama_args() and "-ot" in p.table()

    with pytest.raises(planner.PlanError) as error:
        planner.make_plan(moe.layout, fixed - 1, n_ctx, kv, reserve=reserve)
    message = str(error.value)
    assert "\n" not in message and str(moe.gguf) in message and "does not fit" in message


def test_plan_prints_llama_cpp_s_names_of_the_hlwq_cache_types(moe):
    args = planner.make_plan(moe.layout, "24GiB", 4096, "hlwq3", "hlwq4").llama_args()
    assert "-ctk hlwq3_64 -ctv hlwq4_64" in " ".join(args)


def test_plan_rejects_unknown_kv_type(moe):
    with pytest.raises(planner.PlanError, match="KV type 'q3_k' is not one llama.cpp knows"):
        planner.make_plan(moe.layout, "24GiB", 4096, "q3_k")


def test_cli_plan(moe):
    runner = CliRunner()
    ok = runner.invoke(cli_main, ["plan", str(moe.gguf), "--vram", "24GiB", "--ctx", "32768", "--kv", "q8_0"])
    assert ok.exit_code == 0, ok.output
    assert "all on GPU" in ok.output and "-ctk q8_0" in ok.output
    fixed = _fixed_bytes(moe, 32768, "q8_0", 512 * MiB)
    tight = runner.invoke(cli_main, ["plan", str(moe.gguf), "--vram", str(fixed), "--ctx", "32768", "--kv", "q8_0"])
    assert tight.exit_code == 0 and "experts in RAM" in tight.output and "-ot 'blk" in tight.output, tight.output
    none = runner.invoke(cli_main, ["plan", str(moe.gguf), "--vram", "100MiB", "--ctx", "32768"])
    assert none.exit_code != 0 and len(none.output.strip().splitlines()) == 1 and "does not fit" in none.output
    missing = runner.invoke(cli_main, ["plan", str(moe.gguf) + ".missing", "--vram", "24GiB"])
    assert missing.exit_code != 0 and "no such file" in missing.output


# ------------------------------------------------------------------------------------------------ override plumbing

def _greedy_logits(model, prompt: bytes, steps: int = 6) -> np.ndarray:
    """Logits of the prompt's last token and of `steps` greedy continuations, as one array."""
    tokens = model.tokenize(prompt)
    model.eval(tokens)
    rows = [np.array(model.scores[model.n_tokens - 1])]
    for _ in range(steps):
        model.eval([int(np.argmax(rows[-1]))])
        rows.append(np.array(model.scores[model.n_tokens - 1]))
    return np.stack(rows)


def test_overrides_applied_and_logits_unchanged(llama_build, moe, capfd):
    """Explicit -ot style overrides and a VRAM plan both reach llama.cpp (its log names each overridden expert
    tensor) and the greedy logits are bit-identical to the run without overrides."""
    common = dict(n_ctx=256, n_threads=1, logits_all=True)
    plain = runtime.open_model(moe.gguf, verbose=False, **common)
    reference = _greedy_logits(plain, b"The capital of France is")
    del plain
    capfd.readouterr()

    experts = moe.layout.expert_bytes_by_layer()
    explicit = [rf"blk\.{planner.layer_regex(list(experts))}{planner.ROUTED_EXPERT_REGEX}=CPU"]
    fixed = _fixed_bytes(moe, 256, "f16", planner.DEFAULT_RESERVE)
    for kwargs in ({"overrides": explicit}, {"vram": fixed}):
        model = runtime.open_model(moe.gguf, verbose=True, **common, **kwargs)
        log = capfd.readouterr().err
        overridden = dict(OVERRIDE_LOG.findall(log))
        wanted = {t.name for t in moe.layout.tensors if t.is_routed_expert}
        assert set(overridden) == wanted, (kwargs, sorted(overridden))
        assert set(overridden.values()) == {"CPU"}
        assert model.tensor_overrides.entries[-1][1] == "CPU"
        np.testing.assert_array_equal(_greedy_logits(model, b"The capital of France is"), reference)
        if "vram" in kwargs:
            assert model.placement_plan.case == "experts in RAM"
        del model


def test_bad_overrides(llama_build):
    with pytest.raises(runtime.OverrideError, match="unknown device 'CUDA7'.*this build has CPU"):
        runtime.tensor_overrides([r"ffn_.*_exps=CUDA7"])
    with pytest.raises(runtime.OverrideError, match="does not compile"):
        runtime.tensor_overrides(["blk\\.(1=CPU"])
    with pytest.raises(runtime.OverrideError, match="is not REGEX=DEVICE"):
        runtime.tensor_overrides(["ffn_up_exps"])
    ok = runtime.tensor_overrides({r"\.ffn_up_exps": "CPU", r"\.ffn_down_exps": "cpu"})
    assert [e[0] for e in ok.entries] == [r"\.ffn_up_exps", r"\.ffn_down_exps"]
    assert ok.array[2].pattern is None and ok.array[2].buft is None  # the {NULL, NULL} terminator


def test_converter_types_match_llama_quantize(llama_build, moe, tmp_path):
    """The converter's hlwq5 and llama-quantize's HLWQ5 choose the same type for every tensor of every MoE family
    (Qwen's [1, n] shared-expert gate is a vector to llama.cpp and stays F32)."""
    from convert.reference import reference_gguf
    from hlwq_gguf import gguf_types, llama_tools

    folder = moe.gguf.parent / "hf"
    f32 = reference_gguf(folder, tmp_path / "f32.gguf", "f32")
    quantized = llama_tools.llama_quantize(llama_build, f32, tmp_path / "q.gguf", "HLWQ5")
    gguf = gguf_types.register()
    types_q = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(quantized.output)).tensors}
    types_c = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(moe.gguf)).tensors}
    assert types_q == types_c


@pytest.mark.parametrize("arch, pattern_key, full_layers", [
    ("gemma3", None, [5, 11]),             # llama.cpp's default for Gemma-3: five local layers, then one global
    ("gemma2", None, [1, 3, 5, 7, 9, 11]),
    ("gemma3", 4, [3, 7, 11]),             # a scalar pattern key overrides the default
    ("llama", None, []),                   # a window without a pattern: every layer slides (Mistral-style)
])
def test_sliding_layers_follow_llama_cpp_s_patterns(tmp_path, arch, pattern_key, full_layers):
    """Which layers slide where the GGUF has no per-layer pattern (llama.cpp's load_swa_pattern per architecture).
    Gemma-3-270M's KV bench had counted all 18 layers as sliding, 15 % too few KV bytes at ctx 2048."""
    import gguf

    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(12)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_feed_forward_length(128)
    writer.add_sliding_window(16)
    if pattern_key is not None:
        writer.add_uint32(f"{arch}.attention.sliding_window_pattern", pattern_key)
    for il in range(12):
        writer.add_tensor(f"blk.{il}.attn_k.weight", np.zeros((32, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layout = planner.read_layout(path)
    assert [layer.index for layer in layout.attention if not layer.sliding] == full_layers
