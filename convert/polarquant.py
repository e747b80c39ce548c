"""Read the reference implementation's (PolarQuant / HLWQ) code checkpoints for a lossless import.

Four layouts carry HLWQ codes (shared/hlwq/REFERENCE.md section 3); each coded weight becomes a `CodedWeight`:
fp16 block norms, the codes of every (row, 128-block) and the reference table (A or B) they index. Everything
else in the folder (norms, embeddings the release kept in BF16, routers, ...) is a `PlainTensor`. The converter
(convert/_worker.py) feeds both to llama.cpp's own model classes, so names, layouts and expert stacking are theirs,
and copies the codes of every block that reaches the output unchanged (`_repack` there).

Releases without codes (torchao INT4 `model_int4.pt`, GPTQ/AWQ) are refused; no pickle is ever opened.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hlwq_gguf import codec

from .source import ConversionError, _check_safetensors_header, indexed_weight_files, read_json_object

BLOCK = 128
TABLE_LETTERS = {"A": "reference_A", "B": "reference_B"}
# bit-packed layouts store no table: the reference's newest loader decodes "hlwq-q*" with A, and the skill that
# writes PQ-Multi codes them with B (its CLI table)
DEFAULT_TABLE = {"hlwq": "A", "pq_multi": "B"}
_EXPERT_SUFFIX = re.compile(r"^(?P<base>.+)_e(?P<index>\d+)(\.weight)?$")
_CODE_SUFFIXES = (".codes", ".norms", ".ct", ".ct_scaled")
_PACKED_SUFFIXES = ("__packed", "__norms", "__meta")


# ---------------------------------------------------------------------------------------------- code layouts


def unpack_half_block_nibbles(packed: np.ndarray, n_codes: int) -> np.ndarray:
    """<= 4 bits: per 128-block 64 bytes, byte i = code[64 + i] << 4 | code[i]."""
    blocks = packed.reshape(-1, BLOCK // 2)
    return np.concatenate((blocks & 15, blocks >> 4), axis=1).reshape(*packed.shape[:-1], n_codes)


def unpack_lsb_stream(packed: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Code k in bits [k*bits, (k+1)*bits) of a little-endian bit stream (the reference quantizer's 5-bit layout)."""
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., :n_codes * bits]
    fields = stream.reshape(*packed.shape[:-1], n_codes, bits)
    return (fields << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def unpack_msb_stream(packed: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """A big-endian bit stream of `bits`-bit codes (PQ-Multi and hlwq-q* layouts)."""
    stream = np.unpackbits(packed.reshape(-1))[:n_codes * bits]
    fields = stream.reshape(n_codes, bits)
    return (fields << np.arange(bits - 1, -1, -1, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- tensors


class _SafetensorsFile:
    """Header-checked, memory-mapped safetensors file (no torch, no pickles)."""

    DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8"}

    def __init__(self, path: Path):
        header, header_len = _check_safetensors_header(path)
        self.path = path
        self.header = {name: info for name, info in header.items() if name != "__metadata__"}
        self.data_start = 8 + header_len
        self._map: np.memmap | None = None

    def array(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in self.DTYPES:
            raise ConversionError(f"{self.path}: tensor {name}: dtype {info['dtype']} cannot be read")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._map[self.data_start + begin:self.data_start + end]
        return raw.view(self.DTYPES[info["dtype"]]).reshape(info["shape"])


@dataclass
class PlainTensor:
    """A tensor the checkpoint keeps in its original dtype."""

    name: str
    file: _SafetensorsFile
    key: str

    @property
    def dtype(self) -> str:
        return self.file.header[self.key]["dtype"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.file.header[self.key]["shape"])

    def load_f32(self) -> np.ndarray:
        raw = self.file.array(self.key)
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


@dataclass
class CodedWeight:
    """One HLWQ-coded matrix [out, in]: fp16 norms [out, n_blocks] and codes [out, n_blocks * 128]."""

    name: str
    out_features: int
    in_features: int
    bits: int
    table: str
    source: str
    _norms: callable = field(repr=False)
    _codes: callable = field(repr=False)

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // BLOCK)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def norms(self) -> np.ndarray:
        norms = np.asarray(self._norms())
        if norms.shape != (self.out_features, self.n_blocks):
            raise ConversionError(f"{self.source}: tensor {self.name}: norms have shape {list(norms.shape)}, "
                                  f"expected [{self.out_features}, {self.n_blocks}] for a [{self.out_features}, {self.in_features}] weight")
        return norms.view("<f2")

    def codes(self) -> np.ndarray:
        codes = np.asarray(self._codes()).reshape(self.out_features, self.n_blocks * BLOCK)
        if codes.size and int(codes.max()) >= 1 << self.bits:
            raise ConversionError(f"{self.source}: tensor {self.name}: code {int(codes.max())} out of range for {self.bits} bits")
        return codes

    def dequantize(self) -> np.ndarray:
        """The reference's dequantization: r * (c[code] / sqrt(128)) @ H per block, padded tail trimmed (fp32)."""
        return self.decode(packed=False)[0]

    def decode(self, packed: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The dequantization and, from the same one read of norms and codes, the blocks in the ggml layout of
        HLWQ{bits}_{A|B} ([out * n_blocks, type_size] uint8; None unless `packed`)."""
        norms, codes = self.norms().reshape(-1), self.codes().reshape(-1, BLOCK)
        values = codec.dequantize_blocks(norms, codes, self.bits, BLOCK, self.table)
        values = values.reshape(self.out_features, -1)[:, :self.in_features]
        blocks = codec.block_type(self.bits, BLOCK, self.table).pack_blocks(norms, codes) if packed else None
        return values, blocks


@dataclass
class ImportedCheckpoint:
    path: Path
    format: str
    table_letter: str
    coded: dict[str, CodedWeight]
    plain: dict[str, PlainTensor]


# ---------------------------------------------------------------------------------------------- detection


def _base_model_name(path: Path, *configs: dict) -> str:
    for config in configs:
        for key in ("base_model", "base_model_name_or_path", "_name_or_path"):
            if isinstance(config.get(key), str) and config[key]:
                return config[key]
    return "the original BF16 model"


def refuse_codeless(path: Path) -> None:
    """Refuse releases that carry no HLWQ codes (torchao INT4, GPTQ/AWQ) with a one-line error naming the base model."""
    configs = {name: read_json_object(path / name) for name in ("polar_config.json", "hlwq_config.json", "config.json", "quantize_config.json")
               if (path / name).is_file()}
    quant = configs.get("polar_config.json") or configs.get("hlwq_config.json") or {}
    hf = configs.get("config.json", {})
    base = _base_model_name(path, quant, hf.get("quantization_config") or {}, hf)
    if quant.get("weight_format") == "torchao_int4" or (path / "model_int4.pt").exists():
        raise ConversionError(f"{path}: a torchao INT4 release (model_int4.pt, a pickle that is never opened), not HLWQ codes; "
                              f"convert the base model {base} instead")
    method = str((hf.get("quantization_config") or {}).get("quant_method") or configs.get("quantize_config.json", {}).get("quant_method", "")).lower()
    if method in ("gptq", "awq", "bitsandbytes", "torchao", "fp8", "compressed-tensors") or "quantize_config.json" in configs:
        raise ConversionError(f"{path}: {method or 'GPTQ'} weights, not HLWQ codes; convert the base model {base} instead")


def _weight_files(path: Path) -> list[Path]:
    indexed = indexed_weight_files(path)
    return indexed if indexed is not None else sorted(path.glob("*.safetensors"))


def detect(path: Path) -> str | None:
    """The code layout of a checkpoint folder ('dot', 'quantizer', 'pq_multi', 'hlwq'), or None for plain weights."""
    if (path / "codes.safetensors").is_file():
        return "pq_multi"
    for name in ("polar_config.json", "hlwq_config.json"):
        if (path / name).is_file() and str(read_json_object(path / name).get("format", "")).startswith("hlwq-q"):
            return "hlwq"
    files = _weight_files(path)
    for file in files:
        keys = _SafetensorsFile(file).header.keys()
        if any(k.endswith(".ct") for k in keys):
            return "dot"
        if any(k.endswith(".ct_scaled") for k in keys):
            return "quantizer"
        if any(k.endswith(".weight__packed") for k in keys):
            return "hlwq"
    return None


def _check_table(stored: np.ndarray, bits: int, scaled: bool, where: str) -> str:
    """The table letter whose fp32 values (divided by fp32 sqrt(128) for .ct_scaled) equal `stored` bit for bit."""
    stored = np.asarray(stored, dtype=np.float32)
    for letter, table in TABLE_LETTERS.items():
        values = codec.load_codebook(bits, table)
        if scaled:
            values = values / np.float32(np.sqrt(BLOCK))
        if stored.shape == values.shape and np.array_equal(stored.view(np.uint32), values.view(np.uint32)):
            return letter
    raise ConversionError(f"{where}: the stored codebook is neither the reference's table A nor B at {bits} bits")


def _layer_configs(path: Path) -> dict:
    for name in ("polar_config.json", "hlwq_config.json"):
        if (path / name).is_file():
            layers = read_json_object(path / name).get("layers") or {}
            return layers if isinstance(layers, dict) else {}
    return {}


def _int(meta: np.ndarray, i: int) -> int:
    return int(np.asarray(meta).reshape(-1)[i])


def load(path: Path, table_override: str | None = None) -> ImportedCheckpoint:
    """Index a code checkpoint: every coded weight (validated against its norms, meta and config) and every other tensor."""
    fmt = detect(path)
    if fmt is None:
        raise ConversionError(f"{path}: no HLWQ codes found")
    if fmt == "pq_multi":
        files = [path / "codes.safetensors"] + ([path / "bf16.safetensors"] if (path / "bf16.safetensors").is_file() else [])
    else:
        files = _weight_files(path)
    layers = _layer_configs(path)
    coded: dict[str, CodedWeight] = {}
    plain: dict[str, PlainTensor] = {}
    letters: set[str] = set()
    for st in (_SafetensorsFile(f) for f in files):
        keys = set(st.header)
        if fmt in ("dot", "quantizer"):
            stems = {k[:-len(".codes")] for k in keys if k.endswith(".codes")}
            for stem in sorted(stems):
                coded[stem + ".weight"], letter = _read_reference_layer(st, stem, layers.get(stem), fmt)
                letters.add(letter)
            used = {stem + s for stem in stems for s in _CODE_SUFFIXES}
        else:
            stems = {k[:-len("__packed")] for k in keys if k.endswith("__packed")}
            for stem in sorted(stems):
                name = stem.replace("__", ".") if fmt == "pq_multi" else stem
                coded[name] = _read_packed_layer(st, stem, name, fmt, path)
            used = {stem + s for stem in stems for s in _PACKED_SUFFIXES}
        for key in sorted(keys - used):
            if key.endswith(_CODE_SUFFIXES + _PACKED_SUFFIXES):
                raise ConversionError(f"{st.path}: tensor {key} has no matching codes tensor (incomplete HLWQ layer)")
            plain[key] = PlainTensor(key, st, key)
    if fmt in ("pq_multi", "hlwq"):
        letter = (table_override or DEFAULT_TABLE[fmt]).upper()
        if letter not in TABLE_LETTERS:
            raise ConversionError(f"--codebook must be A or B, not {table_override!r}")
        for weight in coded.values():
            weight.table = TABLE_LETTERS[letter]
    else:
        if len(letters) > 1:
            raise ConversionError(f"{path}: layers coded with both tables A and B")
        letter = letters.pop() if letters else "A"
        if table_override and table_override.upper() != letter:
            raise ConversionError(f"{path}: the file stores table {letter}; --codebook {table_override} would decode wrong weights")
    coded = _stack_experts(coded)
    return ImportedCheckpoint(path, fmt, letter, coded, plain)


def _read_reference_layer(st: _SafetensorsFile, stem: str, layer: dict | None, fmt: str) -> tuple[CodedWeight, str]:
    where = f"{st.path}: tensor {stem}"
    for suffix in (".norms", ".ct" if fmt == "dot" else ".ct_scaled"):
        if stem + suffix not in st.header:
            raise ConversionError(f"{where}{suffix}: missing")
    table_values = st.array(stem + (".ct" if fmt == "dot" else ".ct_scaled"))
    n_entries = table_values.shape[0] if table_values.ndim == 1 else 0
    bits = n_entries.bit_length() - 1
    if n_entries < 4 or n_entries != 1 << bits or bits > 6:
        raise ConversionError(f"{where}: codebook of {n_entries} entries is not a 2..6-bit table")
    letter = _check_table(table_values, bits, fmt == "quantizer", where)
    if bits < 3:
        raise ConversionError(f"{where}: 2-bit weights have no HLWQ weight type")
    out_features, stored_width = st.header[stem + ".codes"]["shape"]
    n_blocks = st.header[stem + ".norms"]["shape"][-1]
    in_padded = n_blocks * BLOCK
    in_features = in_padded
    if layer:
        if int(layer.get("bits", bits)) != bits:
            raise ConversionError(f"{where}: config says {layer.get('bits')} bits, the stored table has {bits}")
        in_features = int(layer.get("in_features", in_padded))
        declared_padded = int(layer.get("in_features_padded", layer.get("in_f_padded", in_padded)))
        if declared_padded != in_padded or int(layer.get("out_features", out_features)) != out_features or not 0 < in_features <= in_padded:
            raise ConversionError(f"{where}: config shape [{layer.get('out_features')}, {layer.get('in_features')}] (padded "
                                  f"{declared_padded}) disagrees with codes [{out_features}, {stored_width}] and norms of {n_blocks} blocks")
    if stored_width == in_padded:
        def codes():
            return st.array(stem + ".codes").astype(np.uint8)
    elif bits <= 4 and stored_width * 2 == in_padded:
        def codes():
            return unpack_half_block_nibbles(st.array(stem + ".codes").view(np.uint8), in_padded)
    elif stored_width * 8 == in_padded * bits:
        def codes():
            return unpack_lsb_stream(st.array(stem + ".codes").view(np.uint8), bits, in_padded)
    else:
        raise ConversionError(f"{where}.codes: width {stored_width} fits no {bits}-bit layout of {n_blocks} blocks (truncated or wrong meta?)")
    weight = CodedWeight(stem + ".weight", out_features, in_features, bits, TABLE_LETTERS[letter], str(st.path),
                         lambda: st.array(stem + ".norms"), codes)
    return weight, letter


def _read_packed_layer(st: _SafetensorsFile, stem: str, name: str, fmt: str, path: Path) -> CodedWeight:
    where = f"{st.path}: tensor {stem}"
    for suffix in ("__norms", "__meta"):
        if stem + suffix not in st.header:
            raise ConversionError(f"{where}{suffix}: missing")
    meta = st.array(stem + "__meta")
    need = 5 if fmt == "hlwq" else 4
    if meta.size < need:
        raise ConversionError(f"{where}__meta: {meta.size} values, expected {need}")
    out_features, n_blocks, block, total = (_int(meta, i) for i in range(4))
    in_features = _int(meta, 4) if fmt == "hlwq" else n_blocks * BLOCK
    packed_bytes = int(np.prod(st.header[stem + "__packed"]["shape"]))
    if block != BLOCK or total != out_features * n_blocks * BLOCK or not 0 < in_features <= n_blocks * BLOCK:
        raise ConversionError(f"{where}__meta: {meta.reshape(-1).tolist()} is not [out, n_blocks, 128, out*n_blocks*128{', in' if fmt == 'hlwq' else ''}]")
    if list(st.header[stem + "__norms"]["shape"]) != [out_features, n_blocks]:
        raise ConversionError(f"{where}__norms: shape {st.header[stem + '__norms']['shape']}, meta says [{out_features}, {n_blocks}]")
    if fmt == "hlwq":
        config = next((read_json_object(path / n) for n in ("polar_config.json", "hlwq_config.json") if (path / n).is_file()), {})
        bits = int(str(config.get("format", "hlwq-q5"))[len("hlwq-q"):] or 5)
    else:
        bits, rest = divmod(packed_bytes * 8, total)
        bits = bits if rest == 0 else -1
    if bits not in (3, 4, 5, 6) or packed_bytes * 8 != total * bits:
        raise ConversionError(f"{where}__packed: {packed_bytes} bytes do not hold {total} codes of {bits if bits > 0 else '2-8'} bits (truncated?)")
    return CodedWeight(name, out_features, in_features, bits, TABLE_LETTERS["A"], str(st.path),
                       lambda: st.array(stem + "__norms"),
                       lambda: unpack_msb_stream(st.array(stem + "__packed").view(np.uint8), bits, total))


def _stack_experts(coded: dict[str, CodedWeight]) -> dict[str, CodedWeight | list[CodedWeight]]:
    """Per-expert slices `P_e{i}` of a 3-D expert parameter P ([E, out, in] in the HF checkpoint): gathered in
    expert order under P's name, which is what llama.cpp's model classes expect to read."""
    groups: dict[str, dict[int, CodedWeight]] = {}
    result: dict = {}
    for name, weight in coded.items():
        match = _EXPERT_SUFFIX.match(name)
        if match is None:
            result[name] = weight
        else:
            groups.setdefault(match["base"], {})[int(match["index"])] = weight
    for base, experts in groups.items():
        indices = sorted(experts)
        if indices != list(range(len(indices))):
            raise ConversionError(f"{base}: expert slices {indices[:8]} are not numbered 0..{len(indices) - 1}")
        if len({(e.shape, e.bits, e.table) for e in experts.values()}) != 1:
            raise ConversionError(f"{base}: expert slices differ in shape or bits")
        result[base] = [experts[i] for i in indices]
    return result


def code_folder(path: Path) -> Path:
    """PQ-Multi releases keep each bit width in a subfolder (PQ3/, PQ5/ ...): pick it when it is the only one."""
    if (path / "codes.safetensors").is_file() or any(path.glob("*.safetensors")):
        return path
    candidates = sorted(p.parent for p in path.glob("*/codes.safetensors"))
    if len(candidates) > 1:
        raise ConversionError(f"{path}: holds several code sets ({', '.join(c.name for c in candidates)}); give one of those folders")
    if candidates:
        folder = candidates[0]
        if not (folder / "config.json").is_file():
            raise ConversionError(f"{folder}: no config.json (copy the model's config.json beside codes.safetensors)")
        return folder
    return path
