"""Where a conversion's output goes: a temporary file beside it, checked to load, then renamed onto it.

Every path of the converter writes through `staged_output`, so a failed or interrupted conversion never leaves a
half-written GGUF under the output's name, and a finished one is published only once llama.cpp's loader has
accepted it (convert/loadcheck.py).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .source import ConversionError, is_short_write, publish, short_write_message, staging_prefix


@contextmanager
def staged_output(output: Path, load_check_source: Path | None = None) -> Iterator[Path]:
    """A temporary file beside `output` to write, renamed to `output` when the block succeeds and removed when it
    does not; a full disk is one ConversionError line naming `output`.

    With `load_check_source` the finished file must first load in the patched llama.cpp (metadata and simulated
    allocations only); a refusal is a ConversionError naming that source.
    """
    output = Path(output)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(output), suffix=".partial", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if load_check_source is not None:
            from hlwq_gguf import build as builder

            from .loadcheck import check_loads

            check_loads(tmp, builder.ensure_build().root, load_check_source)
        publish(tmp, output)
    except OSError as e:
        if is_short_write(e):
            raise ConversionError(short_write_message(output, e)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
