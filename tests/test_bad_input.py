"""Bad input gives one clear line naming the file or tensor, a non-zero exit, and never an output file."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from convert import ConversionError, convert_checkpoint

from conftest import write_tiny_llama


def _convert_fails(source, out, match: str) -> str:
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(source, out, quiet=True)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "partial output left behind"
    return message


def test_truncated_safetensors(tiny_llama, tmp_path):
    weights = tiny_llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _convert_fails(tiny_llama, tmp_path / "out.gguf", "truncated")
    assert "model.safetensors" in message


def test_truncated_header(tiny_llama, tmp_path):
    (tiny_llama / "model.safetensors").write_bytes(b"\x10\x00\x00")
    _convert_fails(tiny_llama, tmp_path / "out.gguf", "model.safetensors")


def test_missing_config(tiny_llama, tmp_path):
    (tiny_llama / "config.json").unlink()
    _convert_fails(tiny_llama, tmp_path / "out.gguf", "config.json: missing")


def test_unsupported_architecture(tiny_llama, tmp_path):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["architectures"] = ["TotallyNewForCausalLM"]
    (tiny_llama / "config.json").write_text(json.dumps(config))
    message = _convert_fails(tiny_llama, tmp_path / "out.gguf", "TotallyNewForCausalLM")
    assert "not supported" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(smollm2_hf, tmp_path, bad):
    down = np.random.default_rng(0).standard_normal((128, 320)).astype(np.float32) * 0.05
    down[3, 7] = bad
    folder = write_tiny_llama(tmp_path / "m", smollm2_hf, overrides={"model.layers.1.mlp.down_proj.weight": down})
    message = _convert_fails(folder, tmp_path / "out.gguf", "blk.1.ffn_down.weight")
    assert "NaN/Inf" in message


def test_non_finite_norm_weight(smollm2_hf, tmp_path):
    norm = np.ones(128, dtype=np.float32)
    norm[5] = np.nan
    folder = write_tiny_llama(tmp_path / "m", smollm2_hf, overrides={"model.norm.weight": norm})
    _convert_fails(folder, tmp_path / "out.gguf", "output_norm.weight")


def test_block_norm_beyond_fp16(smollm2_hf, tmp_path):
    up = np.random.default_rng(1).standard_normal((320, 128)).astype(np.float32) * 0.05
    up[9, :] = 6000.0  # every weight fits fp16, the block norm (6000 * sqrt(128) = 67882) does not
    folder = write_tiny_llama(tmp_path / "m", smollm2_hf, overrides={"model.layers.0.mlp.up_proj.weight": up})
    message = _convert_fails(folder, tmp_path / "out.gguf", "blk.0.ffn_up.weight")
    assert "fp16" in message


def test_pickle_only_checkpoint_is_refused_unread(tiny_llama, tmp_path):
    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    _convert_fails(tiny_llama, tmp_path / "out.gguf", "never unpickles")


def test_cli_error_is_one_line(tiny_llama, tmp_path):
    (tiny_llama / "config.json").write_text("{not json")
    out = tmp_path / "out.gguf"
    result = subprocess.run([sys.executable, "-m", "hlwq_gguf.cli", "convert", str(tiny_llama), str(out)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "config.json" in lines[0], result.stderr
    assert not out.exists()
