"""The AMX tile configuration fix (ggml_patch: "ggml-cpu/amx: load the tile configuration from a constant object").

ggml's AMX matrix product configures its tiles with ldtilecfg once per thread. With GCC's _tile_loadconfig, whose
memory operand covers 8 bytes, the stores that filled in rows[] and colsb[] were dead to the optimizer and dropped:
the instruction read palette 1 with every tile empty, and K-quant and Q8_0 models crashed on AMX machines.

test_tile_configuration_reaches_ldtilecfg runs on every x86-64 machine: it compiles the patched mmq.cpp as the
build does, for Sapphire Rapids (the only way the AMX code is compiled on a CPU without AMX), and reads the bytes
each ldtilecfg of the generated code loads. Compiled from the pristine mmq.cpp, the instruction reads a stack slot
of which GCC 12 keeps only the palette byte. test_kquant_model_runs_through_amx needs a CPU with AMX: it runs
K-quant and Q8_0 models through the AMX buffers and compares their perplexity with the unrepacked run.
"""
from __future__ import annotations

import json
import re
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from hlwq_gguf.testing.tiny_llama import write_tiny_llama
from hlwq_gguf import llama_tools, upstream

MMQ = "ggml/src/ggml-cpu/amx/mmq.cpp"
# the tiling described above ggml_tile_config_init in mmq.cpp: B tiles 8 x 64 bytes (TMM0, TMM1), A tiles
# 16 x 32 (TMM2, TMM3), C tiles 16 x 16 int32 (TMM4-TMM7); TMM8.. unused
EXPECTED_ROWS = [8, 8, 16, 16, 16, 16, 16, 16] + [0] * 8
EXPECTED_COLSB = [64, 64, 32, 32, 64, 64, 64, 64] + [0] * 8


def cpu_has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_int8" in flags and "amx_tile" in flags


def compile_to_assembly(build_dir: Path, tree: Path, output: Path) -> str:
    """tree's mmq.cpp compiled with the build's own command line for it, but for Sapphire Rapids, as assembly."""
    commands = json.loads((build_dir / "compile_commands.json").read_text())
    entry = next(e for e in commands if e["file"].endswith("amx/mmq.cpp"))
    args = shlex.split(entry["command"])
    args = [a for a in args if not a.startswith("-march=") and not a.startswith("-mtune=")]
    out = args.index("-o")
    args[out + 1] = str(output)
    args[args.index("-c")] = "-S"
    args[-1] = str(tree / MMQ)
    result = subprocess.run([*args, "-march=sapphirerapids"], capture_output=True, text=True, cwd=entry["directory"])
    assert result.returncode == 0, result.stderr[-3000:]
    return output.read_text()


_DIRECTIVE_SIZES = {".byte": 1, ".value": 2, ".short": 2, ".long": 4, ".quad": 8}


def symbol_bytes(assembly: str, symbol: str, size: int) -> bytes:
    """The first `size` bytes of the data GCC emits after `symbol:` (.byte/.value/.long/.quad/.zero/.string)."""
    lines = assembly[assembly.index(f"\n{symbol}:\n") + len(symbol) + 3:].splitlines()
    data = b""
    for line in lines:
        if len(data) >= size:
            break
        parts = line.split(None, 1)
        if not parts or parts[0].endswith(":"):
            break
        directive, operand = parts[0], parts[1] if len(parts) > 1 else ""
        if directive in _DIRECTIVE_SIZES:
            data += int(operand, 0).to_bytes(_DIRECTIVE_SIZES[directive], "little", signed=int(operand, 0) < 0)
        elif directive == ".zero":
            data += bytes(int(operand))
        elif directive == ".string":
            data += bytes(operand.strip('"'), "ascii").decode("unicode_escape").encode("latin1") + b"\0"
    assert len(data) >= size, f"{symbol}: only {len(data)} bytes of data"
    return data[:size]


def ldtilecfg_configurations(assembly: str) -> list[bytes]:
    """The 64 bytes each ldtilecfg in the code loads; only constants can be read off the assembly."""
    configs = []
    for operand in re.findall(r"\bldtilecfg\s+(\S+)", assembly):
        constant = re.fullmatch(r"([\w.$]+)\(%rip\)", operand)
        assert constant, (f"ldtilecfg loads {operand}, a stack slot: its bytes are whatever stores the compiler kept "
                          "(GCC's _tile_loadconfig tells it that 8 bytes are read)")
        configs.append(symbol_bytes(assembly, constant.group(1), 64))
    return configs


def decode_tile_config(config: bytes) -> tuple[int, list[int], list[int]]:
    """palette_id, colsb[16], rows[16] of the 64-byte tile configuration (Intel SDM, LDTILECFG)."""
    return config[0], list(struct.unpack_from("<16H", config, 16)), list(config[48:64])


def test_tile_configuration_reaches_ldtilecfg(llama_build, tmp_path):
    assembly = compile_to_assembly(llama_build.root, upstream.patched_tree(), tmp_path / "mmq.s")
    configs = ldtilecfg_configurations(assembly)
    assert configs, "no ldtilecfg in the AMX matrix product"
    for config in configs:
        palette, colsb, rows = decode_tile_config(config)
        assert palette == 1
        assert rows == EXPECTED_ROWS
        assert colsb == EXPECTED_COLSB


@pytest.fixture(scope="module")
def kquant_models(llama_build, smollm2_hf, tmp_path_factory):
    """A tiny llama whose rows take K-quants (256/512 wide) as Q4_K_M and Q8_0 files."""
    from convert.reference import reference_gguf

    work = tmp_path_factory.mktemp("amx")
    folder = write_tiny_llama(work / "hf", smollm2_hf, hidden=256, intermediate=512, layers=2)
    f32 = reference_gguf(folder, work / "tiny-f32.gguf", "f32")
    return {ftype: llama_tools.llama_quantize(llama_build, f32, work / f"tiny-{ftype}.gguf", ftype).output
            for ftype in ("Q4_K_M", "Q8_0")}


@pytest.mark.skipif(not cpu_has_amx(), reason="the CPU has no AMX (amx_int8, amx_tile): the AMX buffer type is not built")
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_kquant_model_runs_through_amx(llama_build, kquant_models, ftype, tmp_path):
    """Prompts of more than one token go through the AMX tiles; the perplexity must equal the one without repacking."""
    model = kquant_models[ftype]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and the {i % 13} rows" for i in range(2000)))
    log = llama_tools.run_tool([llama_build.tool("llama-completion"), "-m", model, "-p", "The tile configuration",
                                "-n", "8", "--temp", "0", "-no-cnv", "-t", "2"], timeout=300)
    assert "AMX" in log  # the weights went to the AMX buffer
    ppl = {}
    for repack in ("", "--no-repack"):
        log = llama_tools.run_tool([llama_build.tool("llama-perplexity"), "-m", model, "-f", text, "-c", "128",
                                    "--chunks", "4", "-b", "128", "-t", "2", *([repack] if repack else [])], timeout=600)
        ppl[repack] = float(re.search(r"Final estimate: PPL = ([0-9.]+)", log).group(1))
    assert abs(ppl[""] - ppl["--no-repack"]) <= 1e-2 * ppl["--no-repack"], ppl
