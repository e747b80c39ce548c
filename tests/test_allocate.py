"""`--target-bpw`: bits per tensor from measured category sensitivity (convert/allocate.py)."""
from __future__ import annotations

import pytest

from convert import ConversionError, convert_checkpoint
from convert import allocate as allocator
from hlwq_gguf import gguf_stats, gguf_types

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


def test_base_bits():
    assert allocator.base_bits(5.125) == 5
    assert allocator.base_bits(5.6) == 5
    assert allocator.base_bits(4.9) == 4
    assert allocator.base_bits(9.0) == 6
    with pytest.raises(ConversionError, match="below HLWQ3"):
        allocator.base_bits(3.0)


def test_solve_buys_the_best_gain_per_byte_then_fills_with_part_of_a_category():
    gains = [allocator.CategoryGain("attn_v", ["v0", "v1"], 20, 0.004),        # 2e-4 per byte
             allocator.CategoryGain("ffn_down", ["d0", "d1"], 100, 0.010),     # 1e-4 per byte
             allocator.CategoryGain("attn_q", ["q0", "q1"], 60, 0.001),
             allocator.CategoryGain("attn_k", ["k0", "k1"], 10, -0.0001)]      # no gain (noise): bought last
    extra = {"v0": 10, "v1": 10, "d0": 50, "d1": 50, "q0": 30, "q1": 30, "k0": 5, "k1": 5}
    order = {"attn_v": ["v0", "v1"], "ffn_down": ["d0", "d1"], "attn_q": ["q0", "q1"], "attn_k": ["k0", "k1"]}
    assert allocator.solve(gains, 19, order, extra) == {"v0", "k0"}
    assert allocator.solve(gains, 80, order, extra) == {"v0", "v1", "d0", "k0", "k1"}
    assert allocator.solve(gains, 150, order, extra) == {"v0", "v1", "d0", "d1", "q0"}
    assert allocator.solve(gains, 185, order, extra) == {"v0", "v1", "d0", "d1", "q0", "q1", "k0"}
    assert allocator.solve(gains, 1000, order, extra) == set(extra)


def test_target_bpw_is_met_with_a_mix(tmp_path, smollm2_hf):
    from convert.reference import reference_gguf

    folder = write_tiny_llama(tmp_path / "tiny", smollm2_hf, hidden=256, intermediate=512, layers=2)
    f32 = reference_gguf(folder, tmp_path / "f32.gguf", "f32")
    report = convert_checkpoint(f32, tmp_path / "target.gguf", target_bpw=4.7, quiet=True)
    pure = convert_checkpoint(f32, tmp_path / "hlwq4.gguf", "hlwq4", quiet=True)
    assert report.recipe == "hlwq4"
    assert gguf_stats.gguf_stats(pure.output).matrix_bpw < gguf_stats.gguf_stats(report.output).matrix_bpw <= 4.7
    # the tied 49152 x 256 embedding is 90 % of the weights: its upgrade alone would overshoot 4.7 bpw, while
    # every layer tensor together fits, so all of them (and only they) get 5 bits
    types = {t.name: t.tensor_type.name for t in gguf_types.register().GGUFReader(str(report.output)).tensors}
    assert types.pop("token_embd.weight") == "HLWQ4"
    assert {t for n, t in types.items() if n.endswith(".weight") and "norm" not in n} == {"HLWQ5"}


def test_composed_mix_is_the_directly_coded_mix(tmp_path, smollm2_hf):
    """A mix composed from the codings at b and b + 1 has the bytes of the same mix coded in one pass, and the
    target-bpw result reuses both codings and the gains from parts_dir."""
    from convert.reference import reference_gguf
    from convert.requantize import requantize_gguf

    folder = write_tiny_llama(tmp_path / "tiny", smollm2_hf, hidden=256, intermediate=512, layers=2)
    f32 = reference_gguf(folder, tmp_path / "f32.gguf", "f32")
    narrow, wide = tmp_path / "narrow.gguf", tmp_path / "wide.gguf"
    requantize_gguf(f32, narrow, "hlwq4", quiet=True)
    requantize_gguf(f32, wide, "hlwq5", quiet=True)
    upgrade = {"blk.0.ffn_down.weight", "blk.1.attn_v.weight"}
    direct = tmp_path / "direct.gguf"
    requantize_gguf(f32, direct, "hlwq4", quiet=True, bits_for={n: 5 for n in upgrade})
    types = allocator.compose(narrow, wide, upgrade, tmp_path / "composed.gguf")
    assert types == {"hlwq4": 13, "hlwq5": 2}  # 7 matrices per layer and the tied embedding
    gguf = gguf_types.register()
    a, b = (gguf.GGUFReader(str(p)) for p in (direct, tmp_path / "composed.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type, x.name
        assert bytes(x.data) == bytes(y.data), x.name
    assert {f.name: f.contents() for f in a.fields.values()} == {f.name: f.contents() for f in b.fields.values()}
    with pytest.raises(ConversionError, match="no tensor nothing.weight"):
        allocator.compose(narrow, wide, {"nothing.weight"}, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()

    parts = tmp_path / "parts"
    first = allocator.allocate(f32, 4.7, imatrix=None, equalize=False, threads=None, log=lambda *_: None,
                               output=tmp_path / "t1.gguf", parts_dir=parts)
    kept = sorted(p.name for p in parts.iterdir())
    assert len(kept) == 4 and first[3]["types"]  # both codings, the gains, the stats
    second = allocator.allocate(f32, 4.6, imatrix=None, equalize=False, threads=None, log=print,
                                output=tmp_path / "t2.gguf", parts_dir=parts)
    assert sorted(p.name for p in parts.iterdir()) == kept and second[2] == first[2]
