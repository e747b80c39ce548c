#!/usr/bin/env python3
"""The HLWQ tables: compute the int8-grid codebooks, print their C tables, and write the type table's rows.

    python scripts/gen_codebook_tables.py json   # (re)compute the lloyd_int8 tables and the int8 images of the
                                                 # reference tables into hlwq_gguf/data/codebooks.json
    python scripts/gen_codebook_tables.py c      # print every C table (canonical 2..6 bits, reference A/B 3..6)
    python scripts/gen_codebook_tables.py types [--tree DIR] [--check]
                                                 # the rows of hlwq_gguf/typetable.py in docs/TYPES.md and, with
                                                 # --tree, in a patched llama.cpp (ggml.h, llama.h, gguf-py's
                                                 # constants.py); --check only compares (exit 1 on a difference)

Every kernel multiplies int8 codebook entries with int8 activations (AVX2 maddubs, AVX-512 VNNI, CUDA dp4a), so a
codebook is an int8 table t and a step: c[k] = fp32(step * t[k]).

* lloyd_int8 (what hlwq-gguf quantizes with): the Lloyd-Max quantizer of N(0,1) constrained to that grid, outer
  entries at +-127. Start from the converged Lloyd-Max table rounded to the grid, run the discrete Lloyd iteration,
  then descend coordinate-wise (each inner entry +-1, its mirror with it) with the step re-optimised for every
  candidate. The distortion is computed from exact N(0,1) integrals, so the tables are deterministic.
* reference_A/B (imported checkpoints): the fp32 tables stay as the reference wrote them and decode exactly; the
  kernels use their int8 image round(c / step) with step = max|c| / 127.
"""
import json
import math
import re
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = REPO / "hlwq_gguf" / "data" / "codebooks.json"
TYPES_DOC = REPO / "docs" / "TYPES.md"
CANONICAL = "lloyd_int8"
C_TABLES = [(CANONICAL, "", (2, 3, 4, 5, 6)), ("reference_A", "a", (3, 4, 5, 6)), ("reference_B", "b", (3, 4, 5, 6))]


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2))) if math.isfinite(x) else float(x > 0)


def _edges(c: list[float]) -> list[float]:
    return [-math.inf] + [(a + b) / 2 for a, b in zip(c, c[1:])] + [math.inf]


def distortion(c: list[float]) -> float:
    """E[(x - c[nearest(x)])^2] for x ~ N(0,1), from exact integrals over the nearest-centroid cells."""
    edges, total = _edges(c), 0.0
    for k, ck in enumerate(c):
        a, b = edges[k], edges[k + 1]
        m0 = _cdf(b) - _cdf(a)
        m1 = _phi(a) - _phi(b)
        m2 = m0 + (a * _phi(a) if math.isfinite(a) else 0.0) - (b * _phi(b) if math.isfinite(b) else 0.0)
        total += m2 - 2 * ck * m1 + ck * ck * m0
    return total


def _centroids(c: list[float]) -> list[float]:
    edges = _edges(c)
    return [(_phi(edges[k]) - _phi(edges[k + 1])) / (_cdf(edges[k + 1]) - _cdf(edges[k])) for k in range(len(c))]


def _best_step(t: list[int], guess: float) -> tuple[float, float]:
    """Golden-section search of the step minimising the distortion of step * t (unimodal near the optimum)."""
    lo, hi = guess * 0.9, guess * 1.1
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = distortion([a * v for v in t]), distortion([b * v for v in t])
    while hi - lo > guess * 1e-10:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = distortion([a * v for v in t])
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = distortion([b * v for v in t])
    step = (lo + hi) / 2
    return step, distortion([step * v for v in t])


def _clip(v: float) -> int:
    return max(-127, min(127, round(v)))


