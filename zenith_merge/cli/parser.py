"""The argument parser of `zenith-merge`: every subcommand, its arguments and its --help."""

from __future__ import annotations

import argparse

from .commands import (
    cmd_align,
    cmd_chat,
    cmd_demo,
    cmd_fp8_cast,
    cmd_merge,
    cmd_moe,
    cmd_plan,
    cmd_routing,
    cmd_search,
    cmd_smoke_test,
    cmd_tokenizer,
    cmd_umoe_demo,
    cmd_update_config,
    cmd_yaml,
)


def _config_args(sp: argparse.ArgumentParser) -> None:
    """The arguments every config-driven subcommand takes: the config, and where its output goes."""
    sp.add_argument("config", help="merge config (YAML), e.g. merge/config.yml")
    sp.add_argument("--output", metavar="DIR", help="output folder (overrides the config's output_dir)")


def _mergekit_flags(command: str):
    from ..config.mergekit_moe import flags_of

    return flags_of(command)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with a --help on every subcommand."""
    p = argparse.ArgumentParser(
        prog="zenith-merge",
        description="Fuse pretrained Mixture-of-Experts checkpoints into one standard MoE checkpoint.",
        epilog="Start with: zenith-merge plan merge/config.yml   (shows the whole job before anything heavy runs)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("plan", help="show the output layout, memory and disk needs; reads no weights",
                        description="Plan a merge from CONFIG and print it: sources, output tensors, shards, "
                                    "largest tensor, estimated peak memory and disk. Reads configs and "
                                    "safetensors headers only.")
    _config_args(sp)
    sp.add_argument("--json", action="store_true", help="print the full plan as JSON")
    sp.add_argument("--print-output-dir", action="store_true", help="print only the resolved output folder")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("merge", help="run a merge: plan, write shards, copy tokenizer, write config",
                        description="Run the merge CONFIG describes. Shards are written atomically and recorded "
                                    "in <output>/.zenith/manifest.json; an interrupted run continues with --resume.")
    _config_args(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="keep shards a previous run of the same plan finished")
    g.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    sp.add_argument("--workers", type=int, metavar="N", help="shards written in parallel (overrides the config)")
    sp.add_argument("--dry-run", action="store_true", help="plan and print, write nothing")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_merge)

    for command, what, fn in (("moe", "mergekit-moe config", cmd_moe), ("yaml", "mergekit-yaml config", cmd_yaml)):
        tool = f"mergekit-{command}"
        sp = sub.add_parser(command, help=f"{tool}'s command line: CONFIG OUT_PATH [{tool} flags]",
                            description=f"Run a {what} as {tool} 0.1.5 would be called: every one of its flags is "
                                        f"accepted with its meaning here (honoured, or without effect and said so, "
                                        f"or refused with the reason). zenith-merge's own: --overwrite, --resume, "
                                        f"--dry-run, --no-progress."
                                        + (" Methods: linear, task_arithmetic, ties, dare_linear, dare_ties, "
                                           "breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, "
                                           "model_stock, passthrough, and regmean (zenith's); routed experts are "
                                           "merged slot by slot" if command == "yaml" else ""),
                            epilog=f"{tool} flags: " + "; ".join(f"{' / '.join(f.names)}: {f.effect} ({f.why})"
                                                                 for f in _mergekit_flags(command)))
        sp.add_argument("config", help=f"a {what} (YAML)")
        sp.add_argument("out_path", help="output folder")
        sp.add_argument("flags", nargs=argparse.REMAINDER, help=f"{tool}'s flags, and --overwrite, --resume, "
                                                                f"--dry-run, --no-progress")
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("align", help="run the merge's stages only: expert usage, A/B alignment fits, tokenizer, "
                                      "RegMean statistics",
                        description="Compute what the merge needs before writing: expert usage on each source's "
                                    "prompts (for experts[].keep), the hidden-space maps A and B (ridge least "
                                    "squares on calibration text, where widths differ), the union tokenizer "
                                    "(tokenizer.source: union) and each parent's input Gram matrices "
                                    "(assembly.regmean), into <output>/.zenith/. "
                                    "Prints the expert table and each fit's R^2. A later `merge --resume` reuses them.")
    _config_args(sp)
    sp.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_align)

    sp = sub.add_parser("tokenizer", help="build the union tokenizer only: files, token map, embedding row maps",
                        description="Build the union vocabulary CONFIG asks for (tokenizer.source: union): the "
                                    "base's tokenizer plus the experts' tokens it lacks, with the chat template's "
                                    "thinking switches, into <output>/.zenith/tokenizer/, and the token map "
                                    "(<output>/.zenith/token_map.json and token_map.safetensors: union id -> source "
                                    "ids and how each row is made). Its encoder is the base's: text without the "
                                    "donors' added tokens tokenizes to the base's ids. Prints a summary. `merge` runs this too, and `merge --resume` reuses it.")
    _config_args(sp)
    sp.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    sp.set_defaults(fn=cmd_tokenizer)

    sp = sub.add_parser("search", help="search per-class assembly weights of two parents on calibration text",
                        description="For a merge_method: assembly config with two experts[] entries: sweep one "
                                    "lambda (the second parent's share) over every tensor class, then refine a "
                                    "lambda per class by a small seeded evolutionary search. Each candidate is "
                                    "assembled in memory by the merge's own code and scored in bits per byte on "
                                    "search.keep text (may lose at most search.max_loss) and search.gain text "
                                    "(gap closed toward the second parent). Writes search.md, search.json, "
                                    "search.png and best.yml (the config with the chosen weights). Small models "
                                    "only: every candidate is held in memory.")
    _config_args(sp)
    sp.add_argument("--out", metavar="DIR", help="where the results go (default: the output folder's name + -search)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be searched, score nothing")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_search)

    sp = sub.add_parser("routing", help="how a merged folder routes: each source's share of top-k picks per layer",
                        description="Run the merged model in OUTPUT_DIR on texts (each source's prompts from the "
                                    "plan, plus --text NAME=FILE) and report, per MoE layer and text, the share "
                                    "of top-k picks and of routing weight that lands on each source's experts. "
                                    "Writes .zenith/routing.json and .zenith/routing.png (a heatmap). `merge` "
                                    "writes this report too, over the prompts and the calibration text.")
    sp.add_argument("output_dir", help="a zenith-merge output folder")
    sp.add_argument("--text", action="append", metavar="NAME=FILE", help="one more text to route (repeatable)")
    sp.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="tokens routed per text (2048)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_routing)

    sp = sub.add_parser("fp8-cast", help="convert a checkpoint between block FP8 and BF16, one tensor at a time",
                        description="Dequantise a block-FP8 checkpoint (DeepSeek-V3's float8_e4m3fn weights with a "
                                    "weight_scale_inv per 128x128 block) to BF16, or quantise a BF16 one to block "
                                    "FP8 (--to fp8: attention, MLP and expert projections; norms, routers, "
                                    "embeddings and head unchanged). Memory stays at about one tensor; shards are "
                                    "written atomically and --resume continues an interrupted cast. The config's "
                                    "quantization_config is dropped (bf16) or set (fp8); tokenizer and generation "
                                    "files are copied. The input is never modified.")
    sp.add_argument("input", help="the checkpoint folder to convert")
    sp.add_argument("output", help="the new folder")
    sp.add_argument("--to", choices=("bf16", "fp8"), default="bf16", help="target format (default bf16)")
    sp.add_argument("--block", type=int, nargs=2, metavar=("ROWS", "COLS"),
                    help="FP8 block size for --to fp8 (default 128 128, DeepSeek-V3's)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="keep shards an interrupted cast finished")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier output in that folder")
    sp.add_argument("--workers", type=int, default=1, metavar="N", help="shards written in parallel")
    sp.add_argument("--allow-nonfinite", action="store_true",
                    help="write tensors holding NaN/Inf (by default the cast stops, naming the tensor)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_fp8_cast)

    sp = sub.add_parser("demo", help="build the embedded demo models (cached; trained on first use)",
                        description="Build the small trained demo models (zen-tiny, zen-r1-tiny, qwen3-moe-tiny) "
                                    "deterministically into the cache ($ZENITH_CACHE or ~/.cache/zenith-merge), "
                                    "and the Zen children in block FP8 (zen-tiny-fp8, zen-r1-tiny-fp8).")
    sp.add_argument("names", nargs="*", help="demo models to build (default: all)")
    sp.add_argument("--print-path", metavar="NAME", help="print NAME's cached folder, building it first if needed")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("update-config", help="patch a merged folder's config from its plan and tokenizer",
                        description="Bring OUTPUT_DIR/config.json and generation_config.json in line with the "
                                    "plan (architecture, expert counts, top-k, groups, vocab size, dtype) and "
                                    "the tokenizer (special-token ids). Idempotent.")
    sp.add_argument("output_dir", help="a zenith-merge output folder")
    sp.add_argument("--check", action="store_true", help="report drift without writing; exit 1 if any")
    sp.set_defaults(fn=cmd_update_config)

    sp = sub.add_parser("smoke-test", help="check a merged folder: structure, hashes, values, load and generate",
                        description="Check OUTPUT_DIR: index and shards agree, manifest sha256s verify, tensors "
                                    "as planned, named as the architecture describes (MTP layers included) and "
                                    "finite (streamed tensor by tensor), config and tokenizer agree, the model "
                                    "loads with transformers and generates within --max-memory (larger models "
                                    "stream their weights from disk). Works on any Hugging Face folder; only a "
                                    "zenith-merge output is written into. Exits 1 naming the failed check.")
    from ..checks.smoke import add_arguments as smoke_arguments

    smoke_arguments(sp)
    sp.set_defaults(fn=cmd_smoke_test)

    sp = sub.add_parser("umoe-demo", help="train a tiny UMoE and a parameter-matched MoE on demo code, compare",
                        description="Train a tiny UMoE language model (attention and FFN experts from one shared "
                                    "pool) and a standard MoE with the same number of parameters on the demo code "
                                    "corpus, for the same steps on CPU, and print both models' held-out bits per "
                                    "byte. Builds the demo tokenizer first if needed.")
    sp.add_argument("--steps", type=int, default=300, metavar="N", help="training steps of each model (300)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_umoe_demo)

    sp = sub.add_parser("chat", help="talk to a merged model through its chat template (/think, /no_think work)",
                        description="A chat loop with the model in OUTPUT_DIR: each line is a user message, "
                                    "rendered with the chat template (a /think or /no_think in it switches the "
                                    "thinking block); greedy replies. An empty line or end of input ends it.")
    sp.add_argument("output_dir", help="a merged model folder")
    sp.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="reply length limit (128)")
    sp.add_argument("--show-prompt", action="store_true", help="print each rendered prompt")
    sp.set_defaults(fn=cmd_chat)
    return p
