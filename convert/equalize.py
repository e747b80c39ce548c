"""Function-preserving channel equalization before HLWQ coding.

HLWQ rotates each 128-block of a row, so its error is spread evenly over the block's input channels, whatever
their activations. For a matrix W fed by x, the output error is sum_j a_j * e_j^2 with a_j = E[x_j^2]: error on a
channel that carries large activations costs more. Writing W x = (W diag(s)) (x / s) and coding W diag(s) instead
of W makes the error on channel j cost a_j / s_j^2 while the block's error grows with the column norms n_j * s_j.
Minimising (sum_j a_j / s_j^2) * (sum_j n_j^2 s_j^2) gives s_j^2 ~ sqrt(a_j) / n_j (Cauchy-Schwarz): that is the
scale used here (a grid over the exponent, 0..1 x this one, picked it for all 120 groups of SmolLM2).

The 1/s goes where the graph already multiplies by a per-channel weight, so no graph change is needed:
- the RMSNorm gain feeding the matrices (attn_norm -> q, k, v, and Qwen3.5's DeltaNet qkv, z gate, alpha, beta;
  ffn_norm, Qwen3.5's post_attention_norm -> gate, up; output_norm -> output);
- the rows of ffn_up for ffn_down (the GLU multiplies act(gate x) by up x element-wise);
- the rows of attn_v (and its bias) for attn_output, one scale per kv head shared by the q heads of its group;
- MoE blocks (_equalize_experts): the experts' input norm for all experts' gate/up and a shared expert's (routers
  that read the same input take the scale exactly), each expert's up rows for its down;
- MLA's q_a_norm for attn_q_b, and its kv latent norm for k_b's rows and v_b's columns (_equalize_mla_latent).
The per-architecture tables below say which tensors play these parts; what has no multiplier before it is left
alone and listed in Plan.left_alone.

Biases of q/k/v (qwen2) are per output row and stay; q/k norms after the projections (qwen3, qwen35) see the same
values. K smoothing (_smooth_keys) is the same idea on the other side of q . k: see there.

a_j comes from llama-imatrix (`in_sum2 / counts`) or, without one and for llama only, from the weights alone: the
norm gain squared for a norm's consumers, and the expected squared activation through gate/up and v for ffn_down
and attn_output with a unit-variance normalised input (an estimate that fails on Gemma-3, see
WEIGHTS_ONLY_ARCHITECTURES).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# RoPE in the GGUF's row order: hlwq_gguf.kvcache.ROPE_NEOX_ARCHITECTURES rotate channel i with i + head_dim/2 (NEOX),
# the others 2i with 2i+1 (llama's converter permutes q/k rows into that order)
from hlwq_gguf.kvcache import ROPE_NEOX_ARCHITECTURES

from .source import ConversionError

# llama.cpp architectures whose graphs were read norm by norm (every tensor that reads a norm's output takes its
# scale) and whose seed replica keeps its function (tests/test_equalize.py). llama's block is "RMSNorm -> q/k/v,
# attention without a norm on v -> attn_output; RMSNorm -> gate/up, act(gate) * up -> ffn_down"; the tables below
# say where the others differ
SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3", "qwen35", "qwen35moe", "gemma4", "deepseek2")
# what else reads the attention norm's output: Qwen3.5's DeltaNet layers take their z gate and the alpha/beta
# projections from it beside the fused qkv (their output path, a gated RMSNorm per head, has no per-channel
# multiplier shared by all heads, so ssm_out keeps its columns)
ATTN_NORM_EXTRA_CONSUMERS = {**{arch: ("attn_gate.weight", "ssm_alpha.weight", "ssm_beta.weight")
                                for arch in ("qwen35", "qwen35moe")},
                             "deepseek2": ("attn_q_a.weight", "attn_kv_a_mqa.weight")}
# norms inside the attention and what reads them: MLA's query latent (its kv latent: _equalize_mla_latent)
INNER_NORMS = {"deepseek2": (("attn_q_a_norm.weight", ("attn_q_b.weight",)),)}
MLA_ARCHITECTURES = ("deepseek2",)
# the routed experts' own input norm, where they have one (Gemma-4: the MLP reads ffn_norm, the experts this)
EXPERT_INPUT_NORM = {"gemma4": "pre_ffw_norm_2.weight", "qwen35moe": "post_attention_norm.weight",
                     "deepseek2": "ffn_norm.weight"}
# tensors that read the experts' input to decide, not to code: they take its column scale exactly (Gemma-4's
# router reads its own normalisation of the residual instead, so it is not among the norm's consumers there)
NORM_READING_ROUTERS = {"qwen35moe": ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"),
                        "deepseek2": ("ffn_gate_inp.weight",)}
# V is RMS-normalised after its projection (Gemma-4), so a scale on its rows would not reach attn_output
V_NORMALISED_ARCHITECTURES = ("gemma4",)
# the norm feeding the FFN, where it is not ffn_norm (Gemma-3's post_attention_norm is a sandwich norm on the
# attention output instead)
FFN_INPUT_NORM = {"qwen35": "post_attention_norm.weight", "qwen35moe": "post_attention_norm.weight"}
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
    # layers whose K outliers were moved into Q (smooth_keys)
    smoothed_layers: list[int] = field(default_factory=list)
    # tensor kinds left alone, each with why (no per-channel multiplier before them to take the scale)
    left_alone: dict[str, str] = field(default_factory=dict)

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

    from hlwq_gguf import gguf_files

    try:
        reader = gguf_files.read_gguf(path)
    except gguf_files.GGUFFileError as e:
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
    return sum(np.einsum("ij,ij->j", m2, m2) for m2 in (m.reshape(-1, m.shape[-1]).astype(np.float64) for m in matrices))


def plan(architecture: str, tensors, hparams: dict, imatrix: dict[str, np.ndarray] | None = None,
         channels: bool = True, smooth_keys: bool = False) -> Plan:
    """The scales for a GGUF's tensors (`tensors`: name -> array in numpy order, e.g. GGUFReader data).

    Raises ConversionError for an architecture whose graph is not known to allow it; with an imatrix, a matrix it
    has no statistics for keeps the weights-only estimate.
    """
    result = Plan(source="imatrix" if imatrix else "weights")
    if channels:
        _equalize_channels(architecture, tensors, hparams, imatrix, result)
    if smooth_keys:
        _smooth_keys(architecture, tensors, hparams, imatrix, result)
    return result


def _head_counts(hparams: dict) -> tuple:
    return hparams.get("head_count"), hparams.get("head_count_kv") or hparams.get("head_count")


def _importance(imatrix, name: str, width: int, estimate):
    """The imatrix's mean squared input of `name`'s `width` columns, else `estimate` (a value or a callable)."""
    if imatrix and name in imatrix and imatrix[name].size % width == 0:
        # a batched product (MLA's per-head k_b, v_b) has one row of statistics per head: their mean
        return imatrix[name].reshape(-1, width).mean(axis=0)
    return estimate() if callable(estimate) else estimate


def _f32(tensors, name: str) -> np.ndarray:
    return np.asarray(tensors[name], dtype=np.float32)


def _equalize_channels(architecture: str, tensors, hparams: dict, imatrix, result: Plan) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"channel equalization is not available for architecture {architecture!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if not imatrix and architecture not in WEIGHTS_ONLY_ARCHITECTURES:
        raise ConversionError(f"equalization from the weights alone is not reliable for architecture "
                              f"{architecture!r} (measured worse than none on Gemma-3); give --imatrix FILE|auto")
    n_head, n_head_kv = _head_counts(hparams)

    def importance(name: str, width: int, estimate):
        return _importance(imatrix, name, width, estimate)

    def f32(name):
        return _f32(tensors, name)

    for layer in range(int(hparams["block_count"])):
        blk = f"blk.{layer}."
        attn_in = [blk + n for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight",
                                     *ATTN_NORM_EXTRA_CONSUMERS.get(architecture, ())) if blk + n in tensors]
        ffn_in = [blk + n for n in ("ffn_gate.weight", "ffn_up.weight") if blk + n in tensors]
        ffn_norm = blk + FFN_INPUT_NORM.get(architecture, "ffn_norm.weight")
        norm_gains = {}
        inner = [(blk + norm, [blk + c for c in consumers if blk + c in tensors])
                 for norm, consumers in INNER_NORMS.get(architecture, ())]
        for norm, consumers in ((blk + "attn_norm.weight", attn_in), (ffn_norm, ffn_in), *inner):
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
        if all(n in tensors for n in (gate, up, down)) and ffn_norm in norm_gains:
            _equalize_glu_down(tensors, down, [gate, up], norm_gains[ffn_norm].astype(np.float64) ** 2, importance,
                               result)

        if architecture in MLA_ARCHITECTURES:
            _equalize_mla_latent(blk, tensors, importance, result)
        if blk + "ssm_out.weight" in tensors:
            result.left_alone["ssm_out"] = "its input is a gated RMSNorm per head"
        if architecture in V_NORMALISED_ARCHITECTURES and blk + "attn_output.weight" in tensors:
            result.left_alone["attn_output"] = "V is RMS-normalised after its projection"
        if architecture in EXPERT_INPUT_NORM:
            _equalize_experts(blk, blk + EXPERT_INPUT_NORM[architecture], NORM_READING_ROUTERS.get(architecture, ()),
                              tensors, importance, result)

        v, o = blk + "attn_v.weight", blk + "attn_output.weight"
        if v in tensors and o in tensors and isinstance(n_head, int) and isinstance(n_head_kv, int) \
                and architecture not in V_NORMALISED_ARCHITECTURES \
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

    if "output.weight" not in tensors:
        result.left_alone["output"] = "tied to token_embd, which also feeds the first layer"
    if "output.weight" in tensors and "output_norm.weight" in tensors:
        gain = f32("output_norm.weight")
        w_out = f32("output.weight")
        a = importance("output.weight", w_out.shape[-1], gain.astype(np.float64) ** 2)
        s = channel_scales(a, _sq_col_norms(w_out))
        result.column_scales["output.weight"] = s
        result.row_divisors["output_norm.weight"] = s


def _equalize_experts(blk: str, norm: str, routers: tuple[str, ...], tensors, importance, result: Plan) -> None:
    """The MoE block of one layer behind `norm`: the routed experts' gate/up (fused or not, one scale for all
    experts), a shared expert's gate/up, and what reads the same input exactly (a router, a shared-expert gate) take
    its column scale; each expert's up rows, and the shared expert's, carry their down's."""
    fused, gate, up, down = (blk + n for n in ("ffn_gate_up_exps.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                                                "ffn_down_exps.weight"))
    gate_sh, up_sh, down_sh = (blk + n for n in ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"))
    experts = [fused] if fused in tensors else [n for n in (gate, up) if n in tensors]
    coded = experts + [n for n in (gate_sh, up_sh) if n in tensors]
    if norm not in tensors or not experts:
        return
    gain_sq = _f32(tensors, norm).astype(np.float64) ** 2
    matrices = [_f32(tensors, c) for c in coded]
    s = channel_scales(importance(coded[0], matrices[0].shape[-1], gain_sq), _sq_col_norms(*matrices))
    for c in coded + [blk + n for n in routers if blk + n in tensors]:
        result.column_scales[c] = s
    result.row_divisors[norm] = s

    if fused in tensors:
        _equalize_glu_down(tensors, down, [fused], gain_sq, importance, result)
    elif gate in tensors and up in tensors:
        _equalize_glu_down(tensors, down, [gate, up], gain_sq, importance, result)
    if gate_sh in tensors and up_sh in tensors:
        _equalize_glu_down(tensors, down_sh, [gate_sh, up_sh], gain_sq, importance, result)


def _equalize_glu_down(tensors, down: str, gate_up: list[str], gain_sq: np.ndarray, importance, result: Plan) -> None:
    """act(gate x) * (up x) -> down: down's columns take a scale that up's rows give back. `gate_up` is [gate, up],
    or [gate_up] for experts fused into one tensor (rows: gate first, then up, as llama.cpp's build_moe_ffn splits
    them); experts (3-D) share one scale. Without statistics for down's input, its mean square is estimated as
    E[(gate x)^2] E[(up x)^2] for an input with mean squares gain_sq."""
    if down not in tensors:
        return
    w_down = _f32(tensors, down)  # [(expert,) n_embd, n_ff]
    n_ff = w_down.shape[-1]

    def estimate():
        rows = [_f32(tensors, n).astype(np.float64) ** 2 @ gain_sq for n in gate_up]
        gate_sq, up_sq = (rows[0][..., :n_ff], rows[0][..., n_ff:]) if len(gate_up) == 1 else rows
        return (gate_sq * up_sq).reshape(-1, n_ff).mean(axis=0)

    s = channel_scales(importance(down, n_ff, estimate), _sq_col_norms(w_down))
    result.column_scales[down] = s
    if len(gate_up) == 1:
        result.row_divisors[gate_up[0]] = np.concatenate([np.ones(n_ff, np.float32), s])
    else:
        result.row_divisors[gate_up[1]] = s


def _equalize_mla_latent(blk: str, tensors, importance, result: Plan) -> None:
    """MLA's kv latent: the cache holds attn_kv_a_norm's output c, the scores read it through k_b (q_latent = k_b
    q_nope, so k_b's rows are latent channels) and the values through v_b (its columns). c / s with k_b's rows and
    v_b's columns times s leaves q_latent . c and v_b c as they were. Only v_b's codes see the scale (k_b's rows are
    coded each with its own norms), so s balances v_b's column norms against the latent's mean square."""
    norm, k_b, v_b = (blk + n for n in ("attn_kv_a_norm.weight", "attn_k_b.weight", "attn_v_b.weight"))
    if not all(n in tensors for n in (norm, k_b, v_b)):
        return
    gain = _f32(tensors, norm)
    w_v = _f32(tensors, v_b)  # [head, out, latent]
    w_k = _f32(tensors, k_b)  # [head, latent, q_nope]
    if w_v.shape[-1] != gain.size or w_k.shape[-2] != gain.size:
        return
    s = channel_scales(importance(v_b, gain.size, gain.astype(np.float64) ** 2), _sq_col_norms(w_v))
    result.row_divisors[norm] = s
    result.row_divisors[k_b] = 1 / s
    result.column_scales[v_b] = s


def _pair_index(head_dim: int, neox: bool) -> np.ndarray:
    """For each channel of a head, the index of its RoPE pair (the two channels one rotation mixes)."""
    channels = np.arange(head_dim)
    return channels % (head_dim // 2) if neox else channels // 2


def _smooth_keys(architecture: str, tensors, hparams: dict, imatrix, result: Plan) -> None:
    """Move K's outlier channels into Q: k rows (and bias) / lambda, q rows (and bias) * lambda, lambda per RoPE pair.

    q . k is unchanged, RoPE commutes with a scale shared by a pair, and a low-bit K cache then codes a K whose
    energy is spread evenly instead of concentrated in a few channels. The score error of a K code grows with
    ||q'||^2 ||k'||^2 = (sum lambda^2 Q_p)(sum K_p / lambda^2) over pairs p (Q_p, K_p: mean squares of the pair's
    channels, the q heads of a group summed); lambda_p^4 = K_p / Q_p minimises it (Cauchy-Schwarz), as
    QServe's SmoothAttention balances K against Q. Q_p, K_p are estimated as bias^2 + sum_j w_j^2 E[x_j^2].
    """
    neox = architecture in ROPE_NEOX_ARCHITECTURES
    n_head, n_head_kv = _head_counts(hparams)
    for layer in range(int(hparams["block_count"])):
        blk = f"blk.{layer}."
        q, k, norm = blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_norm.weight"
        # a norm on k (qwen3, gemma3) would undo a row scale: those would scale the norm gains instead
        if q not in tensors or k not in tensors or not isinstance(n_head, int) or not isinstance(n_head_kv, int) \
                or blk + "attn_k_norm.weight" in tensors or n_head % n_head_kv:
            continue
        wq, wk = _f32(tensors, q).astype(np.float64), _f32(tensors, k).astype(np.float64)
        head_dim = wk.shape[0] // n_head_kv
        if wq.shape[0] != n_head * head_dim or head_dim % 2:
            continue
        gain_sq = (lambda: _f32(tensors, norm).astype(np.float64) ** 2) if norm in tensors else None
        a = _importance(imatrix, k, wk.shape[1], gain_sq)
        if a is None:
            continue
        a = np.asarray(a, np.float64)
        k_sq, q_sq = wk ** 2 @ a, wq ** 2 @ a
        for bias, sq in ((blk + "attn_k.bias", k_sq), (blk + "attn_q.bias", q_sq)):
            if bias in tensors:
                sq += _f32(tensors, bias).astype(np.float64) ** 2
        pairs = _pair_index(head_dim, neox)
        group = n_head // n_head_kv
        k_pair = np.zeros((n_head_kv, head_dim // 2))
        q_pair = np.zeros((n_head_kv, head_dim // 2))
        np.add.at(k_pair, (slice(None), pairs), k_sq.reshape(n_head_kv, head_dim))
        np.add.at(q_pair, (slice(None), pairs), q_sq.reshape(n_head_kv, group, head_dim).sum(axis=1))
        lam = channel_scales(k_pair.reshape(-1), q_pair.reshape(-1)).reshape(n_head_kv, head_dim // 2)
        lam_k = lam[:, pairs].reshape(-1)
        lam_q = np.repeat(lam[:, None, pairs], group, axis=1).reshape(-1)
        for name, divisor in ((k, lam_k), (blk + "attn_k.bias", lam_k), (q, 1 / lam_q), (blk + "attn_q.bias", 1 / lam_q)):
            if name in tensors:
                result.row_divisors[name] = divisor.astype(np.float32)
        result.smoothed_layers.append(layer)
