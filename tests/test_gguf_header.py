"""The header-only GGUF read (hlwq_gguf.gguf_files.header_reader), which the KV-cache rules, the placement plan and
kv-calibrate's input check use before a model opens: the same tensors, data and scalar metadata as gguf-py's full
read, with the long tokenizer arrays read as their length only."""
from __future__ import annotations

import numpy as np
import pytest

from hlwq_gguf import gguf_files, gguf_types

LIMIT = gguf_files.HEADER_ARRAY_LIMIT


def _write(path, arrays: dict[str, list], big_endian: bool = False) -> None:
    gguf = gguf_types.register()
    endianness = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianness)
    writer.add_uint32("llama.block_count", 1)
    for key, values in arrays.items():
        writer.add_array(key, values)
    writer.add_string("after.arrays", "still read")
    writer.add_tensor("first", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("second", np.full(5, 7, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _compare(header, full, skipped: set[str]) -> None:
    assert [(t.name, int(t.tensor_type), list(t.shape), t.data_offset) for t in header.tensors] == \
        [(t.name, int(t.tensor_type), list(t.shape), t.data_offset) for t in full.tensors]
    for h, f in zip(header.tensors, full.tensors):
        assert np.array_equal(np.asarray(h.data), np.asarray(f.data)), h.name
    assert list(header.fields) == list(full.fields)
    for key, field in full.fields.items():
        kept = header.fields[key]
        if key in skipped:
            assert kept.data == [] and kept.types == field.types[:1] + field.types[-1:], key
            assert int(kept.parts[-1][0]) == len(field.data), key  # the length is kept
        else:
            assert kept.types == field.types and kept.contents() == field.contents(), key


@pytest.mark.parametrize("big_endian", [False, True])
def test_long_arrays_are_skipped_and_everything_else_read(tmp_path, big_endian):
    gguf = gguf_types.register()
    arrays = {"short.strings": [f"s{i}" for i in range(LIMIT)], "long.strings": [f"token{i}" * (i % 5) for i in
              range(LIMIT + 1)], "long.numbers": list(range(LIMIT + 1)), "long.floats": [0.5] * (3 * LIMIT),
              "short.numbers": list(range(LIMIT))}
    path = tmp_path / "arrays.gguf"
    _write(path, arrays, big_endian)
    header, full = gguf_files.header_reader(path), gguf.GGUFReader(str(path))
    _compare(header, full, {"long.strings", "long.numbers", "long.floats"})
    assert header.fields["after.arrays"].contents() == "still read"
    assert header.fields["short.strings"].contents() == arrays["short.strings"]
    assert np.asarray(header.tensors[0].data).astype(np.float32).tolist() == np.arange(12).reshape(3, 4).tolist()


@pytest.mark.slow
def test_a_real_model_reads_the_same_without_its_vocabulary(smollm2_f32_gguf):
    gguf = gguf_types.register()
    header, full = gguf_files.header_reader(smollm2_f32_gguf), gguf.GGUFReader(str(smollm2_f32_gguf))
    skipped = {key for key, field in full.fields.items() if len(field.data) > LIMIT}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"} <= skipped
    _compare(header, full, skipped)
