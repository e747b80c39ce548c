"""Function-preserving channel equalization before HLWQ coding.

HLWQ rotates each 128-block of a row, so its error is spread evenly over the block's input channels, whatever
their activations. For a matrix W fed by x, the output error is sum_j a_j * e_j^2 with a_j = E[x_j^2]: error on a
channel that carries large activations costs more. Writing W x = (W diag(s)) (x / s) and coding W diag(s) instead
of W makes the error on channel j cost a_j / s_j^2 while the block's error grows with the column norms n_j * s_j.
Minimising (sum_j a_j / s_j^2) * (sum_j n_j^2 s_j^2) gives s_j^2 ~ sqrt(a_j) / n_j (Cauchy-Schwarz): that is the
scale used here (a grid over the exponent, 0..1 x this one, picked it for all 120 groups of SmolLM2).

The 1/s goes where the graph already multiplies by a per-channel weight, so no graph change is needed:
- the RMSNorm gain feeding the matrices (attn_norm -> q, k, v; ffn_norm -> gate, up; output_norm -> output);
- the rows of ffn_up for ffn_down (the GLU multiplies act(gate x) by up x element-wise);
- the rows of attn_v (and its bias) for attn_output, one scale per kv head shared by the q heads of its group.

a_j comes from llama-imatrix (`in_sum2 / counts`) or, without one and for llama only, from the weights alone: the
norm gain squared for a norm's consumers, and the expected squared activation through gate/up and v for ffn_down
and attn_output with a unit-variance normalised input (an estimate that fails on Gemma-3, see
WEIGHTS_ONLY_ARCHITECTURES).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .source import ConversionError

# llama.cpp architectures whose blocks are exactly "RMSNorm -> q/k/v, attention without a norm on v ->
# attn_output; RMSNorm -> gate/up, act(gate) * up -> ffn_down" (checked against their llama.cpp graphs)
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
# where the weights-only estimate was measured to help. Gemma-3's norm gains (up to 84) track its activations
# poorly (log-correlation 0.46 with the imatrix), and equalizing from them made HLWQ5's KLD 4x worse on
# Gemma-3-270M (0.338 vs 0.082) while the imatrix version lowers it; SmolLM2 (llama): 0.090 vs 0.107
WEIGHTS_ONLY_ARCHITECTURES = ("llama",)
# a channel's scale stays within this factor of the geometric mean, so that a dead channel (a_j = 0) or an
# empty column cannot send a norm gain to 0 or inf
MAX_SCALE_RATIO = 64.0


@dataclass
class Plan:
    """Per-channel scales for one GGUF: tensor name -> scale of its input columns (multiply), and tensor name ->
    divisor of its rows (norm gains as 1-D, up/v rows and biases)."""
    column_scales: dict[str, np.ndarray] = field(default_factory=dict)
    row_divisors: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "weights"  # "imatrix" or "weights"

    def apply(self, name: str, data: np.ndarray) -> np.ndarray:
        """The tensor `name` (numpy order, input columns last) after equalization."""
        data = np.asarray(data, dtype=np.float32)
        if name in self.column_scales:
            data = data * self.column_scales[name]
        if name in self.row_divisors:
            divisor = self.row_divisors[name]
            data = data / (divisor if data.ndim == 1 else divisor[:, None])
        return data.astype(np.float32, copy=False)


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Mean squared input per column of each matrix, from a llama-imatrix GGUF (`<name>.in_sum2`, `<name>.counts`)."""

    from hlwq_gguf import gguf_types

    try:
        reader = gguf_types.read_gguf(path)
    except gguf_types.GGUFFileError as e:
        raise ConversionError(f"{e}; an importance matrix must be a llama-imatrix GGUF") from None
    sums = {t.name[:-len(".in_sum2")]: np.array(t.data, np.float64) for t in reader.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[:-len(".counts")]: np.array(t.data, np.float64) for t in reader.tensors if t.name.endswith(".counts")}
    if not sums:
        raise ConversionError(f"{path}: no '.in_sum2' tensors; is it a llama-imatrix GGUF (made with -o file.gguf)?")
    means = {}
    for name, total in sums.items():
        count = counts.get(name)
        if count is None or not np.all(count > 0):
            continue  # never reached (an expert no token was routed to): no statistics
        # 3-D (expert) matrices have one row of sums per expert; equalization shares one input across experts
        means[name] = (total.reshape(count.size, -1) / count.reshape(-1, 1)).mean(axis=0)
    return means


def channel_scales(importance: np.ndarray, column_sq_norms: np.ndarray) -> np.ndarray:
    """s_j = (a_j^(1/4) / n_j^(1/2)), normalised to geometric mean 1 and clamped to MAX_SCALE_RATIO around it."""
    a = np.maximum(np.asarray(importance, np.float64), 0)
    n2 = np.asarray(column_sq_norms, np.float64)
    floor_a = max(float(a.mean()), 1e-30) * 1e-8
    floor_n = max(float(n2.mean()), 1e-30) * 1e-8
    s = (np.maximum(a, floor_a) ** 0.25) / (np.maximum(n2, floor_n) ** 0.25)
    s /= np.exp(np.mean(np.log(s)))
    return np.clip(s, 1 / MAX_SCALE_RATIO, MAX_SCALE_RATIO).astype(np.float32)


