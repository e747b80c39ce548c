"""How much squared error each way of choosing the HLWQ block scale leaves (the table in hlwq_gguf/codec.py).

    python scripts/measure_block_scale.py [--blocks 8000] [--model-dir HF_FOLDER]

Compares, relative to the reference's scale (the raw block norm): 10 alternations of nearest-code assignment and
least-squares rescaling started from the norm (the previous default), the codec's "fit" search, and a much
wider search (256 starts in 0.3-2.5 x norm + 3 rounds) as an estimate of the best reachable. N(0,1) blocks by default; with
--model-dir, the 2-D weight matrices of a Hugging Face safetensors checkpoint instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hlwq_gguf import codec


def relative_error(blocks: np.ndarray, bits: int, block_size: int, starts, rounds: int) -> float:
    """Squared error of the best of `starts` (a function of y, norms, codebook giving start scales) refined by
    `rounds` alternations.

    starts=None means: start at the norm and only alternate (rounds=0: the reference's norm scale).
    """
    codebook = codec.load_codebook(bits)
    y = codec.hadamard_rotate(blocks) * np.float32(np.sqrt(block_size))
    norms = np.maximum(codec.block_norms(blocks), codec.MIN_SCALE)

    def codes_for(scale):
        return codec.nearest_code(y / scale[:, None], codebook)

    def least_squares(codes):
        c = codebook[codes]
        return np.einsum("ij,ij->i", y, c) / np.einsum("ij,ij->i", c, c)

    if starts is None:
        scale = norms
        codes = codes_for(scale)
        if rounds:
            for _ in range(rounds):
                scale = least_squares(codes)
                codes = codes_for(scale)
            scale = least_squares(codes)
    else:
        best, scale = np.full(len(y), -np.inf), norms
        for start in starts(y, norms, codebook):
            c = codebook[codes_for(start)]
            sum_yc, sum_cc = np.einsum("ij,ij->i", y, c), np.einsum("ij,ij->i", c, c)
            gain = sum_yc * sum_yc / sum_cc
            scale = np.where(gain > best, sum_yc / sum_cc, scale)
            best = np.maximum(gain, best)
        codes = codes_for(scale)
        for _ in range(rounds):
            scale = least_squares(codes)
            codes = codes_for(scale)
        scale = least_squares(codes)
    scale = scale.astype(np.float16).astype(np.float32)
    return float(((y - scale[:, None] * codebook[codes]) ** 2).sum() / (y ** 2).sum())


def model_blocks(model_dir: Path, block_size: int, limit: int) -> np.ndarray:
    from safetensors.numpy import load_file

    parts = []
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, w in load_file(str(file)).items():
            if w.ndim == 2 and w.shape[1] % block_size == 0 and "norm" not in name:
                parts.append(w.astype(np.float32).reshape(-1, block_size)[:: max(1, w.size // block_size // 2000)])
    blocks = np.concatenate(parts)
    return blocks[np.linalg.norm(blocks, axis=1) > 0][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8000)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--cosine", action="store_true", help="test-quantize-fns's data: 0.1 + 2 cos(i)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| bits | QK | 10 alternations from the norm | fit (codec default) | 256 starts + 3 rounds |")
    print("|---:|---:|---:|---:|---:|")
    for bits, block_size in ((3, 128), (4, 128), (5, 128), (6, 128), (5, 64)):
        if args.cosine:
            blocks = (0.1 + 2 * np.cos(np.arange(32 * 128))).astype(np.float32).reshape(-1, block_size)
        elif args.model_dir:
            blocks = model_blocks(args.model_dir, block_size, args.blocks)
        else:
            blocks = rng.standard_normal((args.blocks, block_size)).astype(np.float32)
        norm = relative_error(blocks, bits, block_size, None, 0)
        alternate = relative_error(blocks, bits, block_size, None, 10)
        fit = relative_error(blocks, bits, block_size, codec.fit_start_scales, codec.FIT_ROUNDS)
        wide = relative_error(blocks, bits, block_size,
                              lambda y, norms, _: [norms * f for f in np.linspace(0.3, 2.5, 256, dtype=np.float32)], 3)
        print(f"| {bits} | {block_size} | {alternate / norm:.3f} | {fit / norm:.3f} | {wide / norm:.3f} |")


if __name__ == "__main__":
    main()