def lloyd_int8(converged: list[float]) -> tuple[list[int], float]:
    """The int8 table and step of the grid-constrained Lloyd-Max quantizer (see the module docstring)."""
    step = max(abs(v) for v in converged) / 127
    t = [_clip(v / step) for v in converged]
    seen = set()
    while tuple(t) not in seen:
        seen.add(tuple(t))
        t = [_clip(v / step) for v in _centroids([step * v for v in t])]
    step, best = _best_step(t, step)
    n, improved = len(t), True
    while improved:
        improved = False
        for k in range(n // 2, n - 1):
            for delta in (-1, 1):
                cand = list(t)
                cand[k] += delta
                cand[n - 1 - k] = -cand[k]
                if cand[k] < 1 or any(a >= b for a, b in zip(cand, cand[1:])):
                    continue
                cand_step, value = _best_step(cand, step)
                if value < best - 1e-13:
                    t, step, best, improved = cand, cand_step, value, True
    return t, step


def _fp32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _fp32_hex(v: float) -> str:
    return struct.pack(">f", v).hex()


def update_json() -> None:
    data = json.loads(TABLES.read_text())
    for bits, entry in data["tables"].items():
        t, step = lloyd_int8(entry["converged"]["values"])
        step = _fp32(step)
        values = [_fp32(step * v) for v in t]
        entry[CANONICAL] = {"values": values, "fp32_hex": [_fp32_hex(v) for v in values], "int8": t, "step": step,
                            "mse_on_N01": round(distortion(values), 8)}
        for name in ("reference_A", "reference_B"):
            ref = entry[name]["values"]
            ref_step = _fp32(max(abs(v) for v in ref) / 127)
            ref_t = [_clip(v / ref_step) for v in ref]
            entry[name]["int8"] = ref_t
            entry[name]["step"] = ref_step
            entry[name]["mse_on_N01_int8"] = round(distortion([ref_step * v for v in ref_t]), 8)
        print(f"{bits} bits: {CANONICAL} distortion {entry[CANONICAL]['mse_on_N01']:.7f}, "
              f"converged {entry['converged']['mse_on_N01']:.7f} "
              f"(+{100 * (entry[CANONICAL]['mse_on_N01'] / entry['converged']['mse_on_N01'] - 1):.2f} %)")
    data["description"] = data["description"].split(" 'lloyd_int8'")[0] + (
        " 'lloyd_int8': the Lloyd-Max quantizer of N(0,1) constrained to c = step * t with t int8 (|t| <= 127),"
        " computed by scripts/gen_codebook_tables.py; what hlwq-gguf quantizes with, since every kernel multiplies"
        " int8 entries. 'int8'/'step' of the reference tables: the int8 images the kernels use for imported"
        " checkpoints, whose fp32 tables still decode exactly.")
    TABLES.write_text(json.dumps(data, indent=1) + "\n")


def _hex(v: float) -> str:
    mantissa, exponent = float(v).hex().split("p")
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}"


