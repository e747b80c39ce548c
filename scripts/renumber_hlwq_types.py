#!/usr/bin/env python3
"""Rewrite the HLWQ type ids of GGUF files written before the type table (hlwq_gguf/typetable.py) in place.

    python scripts/renumber_hlwq_types.py FILE.gguf [...]      # or a folder: every *.gguf below it

Format v2's first release gave the HLWQ ggml types the ids 100-121 and the file types 100-105; the type table
continues upstream's enums instead (43-60, 42-47), which the patched llama.cpp requires. Only the tensor-info type
fields and general.file_type change (a few bytes each; the codes are the same), so a file is rewritten where it
lies. Unambiguous and idempotent: no id of the old range is a valid id of the new one, and a file already
renumbered is left as it is (a run that was interrupted is finished by running it again).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402

from hlwq_gguf import typetable  # noqa: E402

TYPE_IDS = {old: typetable.GGML_TYPE_IDS[name] for name, old in typetable.LEGACY_GGML_TYPE_IDS.items()}
FILE_TYPE_IDS = {old: typetable.FILE_TYPE_IDS[name] for name, old in typetable.LEGACY_FILE_TYPE_IDS.items()}


class _TensorInfoReader(gguf.GGUFReader):
    """GGUFReader that keeps the raw tensor-info fields and does not interpret their type ids (which it cannot for
    the old ones)."""

    def _build_tensors(self, start_offs, fields) -> None:
        self.tensor_info_fields = fields


def renumber(path: Path) -> tuple[int, bool]:
    """(tensors renumbered, whether general.file_type changed) for one file, rewritten in place."""
    reader = _TensorInfoReader(path, "r+")
    changed = 0
    for field in reader.tensor_info_fields:
        raw_type = field.parts[4]
        new = TYPE_IDS.get(int(raw_type[0]))
        if new is not None:
            raw_type[0] = new
            changed += 1
    file_type = reader.fields.get("general.file_type")
    file_type_changed = False
    if file_type is not None:
        value = file_type.parts[file_type.data[0]]
        new = FILE_TYPE_IDS.get(int(value[0]))
        if new is not None:
            value[0] = new
            file_type_changed = True
    reader.data.flush()
    return changed, file_type_changed


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    files = []
    for arg in map(Path, argv):
        files += sorted(arg.rglob("*.gguf")) if arg.is_dir() else [arg]
    status = 0
    for path in files:
        try:
            tensors, file_type = renumber(path)
        except (OSError, ValueError) as e:
            print(f"{path}: not renumbered: {e}", file=sys.stderr)
            status = 1
            continue
        if tensors or file_type:
            print(f"{path}: {tensors} tensors{' and general.file_type' if file_type else ''} renumbered")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
