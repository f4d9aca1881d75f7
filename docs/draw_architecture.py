"""Draw docs/architecture.png from the package's imports (the same parse tests/test_architecture.py
checks): one box per layer, one arrow per pair of layers with an import between them, labelled with
the number of importing modules.

    .venv/bin/python docs/draw_architecture.py
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("layer_rules", ROOT / "tests" / "test_architecture.py")
rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rules)

# (x, y) centre of each layer's box; higher y = higher layer.
POSITION = {
    "cli": (0.5, 0.92),
    "experiments": (0.5, 0.76),
    "report": (0.22, 0.60),
    "serving": (0.80, 0.60),
    "testing": (0.95, 0.44),
    "train": (0.30, 0.44),
    "collab": (0.68, 0.44),
    "moe": (0.30, 0.26),
    "edge": (0.68, 0.26),
    "base": (0.5, 0.08),
}
WHAT = {
    "cli": "the edgemoe command: parse flags, call below",
    "experiments": "comparisons, demo, simulation runs,\nseeds, sweeps, run folders",
    "report": "tables and plots of runs",
    "serving": "OpenAI-compatible gateway",
    "testing": "loopback test doubles",
    "train": "Stable-MoE training\n(composes moe + edge)",
    "collab": "MoE² collaborative inference",
    "moe": "MoE layer, routers (pure torch)",
    "edge": "network model, controllers,\nsimulator (pure numpy)",
    "base": "errors, files, runs, paths,\nregistry, config",
}


def main() -> Path:
    internal, _ = rules.collect_imports()
    modules = Counter(rules.layer_of(m) for m in internal)
    pairs = Counter(
        (rules.layer_of(src), rules.layer_of(dst))
        for src, targets in internal.items()
        for dst in {t for t in targets if rules.layer_of(t) != rules.layer_of(src)}
    )
    fig, ax = plt.subplots(figsize=(11, 8.5))
    ax.set(xlim=(0, 1.08), ylim=(0, 1), xticks=[], yticks=[])
    ax.axis("off")
    present = [layer for layer in POSITION if modules[layer]]
    for layer in present:
        x, y = POSITION[layer]
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.12, y - 0.05), 0.24, 0.10, boxstyle="round,pad=0.01", fc="#dbe7f3", ec="#33546e"
            )
        )
        ax.text(x, y + 0.022, f"{layer}  ({modules[layer]} modules)", ha="center", weight="bold", size=10)
        ax.text(x, y - 0.018, WHAT[layer], ha="center", va="center", size=8)
    for (src, dst), count in sorted(pairs.items()):
        (x0, y0), (x1, y1) = POSITION[src], POSITION[dst]
        upward = dst not in rules.ALLOWED[src]
        ax.add_patch(
            FancyArrowPatch(
                (x0, y0 - 0.055),
                (x1, y1 + 0.055),
                arrowstyle="-|>",
                mutation_scale=12,
                color="#c0392b" if upward else "#555555",
                lw=0.6 + 0.1 * count,
                alpha=0.8,
                connectionstyle="arc3,rad=0.08",
            )
        )
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, str(count), size=7, color="#333333")
    ax.set_title(
        "edgemoe layers: arrows are imports (number of importing modules), drawn from the source;\n"
        "every arrow points down (red would mark one that crosses a layer upward)",
        size=10,
    )
    out = ROOT / "docs" / "architecture.png"
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
