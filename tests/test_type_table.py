"""The one type table (hlwq_gguf/typetable.py) and everything generated from it or registered by it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hlwq_gguf import codec, gguf_types, plan, recipes, typetable

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "scripts" / "gen_codebook_tables.py"
RENUMBER = REPO / "scripts" / "renumber_hlwq_types.py"


def test_ids_continue_upstreams_enums_without_gaps():
    ids = [t.id for t in typetable.GGML_TYPES]
    assert ids == list(range(43, 43 + len(ids))) and typetable.GGML_TYPE_COUNT == ids[-1] + 1 == 61
    assert [f.id for f in typetable.FILE_TYPES] == list(range(42, 48))
    assert [f.ggml_ftype_id for f in typetable.FILE_TYPES if f.ggml_ftype_id] == [29, 30, 31, 32]
    # the old ids and the new ones never overlap, so renumbering is unambiguous
    assert not set(typetable.LEGACY_GGML_TYPE_IDS.values()) & set(ids)
    assert set(typetable.LEGACY_GGML_TYPE_IDS) == set(typetable.GGML_TYPE_IDS)
    assert set(typetable.LEGACY_FILE_TYPE_IDS) == set(typetable.FILE_TYPE_IDS)


def test_table_agrees_with_the_codec_and_the_python_tables():
    coded = [t for t in typetable.GGML_TYPES if not t.is_activation]
    assert {t.name for t in coded} == set(codec.BLOCK_TYPES)
    for t in coded:
        block = codec.BLOCK_TYPES[t.name]
        # the type size from the block's own packing, not from the table's formula
        packed = block.quantize_blocks(np.ones((1, block.block_size), np.float32))
        assert (block.block_size, packed.shape[1], block.bits, block.table) == (t.block_size, t.type_size, t.bits,
                                                                                t.codebook), t.name
    for t in typetable.GGML_TYPES:
        if t.is_activation:
            q8 = {128: codec.Q8HLWQ, 64: codec.Q8HLWQ_64}[t.block_size]
            assert (q8.block_size, q8.type_size) == (t.block_size, t.type_size)
    assert {r.ftype for r in recipes.RECIPES.values()} == set(typetable.FILE_TYPE_IDS.values())
    for name, recipe in recipes.RECIPES.items():
        assert typetable.FILE_TYPES[[f.recipe for f in typetable.FILE_TYPES].index(name)].id == recipe.ftype
    for t in typetable.KV_CACHE_TYPES:
        assert plan.KV_TYPES[t.name.lower()] == (t.block_size, t.type_size)


def test_gguf_py_reads_the_table_after_registration():
    import gguf

    gguf_types.register(gguf)
    for t in typetable.GGML_TYPES:
        qtype = gguf.GGMLQuantizationType(t.id)
        assert qtype.name == t.name and gguf.GGML_QUANT_SIZES[qtype] == (t.block_size, t.type_size)
    for f in typetable.FILE_TYPES:
        assert gguf.LlamaFileType(f.id).name == f.name


def _generator():
    sys.path.insert(0, str(GENERATOR.parent))
    try:
        import gen_codebook_tables
    finally:
        sys.path.pop(0)
    return gen_codebook_tables


def test_types_doc_is_generated_from_the_table(tmp_path, monkeypatch, capsys):
    result = subprocess.run([sys.executable, str(GENERATOR), "types", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the check fails on a row edited by hand, and writing puts the generated row back
    generator = _generator()
    doc = tmp_path / "TYPES.md"
    original = (REPO / "docs" / "TYPES.md").read_text()
    row = "| 45 | `hlwq5` | 128 | 5 | 82 | 5.125 |"
    assert row in original
    doc.write_text(original.replace(row, "| 102 | `hlwq5` | 128 | 5 | 82 | 5.125 |"))
    monkeypatch.setattr(generator, "TYPES_DOC", doc)
    assert generator.write_type_rows(None, check=True) == 1
    assert generator.write_type_rows(None, check=False) == 0
    assert doc.read_text() == original


@pytest.mark.needs_build
def test_patched_tree_rows_are_generated_from_the_table(tmp_path):
    from hlwq_gguf import upstream

    tree = upstream.patched_tree()
    check = [sys.executable, str(GENERATOR), "types", "--tree", str(tree), "--check"]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # a copy whose ggml.h row is off by one is caught
    copy = tmp_path / "tree"
    for rel in ("ggml/include/ggml.h", "include/llama.h", "gguf-py/gguf/constants.py"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree / rel, copy / rel)
    header = copy / "ggml/include/ggml.h"
    header.write_text(header.read_text().replace("GGML_TYPE_HLWQ5      = 45,", "GGML_TYPE_HLWQ5      = 46,"))
    result = subprocess.run(check[:4] + [str(copy), "--check"], capture_output=True, text=True)
    assert result.returncode == 1 and "ggml.h: differs" in result.stdout


def test_compiled_ggml_agrees_with_the_table(ggml):
    for t in typetable.GGML_TYPES:
        traits = ggml.base.ggml_get_type_traits(t.id).contents
        assert (traits.type_name.decode(), traits.blck_size, traits.type_size) == (t.name.lower(), t.block_size,
                                                                                   t.type_size)


def test_renumbering_restores_a_file_written_with_the_old_ids(ggml, tmp_path):
    """A file carrying the old ids (made from a new one by the inverse mapping) is refused with the hint, and the
    script turns it back into the new file byte for byte."""
    import gguf

    from hlwq_gguf import gguf_files

    gguf_types.register(gguf)
    path = tmp_path / "new.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(typetable.FILE_TYPE_IDS["MOSTLY_HLWQ5"])
    rng = np.random.default_rng(0)
    for name in ("HLWQ5", "HLWQ4_64", "HLWQ6_A"):
        block = codec.BLOCK_TYPES[name]
        values = rng.standard_normal((2, 4 * block.block_size)).astype(np.float32)
        writer.add_tensor(f"w.{name.lower()}", block.quantize(values), raw_dtype=gguf.GGMLQuantizationType[name])
    writer.add_tensor("norm", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    new_bytes = path.read_bytes()

    sys.path.insert(0, str(RENUMBER.parent))
    try:
        import renumber_hlwq_types as renumber
    finally:
        sys.path.pop(0)
    old = tmp_path / "old.gguf"
    shutil.copy(path, old)
    reader = renumber._TensorInfoReader(old, "r+")
    inverse = {new: old_id for old_id, new in renumber.TYPE_IDS.items()}
    for field in reader.tensor_info_fields:
        field.parts[4][0] = inverse.get(int(field.parts[4][0]), int(field.parts[4][0]))
    file_type = reader.fields["general.file_type"]
    file_type.parts[file_type.data[0]][0] = 102
    reader.data.flush()
    del reader
    assert old.read_bytes() != new_bytes

    with pytest.raises(gguf_files.GGUFFileError, match=r"old.gguf: written with the HLWQ type ids before the type "
                                                       r"table \(type 10[0-9]\); renumber it in place"):
        gguf_files.read_gguf(old)
    result = subprocess.run([sys.executable, str(RENUMBER), str(old)], capture_output=True, text=True)
    assert result.returncode == 0 and "3 tensors and general.file_type renumbered" in result.stdout
    assert old.read_bytes() == new_bytes
    again = subprocess.run([sys.executable, str(RENUMBER), str(old)], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == "" and old.read_bytes() == new_bytes
    assert [t.tensor_type.name for t in gguf_files.read_gguf(old).tensors][:3] == ["HLWQ5", "HLWQ4_64", "HLWQ6_A"]
