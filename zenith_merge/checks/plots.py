"""Figures the reports embed, drawn with matplotlib's object API (no pyplot state) and written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..io.failpoints import step


def _save(fig, path: Path, *, tight: bool = True) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, **({"bbox_inches": "tight"} if tight else {}))
    tmp.replace(path)
    step(f"wrote {path.name}")
    return path


def lambda_sweep_plot(path: Path, *, sweep: Sequence[tuple[float, float, float]],
                      refined: Sequence[tuple[float, float]], best: tuple[float, float], max_loss: float,
                      keep_name: str = "keep", gain_name: str = "gain",
                      labels: tuple[str, str] = ("per-class lambdas (refinement)", "chosen"),
                      marked: dict[str, tuple[float, float]] | None = None,
                      sweep_label: str = "uniform lambda (every class)",
                      baseline: tuple[str, Sequence[tuple[float, float, float]]] | None = None) -> Path:
    """Gap closed against loss on the kept domain (both in %): the uniform sweep as a labelled line,
    refined per-class candidates as points, the chosen one as a star, and the allowed loss as a line.

    `sweep` holds (lambda, loss %, gap %); `refined`, `best` and the `marked` points (named) hold
    (loss %, gap %); `labels` names the refined points and the star; `baseline` (name, sweep) draws a
    second sweep to compare with, in gray.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    if baseline is not None and baseline[1]:
        ax.plot([s[1] for s in baseline[1]], [s[2] for s in baseline[1]], "s--", color="tab:gray", ms=3,
                label=baseline[0])
    if sweep:
        ax.plot([s[1] for s in sweep], [s[2] for s in sweep], "o-", color="tab:blue", ms=4, label=sweep_label)
        for lam, loss, gap in sweep:
            ax.annotate(f"{lam:g}", (loss, gap), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color="tab:blue")
    if refined:
        ax.scatter([r[0] for r in refined], [r[1] for r in refined], s=14, color="tab:gray", alpha=0.7,
                   label=labels[0])
    ax.scatter([best[0]], [best[1]], marker="*", s=180, color="tab:red", zorder=5, label=labels[1])
    for name, (loss, gap) in (marked or {}).items():
        ax.scatter([loss], [gap], marker="D", s=30, color="tab:green", zorder=4)
        ax.annotate(name, (loss, gap), textcoords="offset points", xytext=(6, 2), fontsize=8, color="tab:green")
    ax.axvline(max_loss, color="tab:red", ls="--", lw=1, label=f"allowed loss ({max_loss:g}%)")
    ax.set_xlabel(f"{keep_name}: bits per byte vs the first parent (%)")
    ax.set_ylabel(f"{gain_name}: gap closed (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


LABELLED_CELLS = 160


def routing_heatmap(path: Path, report: dict) -> Path:
    """One heatmap per source and measure (share of top-k picks, share of routing weight): domains x
    MoE layers, with a last row giving the source's share of the slots (what uniform routing would give).

    Each cell is labelled in % while the figure has at most LABELLED_CELLS cells; past that a colour bar
    reads the values (the labels were most of the drawing time, and routing.json holds the numbers).
    """
    from matplotlib.figure import Figure

    sources, layers = report["sources"], list(report["layers"])
    domains = list(report["domains"])
    rows = [*domains, "(share of slots)"]
    labelled = 2 * len(sources) * len(layers) * len(rows) <= LABELLED_CELLS
    width, height = max(4.0, 1.2 + 0.55 * len(layers)) * len(sources), 1.2 + 0.45 * len(rows) * 2
    fig = Figure(figsize=(width, height))
    # fixed margins (in inches, as fractions of the figure) instead of a layout engine: the engine cost more
    # than the drawing
    fig.subplots_adjust(left=min(0.4, 1.3 / width), right=1 - min(0.2, 0.7 / width), bottom=0.5 / height,
                        top=1 - 0.7 / height, wspace=0.15, hspace=0.35 + 0.6 / height)
    axes = fig.subplots(2, len(sources), squeeze=False)
    image = None
    for col, source in enumerate(sources):
        slots = [report["slots"][layer][source] / sum(report["slots"][layer].values()) for layer in layers]
        for row, measure in enumerate(("picks", "weight")):
            grid = [[_nan(report["layers"][layer][d][source][measure]) for layer in layers] for d in domains]
            grid.append(slots)
            ax = axes[row][col]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i, values in enumerate(grid if labelled else []):
                for j, v in enumerate(values):
                    if v == v:  # not NaN
                        ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(layers)), [f"L{layer}" for layer in layers], fontsize=7)
            ax.set_yticks(range(len(rows)), rows if col == 0 else [""] * len(rows), fontsize=7)
            ax.set_title(f"{source}: share of {'top-k picks' if measure == 'picks' else 'routing weight'} (%)",
                         fontsize=8)
    if not labelled and image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0], labels=["0%", "25%", "50%", "75%", "100%"], fontsize=7)
    fig.suptitle(f"routing of the merged model (top-{report['top_k']})", fontsize=9)
    return _save(fig, path, tight=False)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x
