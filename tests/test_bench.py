"""`hlwq-gguf bench --quick` on a tiny model: well-formed, internally consistent outputs (no timing assertions)."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest

from hlwq_gguf import bench, gguf_types, llama_tools

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory, smollm2_hf):
    root = tmp_path_factory.mktemp("bench")
    # 256-wide rows fit the K-quants; the 320-wide ffn_down rows do not (llama-quantize falls back there)
    model = write_tiny_llama(root / "tiny-llama", smollm2_hf, hidden=256, intermediate=320)
    result = bench.run_bench(str(model), root / "out", quick=True, imatrix=True, show_progress=False,
                             log=lambda *_: None)
    return result, root / "out"


def _rows_not_multiple_of(path, block: int) -> int:
    """Quantized (non-float) 2-D tensors of a GGUF whose rows are not a multiple of `block`."""
    gguf = gguf_types.register()
    return sum(1 for t in gguf.GGUFReader(str(path)).tensors
               if len(t.shape) >= 2 and t.tensor_type.name not in ("F32", "F16", "BF16") and int(t.shape[0]) % block)


def test_outputs_exist_and_agree(quick_bench):
    result, out = quick_bench
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == [v.name for v in result.variants]
    assert [v["name"] for v in data["variants"]] == ["F32", "Q5_K_M", "Q4_K_M", "HLWQ5_M", "HLWQ5"]
    table = (out / "results.md").read_text()
    # every speed figure names the CPU and the instruction sets the kernels used
    assert data["machine"] in table and ("avx2" in data["machine"] or platform.machine() != "x86_64")
    assert ("no AMX" in data["machine"]) != ("amx_int8" in data["machine"])
    for v in result.variants:
        assert any(line.startswith((f"| {v.name} ", f"| **{v.name}")) for line in table.splitlines())
    for png in ("kld_vs_bpw.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sizes_are_real_file_sizes(quick_bench):
    result, _ = quick_bench
    params = {v.params for v in result.variants}
    assert len(params) == 1  # every variant holds the same weights
    for v in result.variants:
        assert v.bpw == pytest.approx(v.file_bytes * 8 / v.params)
    by_name = {v.name: v for v in result.variants}
    assert by_name["F32"].bpw > 31
    # HLWQ5_M gives some tensors 6 bits: never smaller than HLWQ5, and both near their block sizes' bpw
    assert 5.125 <= by_name["HLWQ5"].matrix_bpw <= 5.25 < by_name["HLWQ5_M"].matrix_bpw <= 6.25


def test_imatrix_goes_to_every_quantized_variant(quick_bench):
    result, _ = quick_bench
    assert all(v.imatrix == (v.family != "reference") for v in result.variants)
    assert any("importance matrix" in note and "calibration text" in note for note in result.notes)
    gguf = gguf_types.register()
    for v in result.variants:
        if v.family == "hlwq":  # the HLWQ variants use it through channel equalization
            assert gguf.GGUFReader(v.file).fields["hlwq.equalize"].contents() == "imatrix"


def test_llama_quantize_uses_the_imatrix_for_hlwq(quick_bench, llama_build, tmp_path):
    """The stock workflow: `llama-quantize --imatrix` gives HLWQ5 lower importance-weighted error in every matrix."""
    from convert.equalize import load_imatrix

    result, _ = quick_bench
    reference = Path(result.variants[0].file)
    imatrix_file = next(reference.parent.glob("imatrix.*.gguf"))
    plain = llama_tools.llama_quantize(llama_build, reference, tmp_path / "plain.gguf", "HLWQ5", pure=True).output
    weighted = llama_tools.llama_quantize(llama_build, reference, tmp_path / "imat.gguf", "HLWQ5", pure=True,
                                          imatrix=imatrix_file).output
    importance = load_imatrix(imatrix_file)
    gguf = gguf_types.register()
    tensors = {path: {t.name: t for t in gguf.GGUFReader(str(path)).tensors} for path in (reference, plain, weighted)}
    ratios = []
    for name, columns in importance.items():
        if tensors[plain][name].tensor_type.name != "HLWQ5":
            continue
        x = gguf.quants.dequantize(tensors[reference][name].data, tensors[reference][name].tensor_type)
        errors = [float((((x - gguf.quants.dequantize(tensors[path][name].data, gguf.GGMLQuantizationType.HLWQ5)) ** 2)
                         * columns).sum()) for path in (plain, weighted)]
        ratios.append(errors[1] / errors[0])
    assert len(ratios) >= 6 * 2  # both layers: q, k, v, o, gate, up (the 320-wide ffn_down rows fall back)
    # a random-weight model gives a flat importance matrix: small gains, but in every matrix (equal codes give 1.0)
    assert max(ratios) < 1.0 and float(np.mean(ratios)) < 0.995


def test_hlwq_variant_names():
    assert bench.parse_hlwq_variant("hlwq5") == ("hlwq5", False)
    assert bench.parse_hlwq_variant("HLWQ4_M+eq") == ("hlwq4_m", True)
    assert bench.parse_hlwq_variant("hlwq@4.55") == ("hlwq@4.55", False)  # a --target-bpw mix
    for bad in ("hlwq7", "hlwq5+fast", "q5_k_m", "hlwq@", "hlwq@five"):
        with pytest.raises(bench.BenchError, match="unknown HLWQ variant"):
            bench.parse_hlwq_variant(bad)


def test_fallbacks_are_counted_from_the_files(quick_bench):
    result, _ = quick_bench
    for v in result.variants:
        if v.family == "llama.cpp":
            assert v.fallbacks == _rows_not_multiple_of(v.file, 256) > 0
        elif v.family == "hlwq":
            assert v.fallbacks is None and _rows_not_multiple_of(v.file, 64) == 0


def test_quality_and_speed_are_consistent(quick_bench):
    result, _ = quick_bench
    reference = result.variants[0]
    assert reference.kld_mean is None and reference.ppl > 0
    for v in result.variants[1:]:
        assert v.kld_mean is not None and v.kld_mean >= 0 and v.kld_p99 >= 0
        assert 0 <= v.same_top_p <= 100
        assert len(v.pp_samples) == len(v.tg_samples) == result.settings.rounds
        assert v.pp > 0 and v.tg > 0
    baseline = result.variant(bench.BASELINE)
    assert baseline.pp_vs_baseline == 1.0 and baseline.tg_vs_baseline == 1.0
    for v in result.variants[1:]:
        assert v.pp_vs_baseline == pytest.approx(v.pp / baseline.pp)
        assert v.tg_vs_baseline == pytest.approx(v.tg / baseline.tg)
    # 6 bits on some tensors cannot make HLWQ5_M worse than HLWQ5 on the same weights and text
    assert result.variant("HLWQ5_M").kld_mean <= result.variant("HLWQ5").kld_mean


def test_bad_source_is_one_line(tmp_path):
    with pytest.raises(bench.BenchError, match=r"missing\.gguf: no such GGUF file$") as info:
        bench.run_bench(str(tmp_path / "missing.gguf"), tmp_path / "out", quick=True, show_progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    from click.testing import CliRunner

    from hlwq_gguf.cli import main

    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "missing-folder", tmp_path / "empty"):
        result = CliRunner().invoke(main, ["bench", str(source), "--quick", "-o", str(tmp_path / "out")])
        assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert str(source) in result.output
    assert not (tmp_path / "out").exists()
