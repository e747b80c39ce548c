"""`hlwq-gguf dump`: gguf-dump (from the installed `gguf` package) with the HLWQ types registered."""
from __future__ import annotations

import sys
from pathlib import Path

import click


def dump(argv: list[str]) -> None:
    """Run gguf-dump on `argv` (its own options and the file) after registering the HLWQ types with `gguf`."""
    from gguf.scripts import gguf_dump

    from hlwq_gguf import gguf_files, gguf_types

    gguf_types.register()
    for arg in argv:  # the file gguf-dump will read: gated by llama.cpp's parser first (see read_gguf)
        if arg.endswith(".gguf") or (not arg.startswith("-") and Path(arg).is_file()):
            try:
                gguf_files.read_gguf(arg)
            except gguf_files.GGUFFileError as e:
                raise click.ClickException(str(e)) from None
    saved_argv = sys.argv
    sys.argv = ["hlwq-gguf dump", *argv]
    try:
        gguf_dump.main()
    finally:
        sys.argv = saved_argv


@click.command(name="dump", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("gguf_dump_args", nargs=-1, type=click.UNPROCESSED)
def dump_command(gguf_dump_args: tuple[str, ...]) -> None:
    """gguf-dump for HLWQ files: metadata and tensor table (all of gguf-dump's options, e.g. --markdown, --json)."""
    dump(list(gguf_dump_args))
