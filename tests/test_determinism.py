"""The same input gives the same bytes: across runs, across thread counts, through both conversion paths, and
between our converter (numpy-planned, C-coded) and the patched llama-quantize. Per-type numpy == C bytes is
tests/test_ggml_kernels.py::test_c_quantizer_matches_numpy."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from convert import convert_checkpoint
from convert.reference import reference_gguf
from hlwq_gguf import codec, gguf_types, llama_tools

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor_bytes(path) -> dict[str, tuple[int, bytes]]:
    import gguf

    gguf_types.register(gguf)
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_hf, llama_build):
    # ffn_down rows 320 wide, so the 64-block fallback types are in the file too
    return write_tiny_llama(tmp_path_factory.mktemp("determinism") / "hf", smollm2_hf, layers=3)


@pytest.mark.parametrize("recipe", ["hlwq5", "hlwq5_m"])
def test_conversion_is_byte_identical_across_runs_and_threads(checkpoint, tmp_path, recipe):
    digests = {}
    for run, threads in enumerate([1, 1, 2]):
        out = convert_checkpoint(checkpoint, tmp_path / f"run{run}-t{threads}.gguf", recipe=recipe, threads=threads,
                                 quiet=True).output
        digests[(run, threads)] = _digest(out)
    assert len(set(digests.values())) == 1, digests


def test_gguf_path_and_llama_quantize_give_the_same_tensor_bytes(checkpoint, tmp_path, llama_build):
    """F32 GGUF -> HLWQ5 through our requantizer (threads 1 and 2) and through llama-quantize (1 and 2 threads):
    the same file each time, and the same bytes for every tensor as the direct safetensors conversion."""
    full = reference_gguf(checkpoint, tmp_path / "f32.gguf", "f32")
    ours = [convert_checkpoint(full, tmp_path / f"ours-t{t}.gguf", recipe="hlwq5", threads=t, quiet=True).output
            for t in (1, 2)]
    assert _digest(ours[0]) == _digest(ours[1])
    theirs = [llama_tools.llama_quantize(llama_build, full, tmp_path / f"lq-t{t}.gguf", "HLWQ5", threads=t).output
              for t in (1, 2)]
    assert _digest(theirs[0]) == _digest(theirs[1])

    direct = _tensor_bytes(convert_checkpoint(checkpoint, tmp_path / "direct.gguf", recipe="hlwq5", quiet=True).output)
    for other in (ours[0], theirs[0]):
        tensors = _tensor_bytes(other)
        assert tensors.keys() == direct.keys()
        differing = [name for name in direct if tensors[name] != direct[name]]
        assert not differing, f"{other.name}: {differing}"
    hlwq_types = {kind for kind, _ in direct.values()} & {gguf_types.GGML_TYPE_IDS[name] for name in codec.BLOCK_TYPES}
    assert len(hlwq_types) >= 2  # HLWQ5 and its 64-block fallback were both compared
