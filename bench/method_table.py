""".venv/bin/python bench/method_table.py [--out FILE] [--quick] [--gates G ...] [--levers L ...] [--slerp T ...]

The cross-architecture method table (issue 5): merge/config.yml (zen-tiny + 4 experts of
qwen3-moe-tiny) for every gate mode, with and without each lever (calibrated offsets, router
training, alignment training, alignment training with the donor as teacher), at slerp_t 0 and
0.5; then the controls, trained the same way: the donor's experts replaced by random experts of
equal norm (`random_experts`), and zen-tiny alone with its router rows plus an adapter of as many
parameters as the maps (r = 96 per MoE layer: 2 x 128 x 96 = 96 x 128 x 2), on the same text,
steps and learning rates. Each merge runs as its own `zenith-merge merge` process under
/usr/bin/time (wall seconds, peak RSS), then is scored on the held-out text:

    code vs base = code_bpb / code_bpb(zen-tiny) - 1
    gap closed   = (maths(zen-tiny) - maths) / (maths(zen-tiny) - maths(qwen3-moe-tiny))

`--quick` runs one gate mode (transfer) only; `--gates`, `--levers` and `--slerp` pick rows (the
random-expert controls follow the levers picked).

`--family same` runs the same table for the same-family concat: merge/examples/chimera_concat.yml
(zen-tiny's 8 experts and zen-r1-tiny's 8 side by side), gap against zen-r1-tiny, every gate mode
with and without calibrated offsets and router training (the alignment levers and slerp_t do not
apply: the children share one residual stream and one vocabulary), then merge/examples/chimera.yml
(assembly, RegMean) in the same run, the method the same-family acceptance compares concat with.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from common import timed
from merge_quality import emit, heldout_texts, report_head, score

from zenith_merge.config import with_absolute_paths
from zenith_merge.demo import ensure_demo

ROOT = Path(__file__).resolve().parents[1]
FLAGSHIP = ROOT / "merge" / "config.yml"
CHIMERA = ROOT / "merge" / "examples" / "chimera.yml"
BASE, DONOR = "zen-tiny", "qwen3-moe-tiny"
GATES = ("transfer", "random", "uniform_random", "hidden", "hidden_avg", "hidden_last", "cheap_embed")
STEPS, ROUTER_LR, MAPS_LR = 100, 1e-2, 1e-3
LEVERS = {
    "none": {"router": {"calibrate": False}},
    "calibrated offsets": {"router": {"calibrate": True}},
    "router training": {"router": {"calibrate": False, "train_steps": STEPS, "lr": ROUTER_LR}},
    "alignment training": {"router": {"calibrate": False, "lr": ROUTER_LR},
                           "align": {"train_steps": STEPS, "lr": MAPS_LR}},
    "alignment training + teacher": {"router": {"calibrate": False, "lr": ROUTER_LR},
                                     "align": {"train_steps": STEPS, "lr": MAPS_LR, "teacher_data": ["demo:maths"]}},
}
ADAPTER_RANK = 96


@dataclass(frozen=True)
class Family:
    """What one table merges: its config, the donor its gap is measured against, the levers that apply."""

    config: Path
    donor: str
    levers: tuple[str, ...]
    cross: bool  # maps, a union vocabulary (slerp_t) and the controls apply
    router_data: tuple[str, ...] = ()  # router training's text where the config names no align.calibration


FAMILIES = {
    "cross": Family(FLAGSHIP, DONOR, tuple(LEVERS), cross=True),
    "same": Family(ROOT / "merge" / "examples" / "chimera_concat.yml", "zen-r1-tiny",
                   ("none", "calibrated offsets", "router training"), cross=False,
                   router_data=("demo:code", "demo:maths")),  # the text the cross family trains on
}


def edited(gate: str, lever: str, slerp_t: float | None, random_experts: bool = False, *,
           family: Family = FAMILIES["cross"]) -> dict:
    """The family's config with one gate mode, lever and slerp_t (paths absolute, so it runs from anywhere)."""
    data = with_absolute_paths(yaml.safe_load(family.config.read_text()), family.config.parent)
    data["gate_mode"] = gate
    for key, values in LEVERS[lever].items():
        data[key] = {**data.get(key, {}), **copy.deepcopy(values)}
    if family.router_data:
        data["router"]["data"] = list(family.router_data)
    if slerp_t is not None:
        data["tokenizer"]["slerp_t"] = slerp_t
    data["routing_report"] = False
    if random_experts:
        data["experts"][1]["random_experts"] = True
    return data


