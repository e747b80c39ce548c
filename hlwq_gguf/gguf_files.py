"""Reading GGUF files a user hands to hlwq-gguf: ggml's own parser vets each one before gguf-py reads it."""
from __future__ import annotations

import re
from pathlib import Path

from . import gguf_types, typetable
from .build import ensure_build
from .ggml_ctypes import GGML


class GGUFFileError(ValueError):
    """A file that is not a GGUF llama.cpp would read; the message is one line naming it."""


def read_gguf(path):
    """gguf-py's GGUFReader (HLWQ types registered) on a file that ggml's own GGUF parser accepted first.

    gguf-py trusts the counts and lengths it reads: a hostile array length makes it loop and allocate for minutes
    (found by scripts/fuzz_gguf.py). ggml's parser checks each against the file size, so it gates every GGUF a
    user hands to hlwq-gguf.
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
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct and index errors of many kinds
        raise GGUFFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

