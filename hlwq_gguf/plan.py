"""Where each tensor of a (MoE) GGUF should live for a given VRAM budget: the placement planner of issue #6.

llama.cpp can keep chosen tensors in system RAM (`-ot REGEX=CPU`, `--n-cpu-moe N`) while the rest of the model
runs on the GPU. For a mixture-of-experts model the routed experts are the tensors to move: they are most of the
bytes but each token reads only a few experts, so streaming them from host memory costs far less than moving the
attention or the KV cache would. The planner reads sizes from the GGUF alone (no GPU, no llama.cpp) and places

1. everything that is not a routed expert (attention, norms, routers, dense FFNs, shared experts, the output
   projection), the KV cache for the chosen context and KV type, a compute-buffer estimate and a fixed reserve
   for the CUDA context on the GPU; if that alone does not fit, there is no plan (PlanError);
2. then the routed experts layer by layer, as many layers as fit, on the GPU, the rest in system RAM. Like
   llama.cpp's `--n-cpu-moe N`, the experts of the *first* N layers are the ones kept on the CPU, so a plan is
   always expressible both as `--n-cpu-moe N` and as one `-ot` regex.

What the numbers are: tensor bytes are exact (the GGUF's own sizes); the KV cache follows llama.cpp's sizing
(context padded to 256 cells, sliding-window layers sized n_swa + n_ubatch unless swa_full, MLA caches K only,
MTP/NextN layers have no KV in the main context) and is checked against llama.cpp's own report in the tests;
the compute buffer is an estimate (the largest of the logits, attention and FFN temporaries of one ubatch),
checked to bound llama.cpp's CPU compute buffer from above. Recurrent state (Mamba / DeltaNet layers) is not
sized: hybrid models get a plan for their attention layers only, and the plan says so.

KV types: llama.cpp's own and the HLWQ cache types (KV_TYPES); `hlwq3`/`hlwq4` are the ggml types
hlwq3_64/hlwq4_64, whose 64-value blocks fit every head size that is a multiple of 64.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import kvbits, typetable

# llama.cpp's --n-cpu-moe regex (common/common.h LLM_FFN_EXPS_REGEX): the routed-expert tensors of a layer.
# Classifying with the very regex the overrides use keeps "what the plan calls an expert" and "what llama.cpp
# moves" the same set of tensors.
ROUTED_EXPERT_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
SHARED_EXPERT_REGEX = r"\.ffn_(up|down|gate|gate_up)_shexp"
_LAYER = re.compile(r"^blk\.(\d+)\.")

# llama.cpp's accepted KV-cache types (common/arg.cpp kv_cache_types), as (block size, bytes per block)
KV_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
} | {t.name.lower().removesuffix("_64"): (t.block_size, t.type_size) for t in typetable.KV_CACHE_TYPES} \
  | {t.name.lower(): (t.block_size, t.type_size) for t in typetable.KV_CACHE_TYPES}
# the short names of the HLWQ cache types -> their ggml type names
KV_TYPE_ALIASES = {"hlwq3": "hlwq3_64", "hlwq4": "hlwq4_64", "hlwq5": "hlwq5_64", "hlwq6": "hlwq6_64"}
DEFAULT_UBATCH = 512          # llama.cpp's default n_ubatch: the compute buffer is reserved for this many tokens
CTX_PAD = 256                 # llama_context pads n_ctx (and each SWA cache) to a multiple of 256 cells
# architecture -> (n_pattern, dense_first) of llama.cpp's load_swa_pattern where the GGUF has no per-layer pattern:
# layer il slides unless il % n_pattern == n_pattern - 1 (dense_first: == 0); 0 = every layer slides
SWA_PATTERNS = {"gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
                "cohere2": (4, False), "gpt-oss": (2, False), "exaone4": (4, False), "olmo2": (4, False),
                "llama4": (4, False), "afmoe": (4, False), "smallthinker": (4, True)}
DEFAULT_RESERVE = 512 * 2**20  # CUDA context, cuBLAS workspace and allocator slack that llama.cpp does not count

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": 2**20,
          "g": 1000**3, "gb": 1000**3, "gib": 2**30, "t": 1000**4, "tb": 1000**4, "tib": 2**40}


class PlanError(ValueError):
    """Bad input or no placement fits; the message is one line naming the file and the reason."""


def parse_size(text: str | int) -> int:
    """'24GiB', '24 GB', '1.5TiB', '512MiB' or a plain byte count -> bytes (GiB = 2**30, GB = 10**9)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read {text!r} as a memory size (examples: 24GiB, 16GB, 8192MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Tensor:
    name: str
    n_bytes: int
    layer: int | None  # blk.N index; None for token_embd, output, output_norm, rope_freqs ...

    @property
    def is_routed_expert(self) -> bool:
        return re.search(ROUTED_EXPERT_REGEX, self.name) is not None

    @property
    def is_shared_expert(self) -> bool:
        return re.search(SHARED_EXPERT_REGEX, self.name) is not None


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's KV-cache row widths (elements per token) as llama.cpp allocates them."""

    index: int
    k_width: int
    v_width: int  # 0 for MLA, whose cache is K only
    sliding: bool


@dataclass
class ModelLayout:
    """What the planner needs from a GGUF: every tensor's size and layer, and the attention geometry."""

    path: Path
    arch: str
    n_layer: int            # trunk layers (block_count minus MTP/NextN layers)
    n_layer_all: int        # block_count
    n_embd: int
    n_vocab: int
    n_head: int
    n_ff: int               # widest dense FFN
    n_expert: int
    n_expert_used: int
    n_ff_expert: int
    n_swa: int              # sliding window (0 = none)
    head_dim_max: int       # widest K head (MLA: the absorbed kv_lora + rope width)
    tied_output: bool       # no output.weight: llama.cpp duplicates token_embd onto the output device
    tensors: list[Tensor]
    attention: list[AttentionLayer]
    recurrent_layers: list[int] = field(default_factory=list)
    mtp_bytes: int = 0      # MTP/NextN layer tensors: in the file, not loaded by default, not in `tensors`
    k_bits: str = ""        # hlwq.kv_k_bits: a hlwq3_64 K's bits per layer as calibrated (hlwq_gguf.kvbits)

    @property
    def is_moe(self) -> bool:
        return any(t.is_routed_expert for t in self.tensors)

    def expert_bytes_by_layer(self) -> dict[int, int]:
        """Routed-expert bytes of each layer that has routed experts (layer order)."""
        out: dict[int, int] = {}
        for t in self.tensors:
            if t.is_routed_expert and t.layer is not None:
                out[t.layer] = out.get(t.layer, 0) + t.n_bytes
        return dict(sorted(out.items()))

    def layer_bytes(self, layer: int) -> int:
        """All weight bytes of blk.`layer` that are not routed experts."""
        return sum(t.n_bytes for t in self.tensors if t.layer == layer and not t.is_routed_expert)

    def token_embd_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors if t.name == "token_embd.weight")


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _per_layer(value, n: int, default: int = 0) -> list[int]:
    """A GGUF hparam that is either one number or one number per layer, as a per-layer list."""
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"per-layer array of {len(value)} entries for {n} layers")
        return [int(v) for v in value]
    return [int(value)] * n


