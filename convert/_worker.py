"""The conversion itself, run in a child process that imports the pinned llama.cpp's own converter.

llama.cpp's model classes (convert_hf_to_gguf / conversion/) supply tensor names, layouts and metadata for
every architecture they support; they run with output type F32 so that nothing is rounded before HLWQ sees
it, and the writer's add_tensor is wrapped to quantize each selected tensor (lazily, while it is written).
Usage: python -m convert._worker <json-args>
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path


def _fail(message: str, code: int = 2) -> None:
    print(f"hlwq-gguf convert: error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    args = json.loads(sys.argv[1])
    tree = Path(args["llama_cpp_tree"])
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    logging.basicConfig(level=logging.WARNING if args.get("quiet") else logging.INFO, format="%(message)s")

    import numpy as np
    import torch
    import gguf

    from hlwq_gguf import codec, gguf_types, recipes

    gguf_types.register(gguf)
    import convert_hf_to_gguf as upstream

    recipe = recipes.RECIPES[args["recipe"]]
    dir_model = Path(args["model_dir"])
    out_tmp = Path(args["out_tmp"])
    stats = {"weights": 0, "seconds": 0.0, "types": {}}

    hparams = upstream.ModelBase.load_hparams(dir_model, False)
    architecture = upstream.get_model_architecture(hparams, upstream.ModelType.TEXT)
    try:
        model_class = upstream.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        _fail(f"{dir_model / 'config.json'}: architecture {architecture} is not supported by the pinned llama.cpp converter")

    with torch.inference_mode():
        model = model_class(dir_model, gguf.LlamaFileType.ALL_F32, out_tmp, is_big_endian=False,
                            use_temp_file=False, eager=False, metadata_override=None, model_name=args.get("model_name"),
                            split_max_tensors=0, split_max_size=0, dry_run=False, small_first_shard=False,
                            remote_hf_model_id=args.get("hub_id"))
        writer = model.gguf_writer
        tied = not any(name in model.model_tensors for name in ("lm_head.weight", "output.weight"))

        def checked_quantize(name: str, qtype, block_type):
            def run(array: np.ndarray) -> np.ndarray:
                started = time.perf_counter()
                if not np.isfinite(array).all():
                    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                    raise codec.HLWQValueError(f"tensor {name}: {bad} NaN/Inf weights")
                try:
                    if block_type is None:
                        out = gguf.quants.quantize(array, qtype)
                    else:
                        out = block_type.quantize(array)
                except codec.HLWQValueError as e:
                    raise codec.HLWQValueError(f"tensor {name}: {e}") from None
                stats["seconds"] += time.perf_counter() - started
                stats["weights"] += int(np.size(array))
                return out
            return run

        original_add_tensor = writer.add_tensor

        def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            type_name = None
            if raw_dtype == gguf.GGMLQuantizationType.F32 and not isinstance(tensor, gguf.LazyChunkedTensor):
                type_name = recipes.tensor_type(recipe, name, tuple(tensor.shape), tied_embeddings=tied)
            if type_name is None:
                if raw_dtype == gguf.GGMLQuantizationType.F32 and not isinstance(tensor, gguf.LazyChunkedTensor):
                    check = checked_quantize(name, gguf.GGMLQuantizationType.F32, None)
                    tensor = gguf.LazyNumpyTensor._wrap_fn(check, meta_noop=True)(tensor) \
                        if isinstance(tensor, gguf.LazyNumpyTensor) else check(tensor)
                return original_add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype,
                                           tensor_endianess=tensor_endianess)
            qtype = gguf.GGMLQuantizationType[type_name.upper()]
            stats["types"][type_name] = stats["types"].get(type_name, 0) + 1
            block_type = codec.BLOCK_TYPES.get(type_name.upper())
            quantize = checked_quantize(name, qtype, block_type)
            if isinstance(tensor, gguf.LazyNumpyTensor):
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                tensor = gguf.LazyNumpyTensor._wrap_fn(
                    quantize, meta_noop=(np.uint8, lambda s: (*s[:-1], s[-1] // block_size * type_size)))(tensor)
            else:
                tensor = quantize(tensor)
            return original_add_tensor(name, tensor, raw_dtype=qtype, tensor_endianess=tensor_endianess)

        writer.add_tensor = add_tensor
        original_add_file_type = writer.add_file_type
        writer.add_file_type = lambda _ftype: original_add_file_type(recipe.ftype)
        for key, value in gguf_types.codebook_metadata().items():
            (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
        writer.add_string("hlwq.recipe", recipe.name)

        started = time.time()
        try:
            model.write()
        except codec.HLWQValueError as e:
            _fail(f"{dir_model}: {e}")
        elapsed = time.time() - started

    stats["wall_seconds"] = elapsed
    with open(args["stats_out"], "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
