"""The GGUF fuzz harness (scripts/fuzz_gguf.py) runs clean for a bounded time, and the inputs behind its findings,
rebuilt here from valid seeds, stay fixed: ggml's loader refused to allocate a data section larger than the file
only after aborting (patch 0002), gguf-py looped on hostile array lengths (now gated by ggml's parser), and the
MoE planner raised tracebacks on metadata of the wrong kind or sized lists by a hostile block count."""
from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hlwq_gguf import gguf_files, plan
from hlwq_gguf.testing.fuzz_seeds import write_seeds

pytestmark = [pytest.mark.slow, pytest.mark.needs_build]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz_gguf.py"
FUZZ_SECONDS = 60


def _seed(tmp_path) -> bytes:
    return write_seeds(tmp_path / "seeds")[0].read_bytes()


def _after_key(data: bytes, key: str) -> int:
    """Offset just past a metadata key or tensor name (its u64 length and bytes) in a GGUF."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def _reproduce(tmp_path, data: bytes) -> subprocess.CompletedProcess:
    path = tmp_path / "input.gguf"
    path.write_bytes(data)
    return subprocess.run([sys.executable, str(SCRIPT), "--reproduce", str(path)], capture_output=True, text=True,
                          errors="replace", timeout=300)


def test_fuzzer_runs_clean(tmp_path, llama_build):
    artifacts = tmp_path / "artifacts"
    result = subprocess.run([sys.executable, str(SCRIPT), "--seconds", str(FUZZ_SECONDS), "--artifacts", str(artifacts),
                             "--lib-dir", str(llama_build.bin)], capture_output=True, text=True, errors="replace",
                            timeout=FUZZ_SECONDS + 300, cwd=tmp_path)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    print(f"fuzzer: {runs.group(1) if runs else '?'} inputs in {FUZZ_SECONDS} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(artifacts.glob("*")), sorted(p.name for p in artifacts.iterdir())
    assert runs and int(runs.group(1)) > 1000


def test_data_section_larger_than_the_file_is_refused(tmp_path, llama_build):
    data = bytearray(_seed(tmp_path))
    # the last tensor (a 1-D norm): no later offset betrays its size, only the file's length does
    at = _after_key(bytes(data), "blk.0.attn_norm.weight") + 4  # n_dims, then ne[0]
    data[at:at + 8] = struct.pack("<Q", 2**40)
    result = _reproduce(tmp_path, bytes(data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exceeds the" in result.stderr and "bytes left in the input" in result.stderr


def test_hostile_array_length_is_refused_before_gguf_py_reads_it(tmp_path, llama_build):
    data = bytearray(_seed(tmp_path))
    at = _after_key(bytes(data), "tokenizer.ggml.scores") + 4 + 4  # value type ARRAY, item type, then the length
    data[at - 4:at] = struct.pack("<I", 9)  # an array of arrays, as gguf-py would walk it element by element
    data[at:at + 8] = struct.pack("<Q", 2**40)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(gguf_files.GGUFFileError, match="llama.cpp's GGUF parser refuses it"):
        gguf_files.read_gguf(path)
    with pytest.raises(plan.PlanError, match="hostile.gguf"):
        plan.read_layout(path)


def test_planner_refuses_hostile_metadata_in_one_line(tmp_path, llama_build):
    seed = _seed(tmp_path)
    huge_layers = bytearray(seed)
    at = _after_key(seed, "llama.block_count") + 4  # value type u32, then the value
    huge_layers[at:at + 4] = struct.pack("<I", 2**31)
    wrong_kind = bytearray(seed)
    at = _after_key(seed, "llama.embedding_length")
    wrong_kind[at:at + 4] = struct.pack("<I", 6)  # FLOAT32 where a count belongs: same width, read as a float
    wrong_kind[at + 4:at + 8] = struct.pack("<f", float("nan"))
    for name, data in {"layers": huge_layers, "kind": wrong_kind}.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(bytes(data))
        with pytest.raises(plan.PlanError) as info:
            plan.make_plan(plan.read_layout(path), "24GiB", 4096)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
