"""A conversion killed at any point (SIGINT, SIGTERM, SIGKILL) leaves no partial out.gguf (none, or the whole file
when the signal came after its atomic rename), no worker still writing, and a rerun that succeeds with the same bytes;
a full disk (RLIMIT_FSIZE, what `ulimit -f` sets) is a one-line error."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


def _convert_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "hlwq_gguf.cli", "convert", str(source), str(out), "-q"]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a worker left running would show up here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _staging(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_hf, llama_build):
    root = tmp_path_factory.mktemp("crash")
    return write_tiny_llama(root / "hf", smollm2_hf, layers=4)


@pytest.fixture(scope="module")
def clean_run(checkpoint, tmp_path_factory):
    """An uninterrupted conversion: its bytes and how long it took."""
    out = tmp_path_factory.mktemp("clean") / "out.gguf"
    started = time.monotonic()
    subprocess.run(_convert_command(checkpoint, out), check=True, capture_output=True)
    return out.read_bytes(), time.monotonic() - started


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_killed_conversion_leaves_no_partial_output(signum, checkpoint, clean_run, tmp_path):
    expected, seconds = clean_run
    rng = np.random.default_rng(int(signum))
    for attempt, fraction in enumerate(rng.uniform(0.1, 0.95, size=3)):
        out = tmp_path / f"try{attempt}" / "out.gguf"
        out.parent.mkdir()
        proc = subprocess.Popen(_convert_command(checkpoint, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(fraction * seconds)
        proc.send_signal(signum)
        proc.communicate(timeout=120)
        finished = proc.returncode == 0  # the signal came after the conversion was done
        time.sleep(0.5)
        assert not _processes_mentioning(str(out.parent)), f"a worker outlived the {signal.Signals(signum).name}"
        # a signal between the atomic rename and the exit fails the exit but leaves the whole file: the output is
        # either absent or complete, never partial
        if finished or out.exists():
            assert out.read_bytes() == expected, f"partial output after {signal.Signals(signum).name} at {fraction:.0%}"
        if signum != signal.SIGKILL:  # the process unwinds and removes its temporary files
            assert not _staging(out), _staging(out)
        # a rerun cleans up what a killed run left and writes the same file as an uninterrupted conversion
        subprocess.run(_convert_command(checkpoint, out), check=True, capture_output=True)
        assert out.read_bytes() == expected and not _staging(out)


def test_full_disk_is_one_line_and_leaves_nothing(checkpoint, clean_run, tmp_path):
    expected, _ = clean_run
    out = tmp_path / "out.gguf"
    limit = len(expected) // 3

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(_convert_command(checkpoint, out), capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(out) in lines[0] and "disk full or file-size limit" in lines[0], lines[0]
    assert not out.exists() and not _staging(out)
