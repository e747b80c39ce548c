"""KLD against bits per matrix weight for every variant of several `hlwq-gguf bench` runs of one model.

    python scripts/pareto_plot.py docs/bench/smollm2-135m docs/bench/smollm2-135m-equalize \
        docs/bench/smollm2-135m-imatrix -o docs/bench/smollm2-135m-pareto.png

Runs are merged only if they share the reference and the text: a variant measured by several runs must have the
same KLD in each (the measurement is deterministic), which is checked. Each point is labelled with its name; the
lines join each family's Pareto front.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = {  # (family, imatrix, equalized) -> label, colour, marker
    ("llama.cpp", False, False): ("llama.cpp K/IQ quants", "tab:blue", "o"),
    ("llama.cpp", True, False): ("llama.cpp K/IQ quants + imatrix", "tab:cyan", "o"),
    ("hlwq", False, False): ("HLWQ", "tab:red", "s"),
    ("hlwq", False, True): ("HLWQ + equalization (weights)", "tab:orange", "s"),
    ("hlwq", True, False): ("HLWQ + equalization (imatrix)", "tab:purple", "D"),
}


def load_points(run_dirs: list[Path]) -> list[dict]:
    """One entry per (variant, imatrix) across the runs: name, family key, matrix bpw, KLD."""
    points: dict[tuple[str, bool], dict] = {}
    reference = None
    for run in run_dirs:
        data = json.loads((run / "results.json").read_text())
        ref = (data["variants"][0]["file"], data["settings"]["ctx"], data["settings"]["chunks"], data["text"])
        if reference is not None and ref != reference:
            raise SystemExit(f"{run}: measured against another reference or text than {run_dirs[0]}")
        reference = ref
        for v in data["variants"][1:]:
            if v["kld_mean"] is None or v["matrix_bpw"] is None:
                continue
            key = (v["name"], v["imatrix"])
            if key in points and abs(points[key]["kld"] - v["kld_mean"]) > 1e-6:
                raise SystemExit(f"{run}: {v['name']} has KLD {v['kld_mean']} here and {points[key]['kld']} in "
                                 "another run; not the same measurement")
            family = (v["family"], v["imatrix"], v["name"].endswith("+EQ"))
            points[key] = {"name": v["name"], "family": family, "bpw": v["matrix_bpw"], "kld": v["kld_mean"],
                           "fallbacks": v["fallbacks"]}
    return list(points.values())


def pareto_front(points: list[dict]) -> list[dict]:
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p["bpw"], p["kld"])):
        if p["kld"] < best:
            front.append(p)
            best = p["kld"]
    return front


def plot(points: list[dict], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for family, (label, colour, marker) in FAMILIES.items():
        members = [p for p in points if p["family"] == family]
        if not members:
            continue
        ax.scatter([p["bpw"] for p in members], [p["kld"] for p in members], color=colour, marker=marker, label=label)
        front = pareto_front(members)
        ax.plot([p["bpw"] for p in front], [p["kld"] for p in front], color=colour, alpha=0.5)
        for p in members:
            ax.annotate(p["name"], (p["bpw"], p["kld"]), textcoords="offset points", xytext=(4, 3), fontsize=7,
                        color=colour)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized matrices (real file bytes; K-quants include their fallbacks)")
    ax.set_ylabel("mean KL-divergence vs F32")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    tmp = output.with_name(f".{output.stem}.partial.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench output folders (with results.json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    points = load_points(args.runs)
    model = json.loads((args.runs[0] / "results.json").read_text())["model"]
    plot(points, args.title or f"{model}: quality vs size, every measured variant", args.output)
    for p in sorted(points, key=lambda p: p["bpw"]):
        print(f"{p['name']:<12} {'imatrix' if p['family'][1] else '':<8} {p['bpw']:6.3f} bpw  KLD {p['kld']:.5f}")


if __name__ == "__main__":
    main()
