#!/usr/bin/env python3
"""llama-server under load: HLWQ5 with an HLWQ KV cache beside Q5_K_M, same model, prompts, clients and run.

Each configuration gets its own llama-server (8 slots, flash attention) on loopback and the same load from the
OpenAI Python client: `--requests` chat completions from `--clients` concurrent clients, every other one
streamed, `--max-tokens` tokens each (ignore_eos). Prints requests/s, p50/p99 latency, errors and the server's
memory before and after the load, with ratios to Q5_K_M (f16 cache); writes results.json and results.md.

  python scripts/server_load.py -o docs/bench/server-load
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = [  # (weights, KV cache type)
    ("HLWQ5", "hlwq4_64"), ("HLWQ5", "f16"), ("Q5_K_M", "f16"), ("Q5_K_M", "q4_0"), ("HLWQ5", "hlwq3_64"),
]


def model_files(source: str, threads: int) -> dict[str, Path]:
    """HLWQ5 (our converter) and Q5_K_M (llama-quantize) of `source`, cached beside the benchmark's variants."""
    from convert import convert_checkpoint
    from hlwq_gguf import bench, llama_tools
    from hlwq_gguf.build import ensure_build

    build = ensure_build()
    reference, checkpoint, workdir = bench.reference_and_checkpoint(source, "f32", print)
    files = {"HLWQ5": workdir / "HLWQ5.gguf", "Q5_K_M": workdir / "Q5_K_M.gguf"}
    if not files["Q5_K_M"].exists():
        llama_tools.llama_quantize(build, reference, files["Q5_K_M"], "Q5_K_M", threads=threads)
    if not files["HLWQ5"].exists():
        convert_checkpoint(checkpoint or reference, files["HLWQ5"], recipe="hlwq5", quiet=True, threads=threads)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default="smollm2-135m")
    parser.add_argument("-o", "--out", type=Path, default=Path("server-load"))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from hlwq_gguf import paths, serverload
    from hlwq_gguf.build import ensure_build
    from hlwq_gguf.llama_tools import default_threads

    threads = args.threads or int(default_threads())
    build = ensure_build()
    files = model_files(args.source, threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = paths.cache_root() / "server-load-logs"  # the servers' logs: a few hundred KB each, not results
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for weights, kv in CONFIGS:
        name = f"{weights} + {kv} KV"
        print(f"{name}: {args.requests} requests from {args.clients} clients ...", flush=True)
        with serverload.llama_server(build, files[weights], logs / f"{weights}-{kv}.log", parallel=args.clients,
                                     ctx_per_slot=512, kv_type=kv, threads=threads) as server:
            result = serverload.run_load(server, args.requests, args.clients, args.max_tokens)
            alive = server.process.poll() is None
        row = {"config": name, "weights": weights, "kv": kv, "server_alive_after": alive, **result.summary(),
               "first_errors": result.errors[:3]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next(r for r in rows if r["weights"] == "Q5_K_M" and r["kv"] == "f16")
    for row in rows:
        row["rps_vs_q5_k_m"] = round(row["requests_per_second"] / base["requests_per_second"], 3)
        row["p50_vs_q5_k_m"] = round(row["p50_s"] / base["p50_s"], 3)
    (args.out / "results.json").write_text(json.dumps({"source": args.source, "threads": threads,
                                                        "max_tokens": args.max_tokens, "rows": rows}, indent=1))
    lines = ["| config | requests | errors | req/s | x Q5_K_M | p50 s | p99 s | gen tok/s | RSS before → after MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['requests']} | {r['errors']} | {r['requests_per_second']:.2f} | "
                     f"{r['rps_vs_q5_k_m']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{r['completion_tokens_per_second']:.0f} | {r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
