#!/usr/bin/env python3
"""Static evidence for a CUDA kernel's speed without a GPU: the SASS of its main loop, counted by instruction kind.

    nvcc ... -arch=sm_90 -cubin mmvq-hlwq.cu -o hlwq.cubin && cuobjdump -sass hlwq.cubin > hlwq.sass
    python scripts/sass_loop_counts.py hlwq.sass 'mul_mat_vec_hlwq<\\(ggml_type\\)102, 1, false>' --weights 8
    python scripts/sass_loop_counts.py mmvq.sass 'mul_mat_vec_q<\\(ggml_type\\)13, 1, false' --weights 16

The main loop is the backward branch whose body holds the most IDP.4A (dp4a) instructions; the counts are per
iteration of that body and, with --weights (the weights one thread handles per source-level iteration) and the
unroll factor read from the body, per weight. cuobjdump and nvdisasm come from the nvidia-cuda-cuobjdump wheel.
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys

_FUNCTION = re.compile(r"Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"^\s*(0x[0-9a-f]+)\s*$")

KINDS = {
    "dp4a": ("IDP.4A",),
    "global/const loads": ("LDG", "LDC", "ULDC", "LD."),
    "shared loads": ("LDS",),
    "byte permute": ("PRMT",),
    "logic/shift": ("LOP3", "SHF", "SHL", "SHR", "LEA", "BMSK", "SGXT"),
    "integer add/mul": ("IADD3", "IMAD", "IABS", "VIADD", "IADD", "ISETP", "VABSDIFF4"),
    "float": ("FFMA", "FMUL", "FADD", "I2F", "F2F", "HADD2", "HFMA2", "HMUL2", "F2FP"),
}


def demangle(names: list[str]) -> list[str]:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return result.stdout.splitlines() if result.returncode == 0 else names


def kernels(sass: str) -> dict[str, list[str]]:
    """Lines of each function's SASS, by demangled name."""
    parts = _FUNCTION.split(sass)
    names = demangle(parts[1::2])
    return {name: body.splitlines() for name, body in zip(names, parts[2::2])}


def main_loop(lines: list[str]) -> list[tuple[str, str]]:
    """(opcode, operands) of the backward-branch body with the most dp4a instructions."""
    code: list[tuple[int, str, str]] = []
    for line in lines:
        match = _INSTRUCTION.search(line)
        if match:
            code.append((int(match.group(1), 16), match.group(2), match.group(3)))
    index_of = {address: i for i, (address, _, _) in enumerate(code)}
    best: list[tuple[str, str]] = []
    for index, (address, opcode, operands) in enumerate(code):
        target = _TARGET.search(operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            body = [(op, rest) for _, op, rest in code[index_of.get(int(target.group(1), 16), index):index + 1]]
            if sum(op.startswith("IDP") for op, _ in body) > sum(op.startswith("IDP") for op, _ in best):
                best = body
    return best


def classify(body: list[tuple[str, str]]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for opcode, _ in body:
        kind = next((k for k, prefixes in KINDS.items() if opcode.startswith(prefixes)), "other")
        counts[kind] += 1
    counts["total"] = len(body)
    return counts


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sass", help="cuobjdump -sass output")
    parser.add_argument("kernel", help="regular expression matched against the demangled kernel names")
    parser.add_argument("--weights", type=int, help="weights one thread handles per source-level loop iteration")
    parser.add_argument("--dp4a-per-iteration", type=int, default=None,
                        help="dp4a instructions per source-level iteration (gives the unroll factor)")
    args = parser.parse_args(argv)
    found = {n: l for n, l in kernels(open(args.sass).read()).items() if re.search(args.kernel, n)}
    if not found:
        print(f"{args.sass}: no kernel matches {args.kernel!r}", file=sys.stderr)
        return 2
    for name, lines in found.items():
        body = main_loop(lines)
        counts = classify(body)
        unroll = (counts["dp4a"] // args.dp4a_per_iteration) if args.dp4a_per_iteration else 1
        print(name)
        for kind in ["total", *KINDS, "other"]:
            line = f"  {kind:20s} {counts[kind]:5d}"
            if args.weights and unroll:
                line += f"   {counts[kind] / (args.weights * unroll):6.2f} per weight"
            print(line)
        if args.dp4a_per_iteration:
            print(f"  (loop body = {unroll} source iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(run())
