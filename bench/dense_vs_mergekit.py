""".venv/bin/python bench/dense_vs_mergekit.py --repeats 5       (the run in bench/RESULTS.md; default 3 repeats)
    .venv/bin/python bench/dense_vs_mergekit.py --family llama --repeats 3     (Llama donors -> Mixtral)
    .venv/bin/python bench/dense_vs_mergekit.py --layers 8 --keep --work /tmp/dvm --out /tmp/dvm.json

Four dense Qwen3 models into a Qwen3-MoE (gate_mode: hidden): zenith-merge vs mergekit-moe, time, memory, tensors.
With --family llama: four dense Llama models into a Mixtral, mergekit-moe's classic config (no `architecture:`).
Builds four dense Qwen3ForCausalLM checkpoints with seeded random bf16 weights (written tensor by
tensor with safetensors, the demo qwen3-moe-tiny's tokenizer), then merges them into one
Qwen3MoeForCausalLM with 4 experts per layer, top-2, hidden-state router rows from the base
(model 0), bfloat16. Both tools run the same mergekit-moe YAML; a third contender is zenith-merge
with its own `calibration_max_memory: 1MB` added (the hidden-state pass streams the base's layers
from disk instead of holding them).
Each repeat runs `mergekit-moe CONFIG OUT --device cpu` and `zenith-merge merge CONFIG --output OUT
--overwrite --no-progress` back to back (alternating which goes first), each under
`/usr/bin/time -v`, into a freshly removed output folder; medians are reported. The page cache (and Python's
bytecode cache: PYTHONDONTWRITEBYTECODE is unset for both tools) is
warm for both after the first repeat. Then the outputs of the last repeat are compared tensor by
tensor: mergekit writes transformers' fused expert layout (`experts.gate_up_proj` (E, 2*inter,
hidden) = per expert cat(gate, up) along dim 0, `experts.down_proj` (E, hidden, inter)), zenith-merge
one tensor per expert and projection; both are sliced to per-expert tensors and compared byte for
byte, with each other and with the dense donors' MLPs. Router rows are compared by cosine
similarity, and both outputs are loaded with AutoModelForCausalLM for a short forward pass.
The work folder is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from common import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ZENITH = [str(BIN / "zenith-merge")]
MERGEKIT = [str(BIN / "mergekit-moe")]
# Python caches bytecode as it normally does (this machine's PYTHONDONTWRITEBYTECODE=1 would make every run of an
# editable install compile its sources again, while mergekit's installed package has its .pyc files)
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

PROMPTS = [
    ["def quicksort(xs):\n    if len(xs) <= 1:\n        return xs", "import numpy as np\nclass Model:\n    def forward(self, x):"],
    ["Solve for x: 3x + 7 = 22. Subtract 7 from both sides.", "The integral of x^2 from 0 to 1 equals 1/3 because"],
    ["Once upon a time, in a quiet village by the sea, there lived", "She opened the letter slowly and began to read aloud."],
    ["The mitochondria is the powerhouse of the cell; ATP is made", "Photosynthesis converts light energy, water and CO2 into"],
]


FAMILIES = {"qwen3": ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"), "llama": ("LlamaForCausalLM", "MixtralForCausalLM")}


def build_dense(path: Path, seed: int, dims: dict, tokenizer_dir: Path, shard_bytes: int, family: str = "qwen3") -> Path:
    """A dense (Qwen3ForCausalLM or LlamaForCausalLM) folder with seeded random bf16 weights, written tensor by tensor."""
    cls = FAMILIES[family][0]
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(
        hidden_size=dims["hidden"], intermediate_size=dims["intermediate"], num_hidden_layers=dims["layers"],
        num_attention_heads=dims["hidden"] // 64, num_key_value_heads=max(1, dims["hidden"] // 128), head_dim=64,
        vocab_size=dims["vocab"], max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=2, pad_token_id=0)
    config.architectures = [cls]
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in getattr(transformers, cls)(config).named_parameters()}
    shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])


    def make(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        t = torch.randn(shape, generator=gen)
        return (1.0 + 0.02 * t if name.endswith("norm.weight") else 0.02 * t).to(torch.bfloat16)

    return write_random_checkpoint(path, config, shapes.items(), seed=seed, shard_bytes=shard_bytes, make=make,
                                   tokenizer_from=tokenizer_dir)


def write_configs(work: Path, models: list[Path], family: str = "qwen3") -> tuple[Path, Path, Path]:
    """One mergekit-moe YAML that both tools run unchanged, the same plus zenith-merge's memory cap, and the same
    with `routing_report: false` (the tensors mergekit-moe writes, without the report only zenith-merge makes).

    `calibration_max_memory` lets zenith-merge's hidden-state pass keep (almost) no weights in
    memory: accelerate reads the base's layers from disk during the forward pass.
    """
    import yaml

    body = {
        "base_model": str(models[0]),
        # mergekit-moe's name for its Qwen3 output; Llama donors take no name (mergekit picks Mixtral), as in its README
        **({"architecture": "Qwen3 MoE"} if family == "qwen3" else {}),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [{"source_model": str(m), "positive_prompts": PROMPTS[i % len(PROMPTS)]} for i, m in enumerate(models)],
    }
    shared, capped, bare = work / "mergekit.yml", work / "zenith-capped.yml", work / "zenith-no-report.yml"
    shared.write_text(yaml.safe_dump(body, sort_keys=False))
    capped.write_text(yaml.safe_dump({**body, "calibration_max_memory": "1MB"}, sort_keys=False))
    bare.write_text(yaml.safe_dump({**body, "routing_report": False}, sort_keys=False))
    return shared, capped, bare


def timed(cmd: list[str], log: Path) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of `cmd` under /usr/bin/time -v; output kept in `log`."""
    subprocess.run(["sync"], check=True)            # nobody pays for the other tool's dirty pages
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}")
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}), log {log}:\n{res.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", res.stderr).group(1)) for k in ("User", "System"))
    return wall, rss_kb * 1024, cpu


class Output:
    """Lazy tensor access to a safetensors folder (sharded or not)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        files = sorted(folder.glob("*.safetensors"))
        self.handles = {f.name: safe_open(str(f), "pt") for f in files}
        self.where = {k: name for name, h in self.handles.items() for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)

    def names(self) -> set[str]:
        return set(self.where)


MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def expert(out: Output, layer: int, e: int, proj: str) -> torch.Tensor:
    """Expert `e`'s gate_proj / up_proj / down_proj at `layer`, from any layout: one tensor per expert (Qwen3-MoE's
    names, or Mixtral's block_sparse_moe w1/w3/w2) or transformers' fused tensors (what mergekit-moe writes)."""
    p = f"model.layers.{layer}.mlp.experts."
    if f"{p}{e}.{proj}.weight" in out:
        return out.get(f"{p}{e}.{proj}.weight")
    mixtral = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{MIXTRAL_NAMES[proj]}.weight"
    if mixtral in out:
        return out.get(mixtral)
    if proj == "down_proj":
        return out.get(p + "down_proj")[e]
    gate_up = out.get(p + "gate_up_proj")[e]          # (2*inter, hidden): gate rows, then up rows
    inter = gate_up.shape[0] // 2
    return gate_up[:inter] if proj == "gate_proj" else gate_up[inter:]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


EXPERT_RE = re.compile(r"\.(mlp|block_sparse_moe)\.(experts\.|gate\.weight)")


def compare(mk_dir: Path, zen_dir: Path, models: list[Path], layers: int) -> dict:
    mk, zen = Output(mk_dir), Output(zen_dir)
    srcs = [Output(m) for m in models]
    n_exp = len(models)
    res = {"expert_tensors": 0, "expert_equal": 0, "expert_equal_source_mk": 0, "expert_equal_source_zen": 0,
           "expert_mismatches": []}
    for layer in range(layers):
        for e in range(n_exp):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                a, b = expert(mk, layer, e, proj), expert(zen, layer, e, proj)
                s = srcs[e].get(f"model.layers.{layer}.mlp.{proj}.weight")
                res["expert_tensors"] += 1
                eq = same_bytes(a, b)
                res["expert_equal"] += eq
                res["expert_equal_source_mk"] += same_bytes(a, s)
                res["expert_equal_source_zen"] += same_bytes(b, s)
                if not eq:
                    res["expert_mismatches"].append(
                        f"L{layer} e{e} {proj}: mk {tuple(a.shape)} {a.dtype}, zen {tuple(b.shape)} {b.dtype}, "
                        f"max |diff| {(a.float() - b.float()).abs().max().item() if a.shape == b.shape else 'n/a'}")
    body_mk = {n for n in mk.names() if not EXPERT_RE.search(n)}
    body_zen = {n for n in zen.names() if not EXPERT_RE.search(n)}
    common = sorted(body_mk & body_zen)
    res["body_only_mk"] = sorted(body_mk - body_zen)
    res["body_only_zen"] = sorted(body_zen - body_mk)
    res["body_tensors"] = len(common)
    res["body_equal"] = sum(same_bytes(mk.get(n), zen.get(n)) for n in common)
    res["body_mismatches"] = [n for n in common if not same_bytes(mk.get(n), zen.get(n))]
    res["body_equal_base"] = sum(n in srcs[0] and same_bytes(zen.get(n), srcs[0].get(n)) for n in common)
    cos = []
    for layer in range(layers):
        name = f"model.layers.{layer}.mlp.gate.weight"
        zen_name = name if name in zen else f"model.layers.{layer}.block_sparse_moe.gate.weight"
        a, b = mk.get(name).float(), zen.get(zen_name).float()
        res.setdefault("router_shapes", (tuple(a.shape), tuple(b.shape), str(mk.get(name).dtype),
                                         str(zen.get(zen_name).dtype)))
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist())
    res["router_cos"] = cos                           # [layer][expert]
    flat = [c for row in cos for c in row]
    res["router_cos_summary"] = (min(flat), statistics.median(flat), max(flat))
    res["router_cos_per_layer"] = [statistics.mean(row) for row in cos]
    return res


def load_check(folders: dict[str, Path], vocab: int) -> dict:
    """Load each output with AutoModelForCausalLM (bf16) and run one short forward pass."""
    transformers.utils.logging.disable_progress_bar()
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    out, logits = {}, {}
    for label, folder in folders.items():
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                        output_loading_info=True)
        with torch.no_grad():
            lg = model(ids).logits.float()
        logits[label] = lg
        out[label] = {"class": type(model).__name__, "missing": list(info.get("missing_keys", [])),
                      "unexpected": list(info.get("unexpected_keys", [])),
                      "mismatched": [str(x) for x in info.get("mismatched_keys", [])],
                      "finite": bool(torch.isfinite(lg).all()), "logits_shape": tuple(lg.shape)}
        del model
    a, b = logits.values()
    out["logits_max_abs_diff"] = (a - b).abs().max().item()
    out["argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import version

    return (f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, {cpu}, {platform.platform()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, mergekit {version('mergekit')}, "
            f"zenith-merge {version('zenith-merge')}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/zenith-dense-vs-mergekit"),
                   help="work folder for the donors and outputs (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: the tokenizer's length)")
    p.add_argument("--shard-mb", type=int, default=200, help="donor shard size in MB (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen3",
                   help="donor family: qwen3 (-> Qwen3-MoE, default) or llama (-> Mixtral)")
    args = p.parse_args()

    t_start = time.perf_counter()
    tok_dir = Path(subprocess.run([*ZENITH, "demo", "--print-path", "qwen3-moe-tiny"], capture_output=True, text=True,
                                  check=True, env=ENV).stdout.strip().splitlines()[-1])
    n_tok = len(transformers.AutoTokenizer.from_pretrained(tok_dir))
    vocab = args.vocab or n_tok
    if vocab < n_tok:
        p.error(f"--vocab {vocab} is smaller than the tokenizer's {n_tok} tokens")
    dims = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=vocab)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        models = [build_dense(work / f"dense-{i}", 1000 + i, dims, tok_dir, args.shard_mb * 10**6, args.family)
                  for i in range(4)]
        build_s = time.perf_counter() - t0
        mk_cfg, capped_cfg, bare_cfg = write_configs(work, models, args.family)
        capped, bare = "zenith-merge, calibration_max_memory: 1MB", "zenith-merge, routing_report: false"
        runs = {"mergekit-moe": [], "zenith-merge": [], capped: [], bare: []}
        outs = {"mergekit-moe": work / "out-mergekit", "zenith-merge": work / "out-zenith", capped: work / "out-capped",
                bare: work / "out-bare"}
        cmds = {
            "mergekit-moe": [*MERGEKIT, str(mk_cfg), str(outs["mergekit-moe"]), "--device", "cpu", "--quiet"],
            "zenith-merge": [*ZENITH, "merge", str(mk_cfg), "--output", str(outs["zenith-merge"]), "--overwrite",
                             "--no-progress"],
            capped: [*ZENITH, "merge", str(capped_cfg), "--output", str(outs[capped]), "--overwrite", "--no-progress"],
            bare: [*ZENITH, "merge", str(bare_cfg), "--output", str(outs[bare]), "--overwrite", "--no-progress"],
        }
        load_before = os.getloadavg()[0]
        for r in range(args.repeats):
            order = list(cmds)[r % len(cmds):] + list(cmds)[:r % len(cmds)]  # each contender leads in turn
            for name in order:
                shutil.rmtree(outs[name], ignore_errors=True)
                runs[name].append(timed(cmds[name], work / f"log-{name}-{r}.txt"))
                print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name][-1][0]:.1f} s, "
                      f"{runs[name][-1][1] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        stats = {name: {"wall_s": statistics.median(r[0] for r in rs), "rss_mib": statistics.median(r[1] for r in rs) / 2**20,
                        "cpu_s": statistics.median(r[2] for r in rs),
                        "walls": [round(r[0], 2) for r in rs], "rss_mibs": [round(r[1] / 2**20) for r in rs],
                        "output_mib": folder_bytes(outs[name]) / 2**20,
                        "shards": len(list(outs[name].glob("*.safetensors")))} for name, rs in runs.items()}
        load_after = os.getloadavg()[0]
        ident = compare(outs["mergekit-moe"], outs["zenith-merge"], models, args.layers)
        loads = load_check({k: outs[k] for k in ("mergekit-moe", "zenith-merge")}, vocab)
        donor_mib = folder_bytes(models[0]) / 2**20
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result = {"machine": machine(), "family": args.family, "dims": dims, "donor_mib": donor_mib, "build_s": build_s, "repeats": args.repeats,
              "commands": {k: " ".join(v) for k, v in cmds.items()}, "stats": stats, "identity": ident, "load": loads,
              "total_s": time.perf_counter() - t_start,
              "loadavg_1min": (load_before, load_after)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))

    mk = stats["mergekit-moe"]
    print(f"machine: {result['machine']}")
    dense_cls, moe_cls = FAMILIES[args.family]
    print(f"donors: 4 x {dense_cls}, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"vocab {vocab}, {donor_mib:.0f} MiB each (bf16); output {moe_cls}, 4 experts, top-2, "
          f"{stats['zenith-merge']['output_mib']:.0f} MiB; {args.repeats} interleaved repeats\n")
    print(f"1-minute load average before / after the timed runs: {load_before:.1f} / {load_after:.1f}\n")
    print("| tool | median wall s | wall vs mergekit-moe | median peak RSS MiB | RSS vs mergekit-moe | median CPU s "
          "| walls s | output shards |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, s in stats.items():
        print(f"| {name} | {s['wall_s']:.1f} | {s['wall_s'] / mk['wall_s']:.2f}x | {s['rss_mib']:.0f} | "
              f"{s['rss_mib'] / mk['rss_mib']:.2f}x | {s['cpu_s']:.1f} | {', '.join(f'{w:.1f}' for w in s['walls'])} "
              f"| {s['shards']} |")
    i = ident
    print(f"\nexpert tensors byte-identical between the tools: {i['expert_equal']}/{i['expert_tensors']} "
          f"(equal to the donors' MLPs: mergekit {i['expert_equal_source_mk']}, zenith {i['expert_equal_source_zen']})")
    for m in i["expert_mismatches"][:10]:
        print(f"  mismatch {m}")
    print(f"non-expert tensors byte-identical: {i['body_equal']}/{i['body_tensors']} (zenith equal to the base: "
          f"{i['body_equal_base']}); only in mergekit: {i['body_only_mk'] or 'none'}; only in zenith: "
          f"{i['body_only_zen'] or 'none'}")
    for n in i["body_mismatches"][:10]:
        print(f"  mismatch {n}")
    lo, med, hi = i["router_cos_summary"]
    print(f"router rows (shapes/dtypes {i['router_shapes']}): cosine(mergekit, zenith) min {lo:.3f}, median {med:.3f}, "
          f"max {hi:.3f}; per layer mean: {', '.join(f'{c:.2f}' for c in i['router_cos_per_layer'])}")
    for label in ("mergekit-moe", "zenith-merge"):
        L = loads[label]
        print(f"load {label}: {L['class']}, missing {L['missing'] or 'none'}, unexpected {L['unexpected'] or 'none'}, "
              f"mismatched {L['mismatched'] or 'none'}, logits {L['logits_shape']} finite {L['finite']}")
    print(f"forward on 16 random tokens: max |logit diff| {loads['logits_max_abs_diff']:.4f}, "
          f"argmax agreement {loads['argmax_agree']:.2f}")
    print(f"donor build {build_s:.0f} s, total {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
