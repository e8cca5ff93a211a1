"""Figures the reports embed, written atomically: the search's sweep with matplotlib's object API (no pyplot
state), the routing heatmap with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..io.failpoints import step


def _save(fig, path: Path, *, tight: bool = True) -> Path:
    return _write_png(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                    **({"bbox_inches": "tight"} if tight else {})))


def _write_png(path: Path, write) -> Path:
    """`write(tmp)` writes the PNG under a temporary name, renamed into place: never a partial figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
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

# viridis at 0, 1/8, ..., 1 (matplotlib's colour map, sampled): cell colours are interpolated between these
_VIRIDIS = ((0x44, 0x01, 0x54), (0x47, 0x2D, 0x7B), (0x3B, 0x52, 0x8B), (0x2C, 0x72, 0x8E), (0x21, 0x91, 0x8C),
            (0x28, 0xAE, 0x80), (0x5E, 0xC9, 0x62), (0xAD, 0xDC, 0x30), (0xFD, 0xE7, 0x25))
_NAN_COLOUR = (0xDD, 0xDD, 0xDD)


def _colour(v: float) -> tuple[int, int, int]:
    if v != v:  # NaN: no tokens for this domain
        return _NAN_COLOUR
    x = min(max(v, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1]))


def routing_heatmap(path: Path, report: dict) -> Path:
    """One heatmap per source and measure (share of top-k picks, share of routing weight): domains x
    MoE layers, with a last row giving the source's share of the slots (what uniform routing would give).

    Each cell is labelled in % while the figure has at most LABELLED_CELLS cells; past that the colour bar
    reads the values (routing.json holds the numbers). Drawn with Pillow, cell by cell: matplotlib's import
    and layout cost more than the routing pass on small merges.
    """
    from PIL import Image, ImageDraw, ImageFont

    sources, layers = report["sources"], sorted(report["layers"], key=int)
    domains = list(report["domains"])
    rows = [*domains, "(share of slots)"]
    labelled = 2 * len(sources) * len(layers) * len(rows) <= LABELLED_CELLS
    font, small, big = (ImageFont.load_default(size=n) for n in (12, 11, 14))
    titles = {(source, measure): f"{source}: share of {'top-k picks' if measure == 'picks' else 'routing weight'} (%)"
              for source in sources for measure in ("picks", "weight")}
    cw, ch = (36, 22) if labelled else (max(8, min(24, 1200 // max(1, len(layers) * len(sources)))), 18)
    cw = max(cw, -(-(max(int(font.getlength(t)) for t in titles.values()) + 8) // len(layers)))  # titles fit
    pad, gap, title_h, tick_h = 12, 28, 22, 18
    left = pad + max(int(font.getlength(r)) for r in rows) + 8
    panel_w, panel_h = cw * len(layers), ch * len(rows)
    tick_step = -(-(max(int(small.getlength(f"L{layer}")) for layer in layers) + 6) // cw)  # ticks never overlap
    bar_x = left + len(sources) * (panel_w + gap)
    width = bar_x + 14 + 8 + int(small.getlength("100%")) + pad
    top = pad + 24
    height = top + 2 * (title_h + panel_h + tick_h) + gap + pad
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width // 2, pad), f"routing of the merged model (top-{report['top_k']})", fill="black", font=big,
              anchor="mt")
    for row, measure in enumerate(("picks", "weight")):
        y0 = top + row * (title_h + panel_h + tick_h + gap) + title_h
        for i, name in enumerate(rows):
            draw.text((left - 6, y0 + i * ch + ch // 2), name, fill="black", font=font, anchor="rm")
        for col, source in enumerate(sources):
            x0 = left + col * (panel_w + gap)
            draw.text((x0 + panel_w // 2, y0 - 6), titles[source, measure], fill="black", font=font, anchor="mb")
            slots = [report["slots"][layer][source] / sum(report["slots"][layer].values()) for layer in layers]
            grid = [[_nan(report["layers"][layer][d][source][measure]) for layer in layers] for d in domains]
            for i, values in enumerate([*grid, slots]):
                for j, v in enumerate(values):
                    box = (x0 + j * cw, y0 + i * ch, x0 + (j + 1) * cw - 1, y0 + (i + 1) * ch - 1)
                    draw.rectangle(box, fill=_colour(v))
                    if labelled and v == v:
                        draw.text((box[0] + cw // 2, box[1] + ch // 2), f"{100 * v:.0f}", font=small,
                                  fill="white" if v < 0.6 else "black", anchor="mm")
            draw.rectangle((x0 - 1, y0 - 1, x0 + panel_w, y0 + panel_h), outline="black")
            for j in range(0, len(layers), tick_step):
                draw.text((x0 + j * cw + cw // 2, y0 + panel_h + 3), f"L{layers[j]}", fill="black", font=small,
                          anchor="mt")
    bar_top, bar_bottom = top + title_h, height - pad - tick_h
    for y in range(bar_top, bar_bottom + 1):
        draw.line((bar_x, y, bar_x + 14, y), fill=_colour(1 - (y - bar_top) / (bar_bottom - bar_top)))
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = round(bar_bottom - q * (bar_bottom - bar_top))
        draw.text((bar_x + 18, y), f"{100 * q:.0f}%", fill="black", font=small, anchor="lm")
    return _write_png(path, lambda tmp: image.save(tmp, format="PNG"))


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x