def print_c_tables() -> None:
    data = json.loads(TABLES.read_text())["tables"]
    for table, suffix, bit_widths in C_TABLES:
        for bits in bit_widths:
            entry = data[str(bits)][table]
            values = [struct.unpack(">f", bytes.fromhex(h))[0] for h in entry["fp32_hex"]]
            t, n, name = entry["int8"], 1 << bits, f"{suffix}{bits}"
            assert t == [-v for v in reversed(t)] and all(v > 0 for v in t[n // 2:]), f"{table}/{bits} is not symmetric"
            print(f"GGML_TABLE_BEGIN(float, hlwq_codebook_{name}, {n})")
            for i in range(0, n, 4):
                print("    " + " ".join(f"{_hex(v)}f," for v in values[i:i + 4]))
            print("GGML_TABLE_END()\n")
            print(f"GGML_TABLE_BEGIN(int8_t, hlwq_kvalues_{name}, {n})")
            for i in range(0, n, 16):
                print("    " + " ".join(f"{v}," for v in t[i:i + 16]))
            print("GGML_TABLE_END()\n")
            # the upper half's entries: the SIMD kernels look up magnitudes and move the sign onto the activation
            mag = t[n // 2:] + [0] * max(0, 16 - n // 2)
            print(f"GGML_TABLE_BEGIN(uint8_t, hlwq_kmag_{name}, {len(mag)})")
            for i in range(0, len(mag), 16):
                print("    " + " ".join(f"{v}," for v in mag[i:i + 16]))
            print("GGML_TABLE_END()\n")
        steps = " ".join(f"{_hex(data[str(b)][table]['step'])}f," for b in bit_widths)
        name = f"hlwq_kvalues_step{'_' + suffix if suffix else ''}"
        print(f"// the step of hlwq_kvalues_{suffix}<bits> for bits {bit_widths[0]}..{bit_widths[-1]}: c = step * t")
        print(f"GGML_TABLE_BEGIN(float, {name}, {len(bit_widths)})\n    {steps}\nGGML_TABLE_END()\n")


class _Rows:
    """A run of generated lines in a file: the optional header line that opens it, and the rows it consists of."""

    def __init__(self, row: str | None, render, header: str | None = None, closing: str | None = None):
        self.row, self.render, self.header, self.closing = row and re.compile(row), render, header, closing

    def replace(self, lines: list[str], where: str) -> list[str]:
        if self.row is None:  # everything from the header line to the closing line
            try:
                first = next(i for i, line in enumerate(lines) if self.header in line)
                last = next(i for i in range(first, len(lines)) if self.closing in lines[i])
            except StopIteration:
                raise SystemExit(f"{where}: no {self.header!r} ... {self.closing!r} section") from None
            return lines[:first] + self.render() + lines[last + 1:]
        rows = [i for i, line in enumerate(lines) if self.row.search(line)]
        if not rows:
            raise SystemExit(f"{where}: no line matches {self.row.pattern!r}")
        first, last = rows[0], rows[-1]
        if self.header is not None:
            headers = [i for i in range(first) if self.header in lines[i]]
            if not headers:
                raise SystemExit(f"{where}: no header line {self.header!r} before the rows")
            first = headers[-1]
        if any(not (self.row.search(line) or i == first or i == last) for i, line in enumerate(lines[first:last + 1], first)
               if not line.lstrip().startswith(("//", "#"))):
            raise SystemExit(f"{where}: the rows of {self.row.pattern!r} are not one run")
        return lines[:first] + self.render() + lines[last + 1:]


def _c_enum_rows(prefix: str, entries, width: int) -> list[str]:
    return [f"        {(prefix + name).ljust(width)} = {value},{' // ' + note if note else ''}" for name, value, note in entries]


def _ggml_type_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return ["        // HLWQ (Hadamard-Lloyd) types: rows generated from hlwq-gguf's type table (docs/TYPES.md); the ids",
            "        // continue upstream's so that every array indexed by type stays dense"] + \
        _c_enum_rows("GGML_TYPE_", [(t.name, t.id, t.note) for t in tt.GGML_TYPES], 20) + \
        [f"        {'GGML_TYPE_COUNT'.ljust(20)} = {tt.GGML_TYPE_COUNT},"]


def _ggml_ftype_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return _c_enum_rows("GGML_FTYPE_", [(f.name, f.ggml_ftype_id, f.note) for f in tt.FILE_TYPES if f.ggml_ftype_id], 25)


def _llama_ftype_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return _c_enum_rows("LLAMA_FTYPE_", [(f.name, f.id, f.note) for f in tt.FILE_TYPES], 32)


def _gguf_py_type_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return ["    # HLWQ (Hadamard-Lloyd) types: rows generated from hlwq-gguf's type table (docs/TYPES.md)"] + \
        [f"    {t.name.ljust(10)} = {t.id}" for t in tt.GGML_TYPES]


def _gguf_py_ftype_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return [f"    {f.name.ljust(20)} = {f.id}  # {f.note}" for f in tt.FILE_TYPES]


def _gguf_py_size_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    return [f"    {('GGMLQuantizationType.' + t.name + ':').ljust(32)} ({t.block_size}, "
            f"{4 if t.is_activation else 2} + {t.type_size - (4 if t.is_activation else 2)})," for t in tt.GGML_TYPES]


def _types_doc_rows() -> list[str]:
    from hlwq_gguf import typetable as tt

    def decodes(t) -> str:
        if t.is_activation:
            return f"activation side: `x @ H{t.block_size}` rounded to int8, one fp32 scale"
        table = "" if t.codebook == "lloyd_int8" else f" on the reference's {t.codebook.replace('_', ' table ')[10:]}"
        return f"`w = d * (c{t.bits}[code] / sqrt({t.block_size})) @ H{t.block_size}`{table}"

    lines = ["<!-- generated by scripts/gen_codebook_tables.py types from hlwq_gguf/typetable.py -->",
             "| id | ggml type | block | bits | bytes/block | bpw | decodes as |", "|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {t.id} | `{t.name.lower()}` | {t.block_size} | {t.bits} | {t.type_size} | {t.bits_per_weight:g} | "
              f"{decodes(t)} |" for t in tt.GGML_TYPES]
    lines += ["", f"`GGML_TYPE_COUNT` = {tt.GGML_TYPE_COUNT}. File types (`general.file_type`, `llama_ftype`; "
              "`ggml_ftype` for the single-type ones):", "",
              "| llama_ftype | ggml_ftype | name | recipe (`--recipe`, llama-quantize) |", "|---:|---:|---|---|"]
    lines += [f"| {f.id} | {f.ggml_ftype_id if f.ggml_ftype_id is not None else '-'} | `{f.name}` | `{f.recipe}`"
              f"{': ' + f.note if f.note != 'except 1d tensors' else ''} |" for f in tt.FILE_TYPES]
    return lines + ["<!-- end of generated rows -->"]


def _targets(tree: Path | None) -> list[tuple[Path, list[_Rows]]]:
    targets = [(TYPES_DOC, [_Rows(None, _types_doc_rows, header="<!-- generated by",
                                  closing="<!-- end of generated rows -->")])]
    if tree is not None:
        targets += [
            (tree / "ggml/include/ggml.h", [_Rows(r"GGML_TYPE_(Q8_)?HLWQ\w*\s*=|GGML_TYPE_COUNT\s*=", _ggml_type_rows,
                                                  header="// HLWQ (Hadamard-Lloyd) types"),
                                            _Rows(r"GGML_FTYPE_MOSTLY_HLWQ\w*\s*=", _ggml_ftype_rows)]),
            (tree / "include/llama.h", [_Rows(r"LLAMA_FTYPE_MOSTLY_HLWQ\w*\s*=", _llama_ftype_rows)]),
            (tree / "gguf-py/gguf/constants.py", [
                _Rows(r"^    (Q8_)?HLWQ\w*\s*=\s*\d+$", _gguf_py_type_rows, header="# HLWQ (Hadamard-Lloyd) types"),
                _Rows(r"^    MOSTLY_HLWQ\w*\s*=", _gguf_py_ftype_rows),
                _Rows(r"^    GGMLQuantizationType\.(Q8_)?HLWQ\w*:", _gguf_py_size_rows)]),
        ]
    return targets


def write_type_rows(tree: Path | None, check: bool) -> int:
    """Write (or with `check` compare) the type table's rows in docs/TYPES.md and the patched tree's headers."""
    sys.path.insert(0, str(REPO))
    stale = []
    for path, runs in _targets(tree):
        lines = path.read_text().split("\n")
        new = lines
        for run in runs:
            new = run.replace(new, str(path))
        if new != lines:
            stale.append(path)
            if not check:
                path.write_text("\n".join(new))
    for path in stale:
        print(f"{path}: {'differs from' if check else 'rewritten from'} hlwq_gguf/typetable.py")
    return 1 if check and stale else 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "c"
    if command == "types":
        tree = Path(argv[argv.index("--tree") + 1]) if "--tree" in argv else None
        return write_type_rows(tree, check="--check" in argv)
    {"json": update_json, "c": print_c_tables}[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
