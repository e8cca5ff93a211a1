""".venv/bin/python bench/donor_advantage.py [--out FILE]

What limits the cross-architecture merge (issue 5): where qwen3-moe-tiny's maths advantage over
zen-tiny lives, and how much of it the fitted maps A / B lose, layer by layer. merge/config.yml grafts
the donor's 4 most used experts of donor layers 1 and 2 into zen-tiny's MoE layers 1-3 through A
(zen-tiny's MoE input -> the donor's) and B (the donor's layer output -> zen-tiny's); these
measurements say why no lever of bench/method_table.py gets the donor's maths into the merge.

1. **Ablations of the donor.** One class of tensors at a time is replaced by seeded random weights of
   the same Frobenius norm (per tensor; per expert for the routed experts), and the donor is scored on
   the held-out text:
       advantage kept = (maths(zen-tiny) - maths(ablated)) / (maths(zen-tiny) - maths(donor))
   100% = the class is not needed for the donor's lead, <= 0% = without it the donor is no better
   at maths than zen-tiny. "all but the grafted experts" randomises every routed expert
   merge/config.yml does not graft, so what is left is the most a perfect graft could carry.
2. **Fit residual per layer pair.** R^2 of A and B (ridge fits, merge/config.yml's `align`) on their
   calibration text and on the held-out text, whose tokens the fits never saw.
3. **The donor's own experts reading mapped inputs.** The donor runs as itself, except that the
   routed experts of one donor layer read A x_b (x_b: zen-tiny's MoE input at the paired base layer,
   for the token ending at the same character) instead of their own input; tokens without a partner
   keep their own. The router still reads the true input. This is what a grafted expert sees, in the
   best case of the donor's own residual stream around it. Scored passage by passage (1024
   characters each, every token of a passage predicted after a start token), for zen-tiny, the donor and
   every mapped row alike, so the rows of this table compare with each other (not with part 1's).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from merge_quality import emit, heldout_texts, report_head
from transformers import AutoModelForCausalLM, AutoTokenizer

from zenith_merge.demo import bits_per_byte, ensure_demo
from zenith_merge.demo.evaluate import start_token_id
from zenith_merge.maths.graft import rescaled_to_norm
from zenith_merge.stages.align import load_alignment, pair_by_offsets, split_passages

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "merge" / "config.yml"
BASE, DONOR = "zen-tiny", "qwen3-moe-tiny"
DONOR_SOURCE = "donor1"  # the plan's name for merge/config.yml's second experts[] entry
SEED = 0


# ------------------------------------------------------------------ 1. ablations


def _randomised(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise scaled to t's Frobenius norm, as the `random_experts` control makes it."""
    return rescaled_to_norm(torch.randn(t.shape, generator=gen, dtype=torch.float32), t).to(t.dtype)


def ablate(model, picks: Callable[[str], list[int] | bool]) -> int:
    """Randomise, in place, every parameter for which `picks(name)` is True, or the listed experts (dim 0)
    of a fused expert tensor for which it returns a list. Returns the number of values replaced."""
    gen = torch.Generator().manual_seed(SEED)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            pick = picks(name)
            if pick is True:
                p.copy_(_randomised(p, gen))
                n += p.numel()
            elif isinstance(pick, list):
                for e in pick:
                    p[e].copy_(_randomised(p[e], gen))
                    n += p[e].numel()
    return n


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def ablations(grafted: dict[int, list[int]], n_experts: int, n_layers: int) -> list[tuple[str, Callable]]:
    """(label, picks) for each ablation row; `grafted`: donor layer -> experts merge/config.yml grafts."""
    return [
        ("routed experts, every layer", _is_routed_expert),
        *[(f"routed experts of layer {layer}", lambda n, layer=layer: _is_routed_expert(n) and _layer(n) == layer)
          for layer in range(n_layers)],
        ("all but the grafted experts", lambda n: _is_routed_expert(n) and
         [e for e in range(n_experts) if e not in grafted.get(_layer(n), [])]),
        ("only the grafted experts", lambda n: _is_routed_expert(n) and grafted.get(_layer(n), [])),
        ("routers", lambda n: ".mlp.gate." in n),
        ("attention (q, k, v, o)", lambda n: ".self_attn." in n and n.endswith("proj.weight")),
        ("token embeddings", lambda n: n == "model.embed_tokens.weight"),
        ("lm_head", lambda n: n == "lm_head.weight"),
    ]


# ------------------------------------------------------------------ 2 and 3: maps on held-out text


