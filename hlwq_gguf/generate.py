"""Streaming text generation over llama-cpp-python (what `hlwq-gguf run` and `hlwq-gguf chat` use).

Sampling defaults are llama.cpp's own (common/common.h: temp 0.8, top-k 40, top-p 0.95, min-p 0.05) and there is
no repetition penalty unless asked for: the reference implementation's CLI hard-codes 1.3, which changes what a
model says and hides quantization damage.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        """Keyword arguments for llama_cpp.Llama.create_completion / create_chat_completion."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def stream_completion(llm, prompt: str, max_tokens: int = 256, sampling: Sampling = Sampling()) -> Iterator[str]:
    """Text pieces of a plain completion of PROMPT, as they are generated."""
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, stream=True, **sampling.kwargs()):
        yield chunk["choices"][0]["text"]


def stream_chat(llm, messages: list[dict], max_tokens: int = 1024, sampling: Sampling = Sampling()) -> Iterator[str]:
    """Text pieces of the assistant's reply to MESSAGES, formatted with the chat template stored in the GGUF."""
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, stream=True, **sampling.kwargs()):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            yield piece


def chat_session(llm, user_turns: Iterable[str], system: str | None = None, max_tokens: int = 1024,
                 sampling: Sampling = Sampling()) -> Iterator[tuple[int, str]]:
    """A multi-turn conversation: for every user turn, (turn index, reply piece) as the reply streams; the history
    (with the full replies) is sent again each turn, as llama.cpp's chat does."""
    messages = [{"role": "system", "content": system}] if system else []
    for index, turn in enumerate(user_turns):
        messages.append({"role": "user", "content": turn})
        reply = []
        for piece in stream_chat(llm, messages, max_tokens, sampling):
            reply.append(piece)
            yield index, piece
        messages.append({"role": "assistant", "content": "".join(reply)})
