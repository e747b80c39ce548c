"""Gemma-4 with its vision tower: the HLWQ text GGUF and the F16 projector beside it, run by llama-mtmd-cli."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from convert import ConversionError, convert_checkpoint
from hlwq_gguf import gguf_types

from hlwq_gguf.testing.tiny_seeds import write_tiny_gemma4_dense


@pytest.fixture(scope="module")
def gemma4_with_vision(tmp_path_factory, smollm2_hf):
    root = tmp_path_factory.mktemp("gemma4-vision")
    folder = write_tiny_gemma4_dense(root / "tiny-gemma-4-31b-it", smollm2_hf, vision=True)
    report = convert_checkpoint(folder, root / "gemma4-hlwq5.gguf", "hlwq5", quiet=True)
    return folder, report


def _types(path):
    gguf = gguf_types.register()
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_projector_is_written_beside_the_text_model_in_f16(gemma4_with_vision):
    _, report = gemma4_with_vision
    assert report.mmproj == report.output.with_name("mmproj-gemma4-hlwq5-f16.gguf")
    projector, text = _types(report.mmproj), _types(report.output)
    assert set(projector.values()) <= {"F16", "F32"}
    assert "mm.input_projection.weight" in projector and any(n.startswith("v.blk.") for n in projector)
    # the text GGUF holds no vision tensor, and its matrices are HLWQ-coded
    assert not any(n.startswith(("v.", "mm.")) for n in text)
    assert text["blk.0.attn_q.weight"] == "HLWQ5"
    gguf = gguf_types.register()
    assert gguf.GGUFReader(str(report.mmproj)).fields["clip.vision.projector_type"].contents() == "gemma4v"


def test_llama_mtmd_cli_answers_about_an_image(gemma4_with_vision, llama_build, tmp_path):
    """The answer depends on the image: the projector's embeddings reach the HLWQ text model.

    The random tiny model's favourite token is a newline, so a grammar keeps the answer to letters.
    """
    from PIL import Image

    _, report = gemma4_with_vision
    gradient = np.linspace(0, 255, 96 * 64, dtype=np.float32).reshape(64, 96)
    images = {"gradient": np.stack([gradient, gradient[::-1], np.full_like(gradient, 128)], -1),
              "black": np.zeros((64, 96, 3))}
    answers = {}
    for name, pixels in images.items():
        image = tmp_path / f"{name}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(image)
        result = subprocess.run(
            [llama_build.tool("llama-mtmd-cli"), "-m", report.output, "--mmproj", report.mmproj, "--image", image,
             "-p", "What is in this image?", "-n", "8", "--temp", "0", "--chat-template", "chatml", "-t", "2",
             "--grammar", "root ::= [a-zA-Z ]+"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "mtmd batch encoding done" in result.stderr  # the image was encoded, then decoded into the text model
        answers[name] = result.stdout.strip()
    assert all(len(answer) >= 8 for answer in answers.values()), answers
    assert answers["gradient"] != answers["black"], answers


def test_text_only_checkpoint_has_no_projector(tmp_path, smollm2_hf):
    folder = write_tiny_gemma4_dense(tmp_path / "text-only", smollm2_hf)
    report = convert_checkpoint(folder, tmp_path / "text.gguf", "hlwq5", quiet=True)
    assert report.mmproj is None and not list(tmp_path.glob("mmproj-*"))
    with pytest.raises(ConversionError, match="no vision tower weights"):
        convert_checkpoint(folder, tmp_path / "text.gguf", "hlwq5", quiet=True, mmproj=True)
