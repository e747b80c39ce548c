"""Hugging Face tokenizer files rebuilt from a GGUF's tokenizer metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .hf_layout import special_ids


# HF pre-tokenizers for the llama.cpp BPE pre-tokenizer names we can rebuild.
_BPE_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    # Qwen2/2.5 tokenizer.json: the split regex is the original one that llama-vocab.cpp quotes for
    # LLAMA_VOCAB_PRE_TYPE_QWEN2 (llama.cpp itself spells the (?i:...) contractions out as '[sS]' etc.)
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {
                    "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
                },
                "behavior": "Isolated",
                "invert": False,
            },
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    },
}

# Other tokenizer.json sections that differ from the GPT-2 style defaults of _write_bpe_tokenizer, per
# pre-tokenizer name, as the published tokenizers have them.  Qwen2's NFC normalizer changes which tokens
# some text maps to (composed vs decomposed accents), so leaving it out would be a different tokenizer.
_BPE_JSON_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2": {
        "normalizer": {"type": "NFC"},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    },
}

_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


def _added_token(i: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": special,
    }


def _tokenizer_config_common(md: Mapping[str, Any], tokens: Sequence[str], added: list[dict[str, Any]]) -> dict[str, Any]:
    special = special_ids(md)
    cfg: dict[str, Any] = {
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        "clean_up_tokenization_spaces": False,
    }
    for typ, tid in special.items():
        cfg[f"{typ}_token"] = tokens[tid]
    for typ in ("bos", "eos"):
        if f"tokenizer.ggml.add_{typ}_token" in md:
            cfg[f"add_{typ}_token"] = bool(md[f"tokenizer.ggml.add_{typ}_token"])
    if "tokenizer.chat_template" in md:
        cfg["chat_template"] = md["tokenizer.chat_template"]
    return cfg


def _write_bpe_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    types = np.asarray(md["tokenizer.ggml.token_type"])
    merges: list[str] = list(md.get("tokenizer.ggml.merges", []))
    pre = str(md.get("tokenizer.ggml.pre", "default"))
    if pre not in _BPE_PRE_TOKENIZERS:
        raise NotImplementedError(f"BPE pre-tokenizer {pre!r} not supported (known: {sorted(_BPE_PRE_TOKENIZERS)})")
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate tokens in GGUF vocab; cannot build a BPE vocab")
    added = [
        _added_token(i, tokens[i], bool(types[i] == _TT_CONTROL))
        for i in np.flatnonzero((types == _TT_CONTROL) | (types == _TT_USER_DEFINED)).tolist()
    ]
    # "[PAD<i>]" UNUSED entries are the converter's own filler for ids between the tokenizer's vocab and the
    # config's vocab_size (Qwen2: 151665 tokens, 151936 rows); it recreates them from vocab_size, and
    # listing them in the vocab would turn them into NORMAL tokens on the way back.
    vocab = {t: i for i, t in enumerate(tokens) if not (types[i] == _TT_UNUSED and t == f"[PAD{i}]")}
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _BPE_PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in merges],
        },
    }
    tok_json.update(_BPE_JSON_OVERRIDES.get(pre, {}))
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=None), encoding="utf-8")
    cfg = _tokenizer_config_common(md, tokens, added)
    if "tokenizer.ggml.add_space_prefix" in md:
        cfg["add_prefix_space"] = bool(md["tokenizer.ggml.add_space_prefix"])
    cfg["model_max_length"] = int(md[f"{arch}.context_length"])
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # honour tokenizer.json as written (v5 GPT2Tokenizer would drop Digits)
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(cfg.items())), ensure_ascii=False, indent=2), encoding="utf-8")
    special = special_ids(md)
    stm = {f"{t}_token": tokens[i] for t, i in special.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, ensure_ascii=False, indent=2), encoding="utf-8")


def _write_spm_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    """Rebuild a SentencePiece ``tokenizer.model`` (+ tokenizer_config.json) from GGUF ``llama`` vocab."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    scores = np.asarray(md["tokenizer.ggml.scores"], dtype=np.float32)
    types = np.asarray(md["tokenizer.ggml.token_type"])
    special = special_ids(md)
    unk_id = special.get("unk")
    P = spm_pb2.ModelProto.SentencePiece.Type

    m = spm_pb2.ModelProto()
    ts = m.trainer_spec
    ts.model_type = spm_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = bool(np.any(types == _TT_BYTE))
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.treat_whitespace_as_suffix = False
    for typ, attr in (("unk", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("pad", "pad_id")):
        setattr(ts, attr, special.get(typ, -1))
        if typ in special:
            setattr(ts, f"{typ}_piece", tokens[special[typ]])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True

    added = []
    type_map = {
        _TT_NORMAL: P.NORMAL, _TT_UNKNOWN: P.UNKNOWN, _TT_CONTROL: P.CONTROL,
        _TT_USER_DEFINED: P.USER_DEFINED, _TT_UNUSED: P.UNUSED, _TT_BYTE: P.BYTE,
    }
    for i, (tok, score, tt) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        piece = m.pieces.add()
        ptype = type_map[int(tt)]
        text = tok
        if i == unk_id:
            ptype = P.UNKNOWN  # the converter later re-marks it CONTROL via added_tokens_decoder
        if tt == _TT_USER_DEFINED:
            # llama.cpp stores user-defined pieces with '▁' pre-normalised to ' '
            text = tok.replace(" ", "\u2581")
        piece.piece = text
        piece.score = float(score)
        piece.type = ptype
        if tt in (_TT_CONTROL, _TT_USER_DEFINED):
            # these got score -1000 and their type from tokenizer_config's added_tokens_decoder
            added.append(_added_token(i, text, tt == _TT_CONTROL))
    (out / "tokenizer.model").write_bytes(m.SerializeToString())

    cfg = _tokenizer_config_common(md, tokens, added)
    cfg["model_max_length"] = int(md[f"{arch}.context_length"])
    cfg["tokenizer_class"] = "GemmaTokenizer" if arch.startswith("gemma") else "LlamaTokenizer"
    cfg["spaces_between_special_tokens"] = False
    cfg["sp_model_kwargs"] = {}
    cfg["add_prefix_space"] = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(cfg.items())), ensure_ascii=False, indent=2), encoding="utf-8")
    stm = {f"{t}_token": tokens[i] for t, i in special.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, ensure_ascii=False, indent=2), encoding="utf-8")
    _write_fast_tokenizer_json(out)


def _write_fast_tokenizer_json(out: Path) -> None:
    """Derive ``tokenizer.json`` from the rebuilt ``tokenizer.model`` with transformers' own
    slow->fast conversion (as the published checkpoints ship one).  The llama.cpp converter
    reads the unk id and the BOS/SEP template from it; without it those keys are lost."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is part of the `convert` extra
        import warnings

        warnings.warn("transformers not installed: no tokenizer.json written (unk id / add_sep lost on conversion)")
        return
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # pragma: no cover
        raise RuntimeError(f"transformers returned a slow tokenizer ({type(tok).__name__}); cannot write tokenizer.json")
    tmp = out / "tokenizer.json.partial"
    backend.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")


def write_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    model = md.get("tokenizer.ggml.model")
    if model == "gpt2":
        _write_bpe_tokenizer(out, md, arch)
    elif model == "llama":
        _write_spm_tokenizer(out, md, arch)
    else:
        raise NotImplementedError(f"tokenizer model {model!r} not supported")