def _sq_col_norms(*matrices: np.ndarray) -> np.ndarray:
    return sum(np.einsum("...ij,...ij->j", m.astype(np.float64), m.astype(np.float64)) for m in matrices)


def plan(architecture: str, tensors, hparams: dict, imatrix: dict[str, np.ndarray] | None = None) -> Plan:
    """The scales for a GGUF's tensors (`tensors`: name -> array in numpy order, e.g. GGUFReader data).

    Raises ConversionError for an architecture whose graph is not known to allow it; with an imatrix, a matrix it
    has no statistics for keeps the weights-only estimate.
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"channel equalization is not available for architecture {architecture!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if not imatrix and architecture not in WEIGHTS_ONLY_ARCHITECTURES:
        raise ConversionError(f"equalization from the weights alone is not reliable for architecture "
                              f"{architecture!r} (measured worse than none on Gemma-3); give --imatrix FILE|auto")
    n_head, n_head_kv = hparams.get("head_count"), hparams.get("head_count_kv") or hparams.get("head_count")
    result = Plan(source="imatrix" if imatrix else "weights")

    def importance(name: str, width: int, estimate):
        if imatrix and name in imatrix and imatrix[name].size == width:
            return imatrix[name]
        return estimate() if callable(estimate) else estimate

    def f32(name):
        return np.asarray(tensors[name], dtype=np.float32)

    for layer in range(int(hparams["block_count"])):
        blk = f"blk.{layer}."
        attn_in = [blk + n for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight") if blk + n in tensors]
        ffn_in = [blk + n for n in ("ffn_gate.weight", "ffn_up.weight") if blk + n in tensors]
        norm_gains = {}
        for norm, consumers in ((blk + "attn_norm.weight", attn_in), (blk + "ffn_norm.weight", ffn_in)):
            if norm not in tensors or not consumers:
                continue
            gain = f32(norm)
            norm_gains[norm] = gain
            matrices = [f32(c) for c in consumers]
            a = importance(consumers[0], matrices[0].shape[-1], lambda gain=gain: gain.astype(np.float64) ** 2)
            s = channel_scales(a, _sq_col_norms(*matrices))
            for c in consumers:
                result.column_scales[c] = s
            result.row_divisors[norm] = s

        gate, up, down = blk + "ffn_gate.weight", blk + "ffn_up.weight", blk + "ffn_down.weight"
        if all(n in tensors for n in (gate, up, down)) and blk + "ffn_norm.weight" in norm_gains:
            gain_sq = norm_gains[blk + "ffn_norm.weight"].astype(np.float64) ** 2

            def down_estimate(gain_sq=gain_sq, gate=gate, up=up):
                return (f32(gate).astype(np.float64) ** 2 @ gain_sq) * (f32(up).astype(np.float64) ** 2 @ gain_sq)

            w_down = f32(down)
            s = channel_scales(importance(down, w_down.shape[-1], down_estimate), _sq_col_norms(w_down))
            result.column_scales[down] = s
            result.row_divisors[up] = s

        v, o = blk + "attn_v.weight", blk + "attn_output.weight"
        if v in tensors and o in tensors and isinstance(n_head, int) and isinstance(n_head_kv, int) \
                and blk + "attn_norm.weight" in norm_gains and n_head % n_head_kv == 0:
            wo, wv = f32(o), f32(v)
            head_dim = wo.shape[-1] // n_head
            group = n_head // n_head_kv
            if head_dim * n_head != wo.shape[-1] or wv.shape[0] != n_head_kv * head_dim:
                continue
            gain_sq = norm_gains[blk + "attn_norm.weight"].astype(np.float64) ** 2

            def o_estimate(gain_sq=gain_sq, wv=wv):
                return np.tile((wv.astype(np.float64) ** 2 @ gain_sq).reshape(n_head_kv, 1, head_dim),
                               (1, group, 1)).reshape(-1)

            # q heads of one group read the same v rows, so they share one scale per (kv head, dim)
            a_kv = importance(o, wo.shape[-1], o_estimate).reshape(n_head_kv, group, head_dim).sum(axis=1)
            n2_kv = _sq_col_norms(wo).reshape(n_head_kv, group, head_dim).sum(axis=1)
            s_kv = channel_scales(a_kv.reshape(-1), n2_kv.reshape(-1)).reshape(n_head_kv, head_dim)
            result.column_scales[o] = np.repeat(s_kv[:, None, :], group, axis=1).reshape(-1)
            result.row_divisors[v] = s_kv.reshape(-1)
            if blk + "attn_v.bias" in tensors:
                result.row_divisors[blk + "attn_v.bias"] = s_kv.reshape(-1)

    if "output.weight" in tensors and "output_norm.weight" in tensors:
        gain = f32("output_norm.weight")
        w_out = f32("output.weight")
        a = importance("output.weight", w_out.shape[-1], gain.astype(np.float64) ** 2)
        s = channel_scales(a, _sq_col_norms(w_out))
        result.column_scales["output.weight"] = s
        result.row_divisors["output_norm.weight"] = s
    return result