def run_merge_timed(data: dict, folder: Path) -> tuple[float, int]:
    """`zenith-merge merge` of `data` into folder/out, under /usr/bin/time."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "merge.yml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    exe = Path(sys.executable).with_name("zenith-merge")
    return timed([str(exe), "merge", str(cfg), "--output", str(folder / "out"), "--no-progress"])


def adapter_control(texts: dict[str, str]) -> dict[str, float]:
    """zen-tiny with its router rows and a rank-96 adapter per MoE layer trained like the merges; held-out bpb."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zenith_merge.architectures import ARCHITECTURES, facts, tensor_name
    from zenith_merge.config import load_config
    from zenith_merge.demo import bits_per_byte
    from zenith_merge.forward.token_batches import token_batches
    from zenith_merge.pipeline import read_texts

    cfg = load_config(FLAGSHIP)
    path = ensure_demo(BASE, progress=False)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    arch = ARCHITECTURES[model.config.architectures[0]]
    layers = facts(model.config.to_dict()).moe_layers
    d = model.config.hidden_size
    routers, adapters = [], []
    for layer in layers:
        w = model.get_parameter(tensor_name(arch, "router", layer))
        w.requires_grad_(True)
        routers.append(w)
        down = torch.nn.Linear(d, ADAPTER_RANK, bias=False)
        up = torch.nn.Linear(ADAPTER_RANK, d, bias=False)
        torch.nn.init.zeros_(up.weight)  # starts as the base model exactly
        adapters += [down, up]
        mlp = model.get_submodule(arch.mlp_module.format(layer=layer))
        mlp.register_forward_hook(lambda m, args, out, down=down, up=up: out + up(down(args[0])))
    data = [*read_texts(cfg.align.calibration, "align.calibration", FLAGSHIP.parent),
            *(p for e in cfg.experts for p in e.positive_prompts)]
    batches = token_batches(tok, data, cfg.router.seq_len, cfg.router.batch_size, STEPS, cfg.seed)
    optim = torch.optim.AdamW([{"params": routers, "lr": ROUTER_LR},
                               {"params": [p for a in adapters for p in a.parameters()], "lr": MAPS_LR}],
                              weight_decay=0.0)
    model.train()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    return {k: bits_per_byte(model, tok, t) for k, t in texts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    ap.add_argument("--family", choices=list(FAMILIES), default="cross",
                    help="cross: merge/config.yml (default); same: merge/examples/chimera_concat.yml and chimera.yml")
    ap.add_argument("--quick", action="store_true", help="gate mode transfer only")
    ap.add_argument("--gates", nargs="+", choices=GATES, help="these gate modes only")
    ap.add_argument("--levers", nargs="+", choices=list(LEVERS), help="these levers only (and their controls)")
    ap.add_argument("--slerp", type=float, nargs="+", default=[0.0, 0.5],
                    help="tokenizer.slerp_t values (default 0 0.5; cross family only)")
    ap.add_argument("--adapter-only", action="store_true", help=argparse.SUPPRESS)  # the timed subprocess
    args = ap.parse_args()
    family = FAMILIES[args.family]
    texts = heldout_texts()
    if args.adapter_only:
        print(yaml.safe_dump(adapter_control(texts)))
        return
    t_start = time.perf_counter()
    base = score(ensure_demo(BASE, progress=False), texts)
    donor = score(ensure_demo(family.donor, progress=False), texts)

    def cells(b: dict, wall: float | None, rss: int | None) -> str:
        code = 100 * (b["code"] / base["code"] - 1)
        gap = 100 * (base["maths"] - b["maths"]) / (base["maths"] - donor["maths"])
        chat = 100 * (base["maths_chat"] - b["maths_chat"]) / (base["maths_chat"] - donor["maths_chat"])
        timing = "| |" if wall is None else f"| {wall:.1f} | {rss / 2**20:.0f} |"
        return f"{b['code']:.4f} | {b['maths']:.4f} | {code:+.2f}% | {gap:.1f}% | {chat:.1f}% {timing}"

    rows = []
    with tempfile.TemporaryDirectory(prefix="zenith-method-table-") as tmp:
        gates = args.gates or (GATES[:1] if args.quick else GATES)
        levers = [lv for lv in args.levers or list(LEVERS) if lv in family.levers]
        slerps = args.slerp if family.cross else [None]
        runs = [(g, lv, t, False) for g in gates for lv in levers for t in slerps]
        if family.cross:
            runs += [("transfer", lv, 0.0, True) for lv in ("none", "router training", "alignment training",
                                                             "alignment training + teacher") if lv in levers]
        for i, (gate, lever, slerp_t, rnd) in enumerate(runs):
            label = f"{'control: random experts, ' if rnd else ''}{gate} | {lever} | " \
                    f"{'-' if slerp_t is None else f'{slerp_t:g}'}"
            try:
                wall, rss = run_merge_timed(edited(gate, lever, slerp_t, rnd, family=family), Path(tmp) / f"m{i}")
                rows.append(f"| {label} | {cells(score(Path(tmp) / f'm{i}' / 'out', texts), wall, rss)}")
            except Exception as err:  # one failure should not hide the other rows
                rows.append(f"| {label} | failed: {str(err).splitlines()[0][:120]} | | | | | | |")
            print(rows[-1], flush=True)
        if not family.cross:
            data = with_absolute_paths(yaml.safe_load(CHIMERA.read_text()), CHIMERA.parent)
            wall, rss = run_merge_timed({**data, "routing_report": False}, Path(tmp) / "chimera")
            rows.append(f"| assembly: merge/examples/chimera.yml (RegMean, searched weights) | - | - | "
                        f"{cells(score(Path(tmp) / 'chimera' / 'out', texts), wall, rss)}")
            print(rows[-1], flush=True)
            emit(table(args, t_start, rows, base, donor, family), args.out)
            return
        t0 = time.perf_counter()
        wall, rss = timed([sys.executable, str(Path(__file__).resolve()), "--adapter-only"])
        adapter = adapter_control(texts)  # scored again here (deterministic) to read the numbers
        rows.append(f"| control: {BASE} alone, router + rank-{ADAPTER_RANK} adapter, {STEPS} steps | - | - | "
                    f"{cells(adapter, wall, rss)}")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    emit(table(args, t_start, rows, base, donor, family), args.out)


def table(args, t_start: float, rows: list[str], base: dict, donor: dict, family: Family) -> str:
    """The report: machine and command, the rows, and the sources' own scores and the training settings."""
    return "\n".join([
        *report_head(shlex.join([".venv/bin/python", "bench/method_table.py", *sys.argv[1:]]), t_start),
        "",
        "| gate mode | lever | slerp_t | code bpb | maths bpb | code vs base | maths gap closed | "
        "maths (chat) gap closed | merge s | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"{BASE}: code {base['code']:.4f}, maths {base['maths']:.4f}, chat {base['maths_chat']:.4f}; {family.donor}: "
        f"code {donor['code']:.4f}, maths {donor['maths']:.4f}, chat {donor['maths_chat']:.4f} bits per byte. "
        f"Training: {STEPS} steps, router lr {ROUTER_LR:g}"
        + (f", maps (and adapter) lr {MAPS_LR:g}" if family.cross else "")
        + (", batch 4 x 128 tokens of align.calibration (demo code + maths) and the prompts" if family.cross
           else ", batch 4 x 128 tokens of router.data (demo code + maths)")
        + ("; the teacher reads demo maths (calibration split)." if family.cross else "."),
    ])


if __name__ == "__main__":
    main()
