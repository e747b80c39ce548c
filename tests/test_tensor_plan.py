"""convert/tensor_plan.py: the one place each tensor's type is decided (fast tier: no build)."""
from __future__ import annotations

from types import SimpleNamespace

from convert.tensor_plan import TensorPlan
from hlwq_gguf import recipes


def test_recipe_and_allocation_pick_the_type():
    plan = TensorPlan(recipes.RECIPES["hlwq5_m"], tied_embeddings=False, bits_for={"blk.0.ffn_up.weight": 6,
                                                                                    "blk.0.attn_q.weight": 4})
    assert plan.type_for("blk.0.ffn_gate.weight", (1536, 8960)) == "hlwq5"
    assert plan.type_for("blk.0.ffn_down.weight", (1536, 8960)) == "hlwq6"       # the recipe's wider category
    assert plan.type_for("blk.0.ffn_up.weight", (8960, 1536)) == "hlwq6"         # the allocation's width
    assert plan.type_for("blk.0.attn_q.weight", (576, 576)) == "hlwq4_64"        # 576-wide rows: 64-blocks
    assert plan.type_for("blk.0.attn_norm.weight", (1536,)) is None              # never quantized
    assert TensorPlan(None).type_for("blk.0.ffn_gate.weight", (1536, 8960)) is None  # keep every type


def _coded(bits, in_features, table="reference_A"):
    return SimpleNamespace(bits=bits, table=table, in_features=in_features)


def test_imported_codes_are_copied_only_when_every_block_can_be():
    plan = TensorPlan(recipes.RECIPES["hlwq5"], keep_unquantized=True)
    copied = plan.type_for_imported("blk.0.ffn_up.weight", (256, 512), [_coded(5, 512)])
    assert (copied.type_name, copied.reason) == ("hlwq5_a", None)
    stacked = plan.type_for_imported("blk.0.ffn_up_exps.weight", (2, 256, 512), [_coded(6, 512, "reference_B")] * 2)
    assert (stacked.type_name, stacked.reason) == ("hlwq6_b", None)
    mixed = plan.type_for_imported("blk.0.ffn_up.weight", (256, 512), [_coded(5, 512), _coded(4, 512)])
    assert (mixed.type_name, mixed.reason) == ("hlwq5", "mixed bits")
    padded = plan.type_for_imported("blk.0.ffn_up.weight", (256, 576), [_coded(5, 576)])
    assert (padded.type_name, padded.reason) == ("hlwq5_64", "padded rows")
    relaid = plan.type_for_imported("blk.0.attn_qkv.weight", (256, 1024), [_coded(5, 512)] * 2)
    assert relaid.reason == "rows re-laid by the model's converter"
    assert plan.type_for_plain("blk.0.attn_q_norm.weight", (64,)) is None
    assert plan.type_for_plain("token_embd.weight", (1000, 512)) == "bf16"
    assert TensorPlan(recipes.RECIPES["hlwq5"]).type_for_plain("token_embd.weight", (1000, 512)) == "hlwq5"
