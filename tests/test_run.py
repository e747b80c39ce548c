"""`hlwq-gguf run` / `hlwq-gguf chat` over llama-cpp-python, on a converted tiny model."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from convert import convert_checkpoint
from hlwq_gguf import generate, runtime
from hlwq_gguf.cli import main

from hlwq_gguf.testing.tiny_llama import write_tiny_llama

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny_hlwq5(tmp_path_factory, smollm2_hf, llama_build):
    root = tmp_path_factory.mktemp("run")
    folder = write_tiny_llama(root / "hf", smollm2_hf)
    return convert_checkpoint(folder, root / "tiny-hlwq5.gguf", recipe="hlwq5", quiet=True).output


def test_run_streams_what_llama_cpp_generates(tiny_hlwq5):
    """Greedy `run` prints exactly the completion llama-cpp-python gives for the same model and prompt."""
    result = CliRunner().invoke(main, ["run", str(tiny_hlwq5), "-p", PROMPT, "-n", "12", "--temp", "0", "--ctx", "256"])
    assert result.exit_code == 0, result.output
    llm = runtime.open_model(tiny_hlwq5, n_ctx=256)
    expected = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
    assert expected and result.output == expected + "\n"


def test_chat_uses_the_gguf_template_and_keeps_history(tiny_hlwq5):
    llm = runtime.open_model(tiny_hlwq5, n_ctx=512)
    assert llm.chat_format == "chat_template.default"  # the template stored in the GGUF, not a built-in guess
    greedy = generate.Sampling(temperature=0.0)
    turns = list(generate.chat_session(llm, ["Hello", "And then?"], max_tokens=6, sampling=greedy))
    assert {index for index, _ in turns} == {0, 1}
    # the second turn is answered with the first exchange in the prompt: replaying it by hand gives the same reply
    first = "".join(piece for index, piece in turns if index == 0)
    second = "".join(piece for index, piece in turns if index == 1)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert "".join(generate.stream_chat(llm, history, 6, greedy)) == second

    result = CliRunner().invoke(main, ["chat", str(tiny_hlwq5), "--temp", "0", "-n", "6", "--ctx", "512"],
                                input="Hello\nAnd then?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output == f"{first}\n{second}\n"


def test_no_hidden_repetition_penalty():
    assert generate.Sampling().repeat_penalty == 1.0
    assert generate.Sampling().kwargs()["repeat_penalty"] == 1.0


def test_bad_override_is_one_line(tiny_hlwq5):
    result = CliRunner().invoke(main, ["run", str(tiny_hlwq5), "-p", "x", "-ot", "blk\\.(=CPU"])
    assert result.exit_code != 0
    assert "does not compile" in result.output and result.output.count("\n") == 1
