"""Reading GGUF files a user hands to hlwq-gguf: ggml's own parser vets each one before gguf-py reads it."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from . import gguf_types, typetable
from .build import ensure_build
from .ggml_ctypes import GGML


class GGUFFileError(ValueError):
    """A file that is not a GGUF llama.cpp would read; the message is one line naming it."""


# arrays longer than this (the tokenizer's tokens, scores, types and merges) a header-only read skips
HEADER_ARRAY_LIMIT = 4096


@functools.cache
def _header_reader_class(gguf):
    """GGUFReader that reads every tensor and scalar field but only the length of a long array.

    gguf-py turns each array item into its own numpy view: a 151,936-token vocabulary (Qwen2.5) takes 8 s on 2
    cores, and the KV-cache rules, the placement plan and the calibration hint each read the header before a model
    opens. A skipped field keeps its types and length (parts [item type, length]) and has no data, so contents()
    is []; the tokenizer arrays are the only fields of that size and nothing on those paths reads them.
    """

    class HeaderReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_item_type = self._get(orig_offs, np.uint32)
            length = self._get(orig_offs + 4, np.uint64)
            item_type, count = gguf.GGUFValueType(raw_item_type[0]), int(length[0])
            item_size = np.dtype(self.gguf_scalar_to_np[item_type]).itemsize \
                if item_type in self.gguf_scalar_to_np else None
            if count <= HEADER_ARRAY_LIMIT or (item_size is None and item_type != gguf.GGUFValueType.STRING):
                return super()._get_field_parts(orig_offs, raw_type)
            end = orig_offs + 12
            if item_size is not None:
                end += item_size * count
            else:  # strings: walk the length prefixes, not the bytes
                raw = memoryview(self.data)
                order = "big" if self.endianess == gguf.GGUFEndian.BIG else "little"
                for _ in range(count):
                    end += 8 + int.from_bytes(raw[end:end + 8], order)
            return end - orig_offs, [raw_item_type, length], [], [gguf.GGUFValueType.ARRAY, item_type]

    return HeaderReader


def header_reader(path):
    """The header-only GGUFReader (see _header_reader_class) without ggml's vetting: for a file llama.cpp opens
    right after, which vets it; read_gguf(path, header_only=True) for a file a user hands over."""
    return _header_reader_class(gguf_types.register())(str(path))


def read_gguf(path, header_only: bool = False):
    """gguf-py's GGUFReader (HLWQ types registered) on a file that ggml's own GGUF parser accepted first.

    gguf-py trusts the counts and lengths it reads: a hostile array length makes it loop and allocate for minutes
    (found by scripts/fuzz_gguf.py). ggml's parser checks each against the file size, so it gates every GGUF a
    user hands to hlwq-gguf. header_only: arrays of more than HEADER_ARRAY_LIMIT items are read as their length
    only (_header_reader_class), for callers that want shapes, tensors and scalar metadata quickly.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such file")
    refusal = GGML(ensure_build().bin).gguf_parse_error(path)
    if refusal is not None:
        legacy = re.search(r"invalid ggml type (\d+)", refusal)
        if legacy and int(legacy[1]) in typetable.LEGACY_GGML_TYPE_IDS.values():
            raise GGUFFileError(f"{path}: written with the HLWQ type ids before the type table (type {legacy[1]}); "
                                f"renumber it in place: python scripts/renumber_hlwq_types.py {path}")
        raise GGUFFileError(f"{path}: not a valid GGUF file (llama.cpp's GGUF parser refuses it: {refusal})")
    gguf = gguf_types.register()
    try:
        return header_reader(path) if header_only else gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct and index errors of many kinds
        raise GGUFFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