def read_layout(path: str | Path) -> ModelLayout:
    """Read tensor sizes and the attention / expert hyperparameters of `path` (any GGUF, HLWQ types included)."""
    from . import gguf_files

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such file")
    try:
        reader = gguf_files.read_gguf(path, header_only=True)
    except gguf_files.GGUFFileError as e:
        raise PlanError(str(e)) from None
    try:
        return _layout(path, reader)
    except PlanError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
        # metadata of the wrong kind (a string where a count belongs, a malformed array): one line, not a traceback
        raise PlanError(f"{path}: malformed metadata ({type(e).__name__}: {e})") from None


def _layout(path: Path, reader) -> ModelLayout:
    arch = _field(reader, "general.architecture")
    if not arch:
        raise PlanError(f"{path}: no general.architecture in the GGUF metadata")

    def hp(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_layer_all = int(hp("block_count", 0))
    if n_layer_all <= 0:
        raise PlanError(f"{path}: no {arch}.block_count in the GGUF metadata")
    if n_layer_all > len(reader.tensors):  # every layer has tensors; a hostile count would size per-layer lists
        raise PlanError(f"{path}: {arch}.block_count {n_layer_all} exceeds the file's {len(reader.tensors)} tensors")
    n_nextn = int(hp("nextn_predict_layers", 0) or 0)
    n_layer = n_layer_all - n_nextn
    tensors, mtp_bytes = [], 0
    for t in reader.tensors:
        m = _LAYER.match(t.name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= n_layer:
            # llama.cpp skips the MTP/NextN layers unless asked to load them for speculative decoding
            mtp_bytes += int(t.n_bytes)
            continue
        tensors.append(Tensor(t.name, int(t.n_bytes), layer))
    names = {t.name for t in tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    n_embd = int(hp("embedding_length", 0))
    n_vocab = int(hp("vocab_size", 0) or (int(embd.shape[1]) if embd is not None else 0))

    try:
        n_head_kv = _per_layer(hp("attention.head_count_kv", hp("attention.head_count")), n_layer_all)
        n_head = max(_per_layer(hp("attention.head_count"), n_layer_all))
        n_ff = max(_per_layer(hp("feed_forward_length"), n_layer_all))
        swa_pattern = hp("attention.sliding_window_pattern")
        sliding = ([bool(s) for s in swa_pattern] if isinstance(swa_pattern, (list, tuple)) else [False] * n_layer_all)
    except ValueError as e:
        raise PlanError(f"{path}: {e}") from None
    n_swa = int(hp("attention.sliding_window", 0) or 0)
    if n_swa and not any(sliding):
        # llama.cpp's per-architecture pattern (load_swa_pattern), which a scalar pattern key overrides; without
        # one, every layer slides (Mistral-style)
        n_pattern, dense_first = SWA_PATTERNS.get(arch, (0, False))
        if isinstance(swa_pattern, int):
            n_pattern = swa_pattern
        sliding = [n_pattern == 0 or (il % n_pattern != 0 if dense_first else il % n_pattern < n_pattern - 1)
                   for il in range(n_layer_all)]
    head_k = int(hp("attention.key_length", 0) or (n_embd // max(n_head, 1)))
    head_v = int(hp("attention.value_length", 0) or head_k)
    head_k_swa = int(hp("attention.key_length_swa", 0) or head_k)
    head_v_swa = int(hp("attention.value_length_swa", 0) or head_v)
    is_mla = bool(hp("attention.key_length_mla", 0))

    # hybrid models: layers without KV (recurrent) are those llama.cpp marks recurrent; the GGUF says so either
    # by a full-attention interval (Qwen3-Next / Qwen3.5) or by zero KV heads on the layer
    interval = int(hp("full_attention_interval", 0) or 0)
    recurrent = [il for il in range(n_layer) if (interval and (il + 1) % interval != 0) or n_head_kv[il] == 0]
    # Gemma-3n / Gemma-4: the last shared_kv_layers layers reuse earlier layers' caches
    n_shared_kv = int(hp("attention.shared_kv_layers", 0) or 0)
    attention = []
    for il in range(n_layer - n_shared_kv):
        if il in recurrent:
            continue
        swa = bool(n_swa) and sliding[il]
        k, v = (head_k_swa, head_v_swa) if swa else (head_k, head_v)
        attention.append(AttentionLayer(il, k * n_head_kv[il], 0 if is_mla else v * n_head_kv[il], swa))
    return ModelLayout(
        path=path, arch=str(arch), n_layer=n_layer, n_layer_all=n_layer_all, n_embd=n_embd, n_vocab=n_vocab,
        n_head=n_head, n_ff=n_ff, n_expert=int(hp("expert_count", 0) or 0),
        n_expert_used=int(hp("expert_used_count", 0) or 0),
        n_ff_expert=int(hp("expert_feed_forward_length", 0) or 0), n_swa=n_swa,
        head_dim_max=max(head_k, head_k_swa),
        tied_output="output.weight" not in names, tensors=tensors, attention=attention, recurrent_layers=recurrent,
        mtp_bytes=mtp_bytes, k_bits=str(_field(reader, kvbits.K_BITS_KEY, "") or ""))


def _kv_type(name: str, path: Path) -> tuple[int, int]:
    if name.lower() not in KV_TYPES:
        raise PlanError(f"{path}: KV type {name!r} is not one llama.cpp knows; use one of {', '.join(KV_TYPES)}")
    return KV_TYPES[name.lower()]


def _row_bytes(kv_type: tuple[int, int], width: int) -> int:
    block, size = kv_type
    return width // block * size


def kv_cells(layout: ModelLayout, n_ctx: int, sliding: bool, n_ubatch: int = DEFAULT_UBATCH,
             swa_full: bool = False) -> int:
    """Cells llama.cpp allocates per layer: n_ctx padded to 256; a sliding layer holds n_swa + n_ubatch at most."""
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    if sliding and not swa_full:
        cells = min(cells, -(-(layout.n_swa + n_ubatch) // CTX_PAD) * CTX_PAD)
    return cells


def calibrated_k_bits(layout: ModelLayout) -> str:
    """The per-layer bits llama.cpp gives a hlwq3_64 K: LLAMA_KV_HLWQ_K_BITS, else the file's hlwq.kv_k_bits; ""
    where neither applies (0, or not one digit 3 or 4 per layer, which llama.cpp ignores with a warning)."""
    digits = os.environ.get(kvbits.K_BITS_ENV, layout.k_bits).strip()
    if len(digits) != layout.n_layer_all or set(digits) - set("34"):
        return ""
    return digits


def layer_k_type(layout: ModelLayout, index: int, type_k: str, safe_k_layers: tuple[int, ...] = (),
                 k_bits: str | None = None) -> str:
    """The K type llama.cpp gives layer `index` when type_k is asked for: q8_0 in safe_k_layers (hlwq_gguf.kvcache),
    hlwq3_64 or hlwq4_64 per the calibrated digits (k_bits, default calibrated_k_bits) for a hlwq3_64 K."""
    if index in safe_k_layers:
        return "q8_0"
    digits = calibrated_k_bits(layout) if k_bits is None else k_bits
    if digits and KV_TYPE_ALIASES.get(type_k.lower(), type_k.lower()) == "hlwq3_64":
        return f"hlwq{digits[index]}_64"
    return type_k


def kv_cache_bytes(layout: ModelLayout, n_ctx: int, type_k: str = "f16", type_v: str | None = None,
                   n_ubatch: int = DEFAULT_UBATCH, swa_full: bool = False, safe_k_layers: tuple[int, ...] = (),
                   k_bits: str | None = None) -> int:
    """Bytes of the KV cache llama.cpp allocates for one sequence of `n_ctx` tokens (all attention layers).

    safe_k_layers: the layers whose K llama.cpp keeps at q8_0 although an HLWQ K type was asked for
    (hlwq_gguf.kvcache); a hlwq3_64 K takes the file's calibrated bits per layer unless k_bits gives other digits
    ("" for none: layer_k_type)."""
    _kv_type(type_k, layout.path)
    v_type = _kv_type(type_v or type_k, layout.path)
    total = 0
    for layer in layout.attention:
        cells = kv_cells(layout, n_ctx, layer.sliding, n_ubatch, swa_full)
        k_type = _kv_type(layer_k_type(layout, layer.index, type_k, safe_k_layers, k_bits), layout.path)
        for kv_type, width in ((k_type, layer.k_width), (v_type, layer.v_width)):
            if width % kv_type[0]:
                raise PlanError(f"{layout.path}: layer {layer.index} KV rows of {width} are not a multiple of "
                                f"the {kv_type[0]}-element blocks of the chosen KV type")
            total += cells * _row_bytes(kv_type, width)
    return total


def compute_buffer_bytes(layout: ModelLayout, n_ctx: int, n_ubatch: int = DEFAULT_UBATCH,
                         flash_attn: bool = True, kv_quantized: bool = False) -> int:
    """Estimate of llama.cpp's compute buffer on the device that runs the layers (one ubatch, worst case).

    ggml's graph allocator reuses memory between stages, so the buffer is about its largest stage plus the
    residual stream: the logits of a full ubatch (the reservation assumes every token wants logits), the
    attention scores (n_head x n_kv x n_ubatch floats without flash attention; with flash attention and a
    quantized cache, an F16 copy of one layer's K and V instead) or the FFN / selected experts' activations.
    """
    f32 = 4
    cells = -(-n_ctx // CTX_PAD) * CTX_PAD
    logits = layout.n_vocab * n_ubatch * f32
    widest_k = max((a.k_width for a in layout.attention), default=0)
    widest_v = max((a.v_width for a in layout.attention), default=0)
    if flash_attn:
        # Q, the output and their F16 copies: a few n_head x head_dim rows per token
        attention = 3 * layout.n_head * layout.head_dim_max * n_ubatch * f32
        if kv_quantized:
            attention += cells * (widest_k + widest_v) * 2
    else:
        attention = 2 * layout.n_head * cells * n_ubatch * f32
    ffn = 3 * n_ubatch * max(layout.n_ff, layout.n_expert_used * layout.n_ff_expert) * f32
    router = n_ubatch * layout.n_expert * f32 * 2
    residual = 4 * layout.n_embd * n_ubatch * f32
    return max(logits, attention, ffn + router) + residual


@dataclass
class Plan:
    """A placement: which layers' routed experts stay in system RAM, and the memory that results."""

    layout: ModelLayout
    n_ctx: int
    type_k: str
    type_v: str
    vram_budget: int
    reserve: int
    gpu_weights: int            # everything but routed experts and the input embedding
    gpu_expert_layers: list[int]
    cpu_expert_layers: list[int]
    expert_bytes: dict[int, int]
    kv_bytes: int
    compute_bytes: int
    host_compute_bytes: int

    @property
    def gpu_expert_bytes(self) -> int:
        return sum(self.expert_bytes[il] for il in self.gpu_expert_layers)

    @property
    def cpu_expert_bytes(self) -> int:
        return sum(self.expert_bytes[il] for il in self.cpu_expert_layers)

    @property
    def gpu_total(self) -> int:
        return self.gpu_weights + self.gpu_expert_bytes + self.kv_bytes + self.compute_bytes + self.reserve

    @property
    def host_total(self) -> int:
        return self.layout.token_embd_bytes() + self.cpu_expert_bytes + self.host_compute_bytes

    @property
    def case(self) -> str:
        """'all on GPU', 'some experts in RAM' or 'experts in RAM' (only attention and shared weights on GPU)."""
        if not self.cpu_expert_layers:
            return "all on GPU"
        return "some experts in RAM" if self.gpu_expert_layers else "experts in RAM"

    def overrides(self, device: str = "CPU") -> list[str]:
        """The `-ot` overrides (REGEX=DEVICE) that put the planned layers' experts on `device`; [] if none."""
        if not self.cpu_expert_layers:
            return []
        return [f"blk\\.{layer_regex(self.cpu_expert_layers)}{ROUTED_EXPERT_REGEX}={device}"]

    def n_cpu_moe(self) -> int | None:
        """The equivalent `--n-cpu-moe N`, when the CPU layers are exactly the first N expert layers."""
        first = sorted(self.expert_bytes)[: len(self.cpu_expert_layers)]
        return max(self.cpu_expert_layers) + 1 if self.cpu_expert_layers == first and first else None

    def llama_args(self) -> list[str]:
        """llama-cli / llama-server arguments that realise this plan."""
        args = ["-ngl", "999", "-c", str(self.n_ctx), "-ctk", KV_TYPE_ALIASES.get(self.type_k, self.type_k),
                "-ctv", KV_TYPE_ALIASES.get(self.type_v, self.type_v), "-fa", "on"]
        for o in self.overrides():
            args += ["-ot", o]
        return args

    def table(self) -> str:
        """The plan as text: a per-layer table, the GPU / host totals and the llama.cpp arguments."""
        L = self.layout
        lines = [f"{L.path.name}: {L.arch}, {L.n_layer} layers"
                 + (f" + {L.n_layer_all - L.n_layer} MTP" if L.n_layer_all > L.n_layer else "")
                 + (f", {L.n_expert} experts ({L.n_expert_used} active)" if L.n_expert else "")
                 + f"; ctx {self.n_ctx}, KV {self.type_k}/{self.type_v}; VRAM budget {format_bytes(self.vram_budget)}",
                 f"plan: {self.case}", "",
                 f"{'layer':>5}  {'other weights':>13}  {'routed experts':>14}  experts on"]
        for il in sorted({t.layer for t in L.tensors if t.layer is not None}):
            experts = self.expert_bytes.get(il)
            where = "-" if experts is None else ("CPU" if il in self.cpu_expert_layers else "GPU")
            lines.append(f"{il:>5}  {format_bytes(L.layer_bytes(il)):>13}  "
                         f"{format_bytes(experts) if experts else '-':>14}  {where}")
        lines.append("")
        rows = [("weights, non-expert", self.gpu_weights, 0), ("token embedding (input)", 0, L.token_embd_bytes()),
                ("routed experts", self.gpu_expert_bytes, self.cpu_expert_bytes),
                (f"KV cache ({self.n_ctx} x {self.type_k}/{self.type_v})", self.kv_bytes, 0),
                ("compute buffers (estimate)", self.compute_bytes, self.host_compute_bytes),
                ("CUDA context reserve", self.reserve, 0)]
        lines.append(f"{'':30} {'GPU':>11} {'host RAM':>11}")
        for label, gpu, host in rows:
            lines.append(f"{label:30} {format_bytes(gpu) if gpu else '-':>11} {format_bytes(host) if host else '-':>11}")
        lines.append(f"{'total':30} {format_bytes(self.gpu_total):>11} {format_bytes(self.host_total):>11}"
                     f"   (budget {format_bytes(self.vram_budget)}, free {format_bytes(self.vram_budget - self.gpu_total)})")
        if L.mtp_bytes:
            lines.append(f"note: the MTP layer ({format_bytes(L.mtp_bytes)}) is not loaded by default and not counted")
        if L.recurrent_layers:
            lines.append(f"note: {len(L.recurrent_layers)} recurrent layers' state is not included (small, fixed size)")
        lines.append("")
        quoted = [f"'{a}'" if "\\" in a or "|" in a else a for a in self.llama_args()]
        lines.append("llama.cpp: " + " ".join(quoted))
        n = self.n_cpu_moe()
        if n is not None:
            lines.append(f"           (the -ot is the same as --n-cpu-moe {n})")
        return "\n".join(lines)


def layer_regex(layers: list[int]) -> str:
    """A regex group matching exactly these layer numbers, e.g. [0..19] -> '([0-9]|1[0-9])'.

    Numbers are grouped by everything but their last digit; runs of last digits become character classes.
    Only groups, alternation and character classes are used: the same in Python `re` and C++ std::regex.
    """
    by_prefix: dict[str, list[int]] = {}
    for n in sorted(set(layers)):
        s = str(n)
        by_prefix.setdefault(s[:-1], []).append(int(s[-1]))
    parts = []
    for prefix, digits in by_prefix.items():
        runs, start = [], digits[0]
        for prev, cur in zip(digits, digits[1:] + [None]):
            if cur != prev + 1:
                runs.append(str(start) if start == prev else f"{start}-{prev}" if prev > start + 1 else f"{start}{prev}")
                start = cur
        body = "".join(runs)
        parts.append(prefix + (body if len(digits) == 1 else f"[{body}]"))
    return "(" + "|".join(parts) + ")"


def make_plan(layout: ModelLayout, vram: int | str, n_ctx: int, type_k: str = "f16", type_v: str | None = None,
              reserve: int = DEFAULT_RESERVE, n_ubatch: int = DEFAULT_UBATCH, swa_full: bool = False,
              safe_k_layers: tuple[int, ...] = (), k_bits: str | None = None) -> Plan:
    """Place `layout` on a GPU with `vram` bytes: non-experts, KV and compute first, then whole layers of experts.

    Raises PlanError (one line) when even the non-expert weights, KV cache and compute buffer do not fit.
    """
    vram = parse_size(vram)
    type_v = type_v or type_k
    if n_ctx <= 0:
        raise PlanError(f"{layout.path}: context size must be positive, not {n_ctx}")
    kv = kv_cache_bytes(layout, n_ctx, type_k, type_v, n_ubatch, swa_full, safe_k_layers, k_bits)
    quantized = type_k.lower() not in ("f32", "f16", "bf16") or type_v.lower() not in ("f32", "f16", "bf16")
    compute = compute_buffer_bytes(layout, n_ctx, n_ubatch, flash_attn=True, kv_quantized=quantized)
    # the input embedding stays in system RAM (llama.cpp runs get_rows on the CPU); a tied output projection is
    # a second copy of it on the GPU
    embd = layout.token_embd_bytes()
    gpu_weights = sum(t.n_bytes for t in layout.tensors if not t.is_routed_expert) - embd
    if layout.tied_output:
        gpu_weights += embd
    host_compute = (layout.n_embd * n_ubatch + layout.n_vocab) * 4  # embeddings of one ubatch + one logits row
    experts = layout.expert_bytes_by_layer()
    fixed = gpu_weights + kv + compute + reserve
    if fixed > vram:
        raise PlanError(f"{layout.path}: does not fit in {format_bytes(vram)} of VRAM even with every expert in RAM: "
                        f"non-expert weights {format_bytes(gpu_weights)} + KV cache {format_bytes(kv)} ({n_ctx} x "
                        f"{type_k}/{type_v}) + compute {format_bytes(compute)} + reserve {format_bytes(reserve)} = "
                        f"{format_bytes(fixed)}; lower --ctx or use a smaller --kv type")
    # keep the experts of the first layers on the CPU (as --n-cpu-moe does): walk from the last layer down
    free = vram - fixed
    gpu_layers: list[int] = []
    for il in sorted(experts, reverse=True):
        if experts[il] > free:
            break
        free -= experts[il]
        gpu_layers.append(il)
    cpu_layers = sorted(set(experts) - set(gpu_layers))
    return Plan(layout=layout, n_ctx=n_ctx, type_k=type_k.lower(), type_v=type_v.lower(), vram_budget=vram,
                reserve=reserve, gpu_weights=gpu_weights, gpu_expert_layers=sorted(gpu_layers),
                cpu_expert_layers=cpu_layers, expert_bytes=experts, kv_bytes=kv, compute_bytes=compute,
                host_compute_bytes=host_compute)


def plan_file(path: str | Path, vram: int | str, n_ctx: int, type_k: str = "f16", type_v: str | None = None,
              **kwargs) -> Plan:
    """read_layout + make_plan for a GGUF path; with an HLWQ K type, the layers llama.cpp keeps at a q8_0 K
    (hlwq_gguf.kvcache) are sized as such unless safe_k_layers says otherwise."""
    layout = read_layout(path)  # ggml's own parser has vetted the file before gguf-py reads its tensors below
    if "safe_k_layers" not in kwargs and type_k.lower().startswith("hlwq"):
        from . import kvcache

        kwargs["safe_k_layers"] = tuple(kvcache.safe_k_layers(path, n_ctx=n_ctx))
    return make_plan(layout, vram, n_ctx, type_k, type_v, **kwargs)