def _tokens(tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return torch.tensor(enc["input_ids"]), torch.tensor([end for _, end in enc["offset_mapping"]])


@contextmanager
def captured(model, mlp_inputs: list[int], layer_outputs: list[int]) -> Iterator[dict]:
    """Capture each listed layer's MoE input and decoder-layer output (batch 1, start token dropped)."""
    got: dict = {}
    hooks = []
    for layer in mlp_inputs:
        def pre(_m, args, layer=layer):
            got["in", layer] = args[0][0, 1:].detach().double()
        hooks.append(model.model.layers[layer].mlp.register_forward_pre_hook(pre))
    for layer in layer_outputs:
        def post(_m, _args, out, layer=layer):
            got["out", layer] = (out[0] if isinstance(out, tuple) else out)[0, 1:].detach().double()
        hooks.append(model.model.layers[layer].register_forward_hook(post))
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def experts_read(model, layer: int, rows: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Have the routed experts of `layer` read `values` at token `rows` (start token excluded)."""
    def pre(_m, args):
        x = args[0].clone()
        x[rows + 1] = values.to(x.dtype)
        return (x, *args[1:])
    h = model.model.layers[layer].mlp.experts.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        h.remove()


def _nll(model, start: int, ids: torch.Tensor) -> float:
    """Summed next-token NLL (nats) of `ids` after the start token."""
    x = torch.cat([torch.tensor([start]), ids])[None]
    logits = model(input_ids=x).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids, reduction="sum"))


class R2:
    """Held-out R^2 of a fixed map y ~ W x: 1 - sum ||y - W x||^2 / sum ||y - mean(y)||^2."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.yy = 0.0
        self.y_sum: torch.Tensor | float = 0.0
        self.n = 0

    def add(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sse += float(((y - x @ W.double().T) ** 2).sum())
        self.yy += float((y * y).sum())
        self.y_sum = self.y_sum + y.sum(0)
        self.n += y.shape[0]

    def value(self) -> float:
        sst = self.yy - float((self.y_sum * self.y_sum).sum()) / self.n
        return 1.0 - self.sse / sst


def mapped_inputs(base, base_tok, donor, donor_tok, maps, texts: dict[str, str]) -> dict:
    """Parts 2 and 3 on each held-out text: held-out R^2 of A and B, and bits per byte of zen-tiny, the
    donor and the donor with one layer's experts reading A x_b, all over the same passages."""
    pairs = maps.pairs
    b_start, d_start = start_token_id(base, base_tok), start_token_id(donor, donor_tok)
    out: dict = {}
    for domain, text in texts.items():
        r2a, r2b = {p: R2() for p in pairs}, {p: R2() for p in pairs}
        nll = {"base": 0.0, "donor": 0.0, **{p: 0.0 for p in pairs}}
        n_bytes = 0
        for passage in split_passages(text, 1024):
            b_ids, b_ends = _tokens(base_tok, passage)
            d_ids, d_ends = _tokens(donor_tok, passage)
            if len(b_ids) < 2 or len(d_ids) < 2:
                continue
            n_bytes += len(passage.encode())
            with torch.no_grad():
                with captured(base, [b for b, _ in pairs], [b for b, _ in pairs]) as xb:
                    nll["base"] += _nll(base, b_start, b_ids)
                with captured(donor, [d for _, d in pairs], [d for _, d in pairs]) as xd:
                    nll["donor"] += _nll(donor, d_start, d_ids)
                ib, id_ = pair_by_offsets(b_ends, d_ends)
                for b, d in pairs:
                    r2a[b, d].add(maps.A[b, d], xb["in", b][ib], xd["in", d][id_])
                    r2b[b, d].add(maps.B[b, d], xd["out", d][id_], xb["out", b][ib])
                    mapped = xb["in", b][ib] @ maps.A[b, d].double().T
                    with experts_read(donor, d, id_, mapped):
                        nll[b, d] += _nll(donor, d_start, d_ids)
        out[domain] = {
            "r2_A": {p: r2a[p].value() for p in pairs}, "r2_B": {p: r2b[p].value() for p in pairs},
            "bpb": {k: v / math.log(2) / n_bytes for k, v in nll.items()},
        }
    return out


def flagship_stages(work: Path) -> tuple[Path, dict[int, list[int]]]:
    """Run merge/config.yml's stages (`zenith-merge align`): its alignment folder, and the experts it grafts."""
    subprocess.run([sys.executable, "-m", "zenith_merge.cli", "align", str(FLAGSHIP), "--output", str(work),
                    "--overwrite", "--no-progress"], check=True, capture_output=True)
    usage = json.loads((work / ".zenith" / "usage.json").read_text())["sources"][DONOR_SOURCE]
    plan = json.loads(subprocess.run([sys.executable, "-m", "zenith_merge.cli", "plan", str(FLAGSHIP), "--output",
                                      str(work), "--json"], check=True, capture_output=True, text=True).stdout)
    keep = {}
    for layer in plan["expert_table"]:
        for slot in layer["slots"]:
            if slot["source"] == DONOR_SOURCE:
                keep.setdefault(slot["source_layer"], set()).add(slot["rank"])
    grafted = {d: sorted(usage[str(d)]["order"][r] for r in ranks) for d, ranks in keep.items()}
    return work / ".zenith" / f"align-{DONOR_SOURCE}", grafted


# ------------------------------------------------------------------ report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    ap.add_argument("--no-ablations", action="store_true", help="parts 2 and 3 only")
    args = ap.parse_args()
    t_start = time.perf_counter()
    texts = {k: v for k, v in heldout_texts().items() if k in ("code", "maths")}
    base_path, donor_path = ensure_demo(BASE, progress=False), ensure_demo(DONOR, progress=False)

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    base, base_tok = load(base_path)
    donor, donor_tok = load(donor_path)
    b_bpb = {k: bits_per_byte(base, base_tok, t) for k, t in texts.items()}
    d_bpb = {k: bits_per_byte(donor, donor_tok, t) for k, t in texts.items()}
    gap = b_bpb["maths"] - d_bpb["maths"]

    with tempfile.TemporaryDirectory(prefix="zenith-donor-advantage-") as tmp:
        align_dir, grafted = flagship_stages(Path(tmp))
        maps = load_alignment(align_dir)
        calib_r2 = (maps.r2_A, maps.r2_B)

        cfg = donor.config
        lines = ["### 1. Ablations of the donor (held-out text, bits per byte)", "",
                 "| donor with ... randomised (equal norm) | values replaced | code bpb | maths bpb | "
                 "maths advantage over zen-tiny kept |", "| --- | ---: | ---: | ---: | ---: |",
                 f"| nothing ({DONOR}) | 0 | {d_bpb['code']:.4f} | {d_bpb['maths']:.4f} | 100.0% |"]
        for label, picks in [] if args.no_ablations else ablations(grafted, cfg.num_local_experts, cfg.num_hidden_layers):
            model, tok = load(donor_path)
            n = ablate(model, picks)
            s = {k: bits_per_byte(model, tok, t) for k, t in texts.items()}
            lines.append(f"| {label} | {n:,} | {s['code']:.4f} | {s['maths']:.4f} | "
                         f"{100 * (b_bpb['maths'] - s['maths']) / gap:.1f}% |")
            print(lines[-1], flush=True)
        lines += ["", f"{BASE}: code {b_bpb['code']:.4f}, maths {b_bpb['maths']:.4f}. Grafted experts (donor layer: "
                  f"experts): {grafted}; donor layers {cfg.num_hidden_layers}, {cfg.num_local_experts} experts each.", ""]

        held = mapped_inputs(base, base_tok, donor, donor_tok, maps, texts)
    lines += ["### 2. Fit residual per layer pair (R^2; 1 - R^2 is the share of variance the map misses)", "",
              "| pair (base layer, donor layer) | A: calibration | A: held-out code | A: held-out maths | "
              "B: calibration | B: held-out code | B: held-out maths |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in maps.pairs:
        lines.append(f"| {p} | {calib_r2[0][p]:.3f} | {held['code']['r2_A'][p]:.3f} | {held['maths']['r2_A'][p]:.3f} "
                     f"| {calib_r2[1][p]:.3f} | {held['code']['r2_B'][p]:.3f} | {held['maths']['r2_B'][p]:.3f} |")
    pb = {k: held[k]["bpb"] for k in texts}
    pgap = pb["maths"]["base"] - pb["maths"]["donor"]
    lines += ["", "### 3. The donor's own experts reading A x_b (passage scoring, held-out text)", "",
              "| model | code bpb | maths bpb | maths advantage over zen-tiny kept |", "| --- | ---: | ---: | ---: |",
              f"| {BASE} | {pb['code']['base']:.4f} | {pb['maths']['base']:.4f} | 0.0% |",
              f"| {DONOR} | {pb['code']['donor']:.4f} | {pb['maths']['donor']:.4f} | 100.0% |"]
    for b, d in maps.pairs:
        lines.append(f"| {DONOR}, layer {d}'s experts reading A x_b of {BASE} layer {b} | {pb['code'][b, d]:.4f} | "
                     f"{pb['maths'][b, d]:.4f} | {100 * (pb['maths']['base'] - pb['maths'][b, d]) / pgap:.1f}% |")
    command = f".venv/bin/python bench/donor_advantage.py{' --no-ablations' if args.no_ablations else ''}"
    report = "\n".join([*report_head(command, t_start), "", *lines])
    emit(report, args.out)


if __name__ == "__main__":
    main()
