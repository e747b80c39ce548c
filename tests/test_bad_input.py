"""Bad input gives one clear line naming the file or tensor, a non-zero exit, and never an output file."""
from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import ConversionError, convert_checkpoint

from hlwq_gguf.testing.tiny_llama import write_tiny_llama


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


# ---- the generated corpus: each entry damages a valid tiny checkpoint one way; (damage, words the message names)

def _rewrite_header(folder: Path, change) -> None:
    """Re-encode model.safetensors' JSON header after `change(header)`, keeping the data bytes as they are."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


def _entry(name: str):
    def change(header, **fields):
        header[name].update(fields)
    return change


def _replace_weight(name: str, make):
    def damage(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[name] = make(tensors[name])
        save_file(tensors, str(folder / "model.safetensors"))
    return damage


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def _index_naming(file_name):
    def damage(folder: Path) -> None:
        names = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {name: file_name for name in names}}))
    return damage


_DROP = object()
Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
SAFETENSORS = "model.safetensors"

CORPUS = {
    "header length beyond the file": (lambda f: (f / SAFETENSORS).write_bytes(
        struct.pack("<Q", 2**40) + (f / SAFETENSORS).read_bytes()[8:]), [SAFETENSORS, "header of 1099511627776 bytes"]),
    "header not JSON": (lambda f: (f / SAFETENSORS).write_bytes(struct.pack("<Q", 8) + b"{oops!!}" + b"\0" * 64),
                        [SAFETENSORS, "corrupt safetensors header"]),
    "header a JSON array": (lambda f: (f / SAFETENSORS).write_bytes(struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 64),
                            [SAFETENSORS, "not a JSON object"]),
    "entry without offsets": (lambda f: _rewrite_header(f, lambda h: h[Q].pop("data_offsets")), [Q, "malformed header entry"]),
    "unknown dtype": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, dtype="F99")), [Q, "unsupported dtype F99"]),
    "dtype lies about the size": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, dtype="F16")), [Q, "needs", "header gives"]),
    "shape lies": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, shape=[128, 129])), [Q, "needs", "header gives"]),
    "negative dimension": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, shape=[-128, -128])), [Q, "invalid shape"]),
    "offsets backwards": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, data_offsets=h[Q]["data_offsets"][::-1])),
                          [Q, "invalid data offsets"]),
    "offsets past the end": (lambda f: _rewrite_header(f, lambda h: _entry(Q)(h, data_offsets=[
        h[Q]["data_offsets"][0] + 2**30, h[Q]["data_offsets"][1] + 2**30])), [Q, "truncated"]),
    "two tensors on the same bytes": (lambda f: _rewrite_header(f, lambda h: _entry(UP)(h, data_offsets=h[GATE]["data_offsets"])),
                                      [SAFETENSORS, "overlap"]),
    "bytes no tensor owns": (lambda f: (f / SAFETENSORS).write_bytes((f / SAFETENSORS).read_bytes() + b"\0" * 64),
                             [SAFETENSORS, "64 bytes after the last tensor"]),
    "weight of the wrong shape for config.json": (_replace_weight(Q, lambda w: w[:64].copy()),
                                                  ["blk.0.attn_q.weight", "wrong shape", "does not load in llama.cpp"]),
    "weight rows cut short": (_replace_weight("model.layers.1.mlp.down_proj.weight", lambda w: w[:, :256].copy()),
                              ["blk.1.ffn_down.weight", "wrong shape"]),
    "config.json names more layers than there are": (_edit_config(num_hidden_layers=3), ["blk.2.", "not found"]),
    "config.json without hidden_size": (_edit_config(hidden_size=_DROP), ["token_embd.weight", "wrong shape"]),
    "config.json value of the wrong type": (_edit_config(num_hidden_layers="two"), ["converter failed", "TypeError"]),
    "config.json not an object": (lambda f: (f / "config.json").write_text("[]"), ["config.json", "not a JSON object"]),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{oops"), ["config.json", "not valid JSON"]),
    "config.json missing": (lambda f: (f / "config.json").unlink(), ["config.json: missing"]),
    "unknown architecture": (_edit_config(architectures=["TotallyNewForCausalLM"]), ["TotallyNewForCausalLM", "not supported"]),
    "no architectures entry": (_edit_config(architectures=_DROP), ["config.json", "no 'architectures' entry"]),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], ["no tokenizer"]),
    "tokenizer.json not JSON": (lambda f: (f / "tokenizer.json").write_text("{oops"), ["tokenizer.json", "not valid JSON"]),
    "tokenizer_config.json not an object": (lambda f: (f / "tokenizer_config.json").write_text("7"),
                                            ["tokenizer_config.json", "not a JSON object"]),
    "index naming ../": (_index_naming("../model.safetensors"), ["index.json", "'../model.safetensors'", "not a plain file name"]),
    "index naming a sub-folder": (_index_naming("sub/model.safetensors"), ["index.json", "not a plain file name"]),
    "index naming an absolute path": (_index_naming("/etc/passwd"), ["index.json", "'/etc/passwd'", "not a plain file name"]),
    "index naming a missing shard": (_index_naming("model-00002-of-00002.safetensors"), ["lists model-00002-of-00002.safetensors, which is missing"]),
    "index without a weight_map": (lambda f: (f / "model.safetensors.index.json").write_text("{}"), ["index.json", "no weight_map"]),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_corpus(case, tiny_llama, tmp_path):
    damage, needles = CORPUS[case]
    damage(tiny_llama)
    message = _convert_fails(tiny_llama, tmp_path / "out.gguf", needles[0])
    for needle in needles[1:]:
        assert needle in message, message


@pytest.mark.parametrize("hub_id", ["../secrets", "owner/../../etc", "owner/name/extra", "owner/..", "/owner/name",
                                    "owner/na me", "owner\\name", "owner/name\0"])
def test_hub_ids_that_could_escape_are_refused_before_any_download(hub_id, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **_: pytest.fail(f"{hub_id!r} reached the hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError, match="not a Hugging Face hub id|not a folder"):
        convert_checkpoint(hub_id, tmp_path / "out.gguf", quiet=True)
    assert not (tmp_path / "out.gguf").exists()


class _Booby:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "training_args.bin"])
def test_pickles_beside_the_weights_are_never_loaded(tiny_llama, tmp_path, name):
    marker = tmp_path / "unpickled"
    (tiny_llama / name).write_bytes(pickle.dumps(_Booby(marker)))
    convert_checkpoint(tiny_llama, tmp_path / "out.gguf", quiet=True)
    assert (tmp_path / "out.gguf").exists() and not marker.exists()
    (tiny_llama / "model.safetensors").unlink()
    _convert_fails(tiny_llama, tmp_path / "out2.gguf", "never unpickles")
    assert not marker.exists()
