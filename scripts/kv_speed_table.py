"""Summarise the interleaved llama-bench rounds of docs/bench/*-kv-speed/run.sh as a markdown table.

    python scripts/kv_speed_table.py docs/bench/smollm2-135m-kv-speed/llama-bench.csv > .../results.md

Each csv row is `round,build,<llama-bench csv row>`; rows are grouped by (K type, V type, build) and the mean of the
rounds is shown, with f16 of the new build as the yardstick.
"""
import csv
import sys
from collections import defaultdict
from statistics import mean


def main(path: str) -> None:
    runs = defaultdict(lambda: {"pp": [], "tg": []})
    with open(path, newline="") as f:
        for row in csv.reader(f):
            build, bench = row[1], row[2:]
            type_k, type_v = bench[15], bench[16]
            n_prompt, n_gen, tokens_per_second = int(bench[-8]), int(bench[-7]), float(bench[-2])
            cache = type_k if type_k == type_v else f"{type_k}/{type_v}"
            runs[(cache, build)]["pp" if n_prompt and not n_gen else "tg"].append(tokens_per_second)
    base = runs[("f16", "new")]
    pp0, tg0 = mean(base["pp"]), mean(base["tg"])
    print("| cache (K/V) | build | pp512 t/s | tg128 t/s | pp vs f16 | tg vs f16 | rounds |")
    print("|---|---|---:|---:|---:|---:|---|")
    for (cache, build), r in sorted(runs.items()):
        pp, tg = mean(r["pp"]), mean(r["tg"])
        rounds = f"pp {', '.join(f'{x:.1f}' for x in r['pp'])}; tg {', '.join(f'{x:.1f}' for x in r['tg'])}"
        print(f"| {cache} | {build} | {pp:.1f} | {tg:.1f} | {pp / pp0:.2f} | {tg / tg0:.2f} | {rounds} |")


if __name__ == "__main__":
    main(sys.argv[1])
