"""The full-precision reference GGUF, made by the pinned llama.cpp's own convert_hf_to_gguf.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hlwq_gguf import upstream

from .source import ConversionError, die_with_parent, load_checkpoint, staging_prefix, sweep_stale_staging


def reference_gguf(model_dir: Path, output: Path, outtype: str = "f32", mmproj: bool = False) -> Path:
    """Convert `model_dir` unquantized (f32/f16/bf16) with upstream's converter; written atomically.

    With `mmproj`, the multimodal projector (vision tower) instead of the text model.
    """
    load_checkpoint(model_dir)
    tree = upstream.patched_tree()
    sweep_stale_staging(output)
    tmp = output.with_name(f"{staging_prefix(output)}partial")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
    if mmproj:
        cmd.append("--mmproj")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=die_with_parent)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            what = "the projector (mmproj)" if mmproj else "convert_hf_to_gguf"
            raise ConversionError(f"{model_dir}: {what} failed: {lines[-1] if lines else result.returncode}")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
