"""The `zenith-merge` command: subcommands over the library. The only module that prints and exits.

Exit codes: 0 success, 1 a check failed (smoke test, update-config --check),
2 a user error (bad config, unreadable checkpoint, ...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ZenithError
from .plan.summary import format_expert_table, format_plan, format_union, human


def _load(config: str):
    from .config import load_config

    path = Path(config).resolve()
    return load_config(path), path.parent


def cmd_plan(args) -> int:
    from .plan.build import build_plan

    cfg, config_dir = _load(args.config)
    plan = build_plan(cfg, config_dir=config_dir, output_dir=args.output)
    if args.print_output_dir:
        print(plan.output_dir)
    else:
        print(plan.model_dump_json(indent=1) if args.json else format_plan(plan))
    return 0


def _quiet_transformers() -> None:
    """--no-progress also silences transformers' own progress bars (loading weights for the stages).

    Without importing transformers when it is not loaded yet (about a second): it reads
    huggingface_hub's switch when it is imported.
    """
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def cmd_merge(args) -> int:
    cfg, config_dir = _load(args.config)
    if args.no_progress:
        _quiet_transformers()
    return _merge(cfg, config_dir, args.output, dry_run=args.dry_run, resume=args.resume, overwrite=args.overwrite,
                  workers=args.workers, progress=not args.no_progress)


def _merge(cfg, config_dir: Path, output, *, dry_run: bool, progress: bool, **run) -> int:
    """Plan and print (dry run), or run the merge and say what was written."""
    from .pipeline import check_training_inputs, run_merge
    from .plan.build import build_plan

    if dry_run:
        plan = build_plan(cfg, config_dir=config_dir, output_dir=output)
        check_training_inputs(plan, cfg, config_dir)
        print(format_plan(plan))
        print("dry run: nothing written")
        return 0
    result = run_merge(cfg, config_dir=config_dir, output_dir=output, progress=progress, **run)
    w = result.write
    print(f"merged {len(result.plan.tensors)} tensors into {result.output_dir} "
          f"({result.plan.target_config['architectures'][0]}; {len(w.written)} shards written, {len(w.skipped)} "
          f"kept from an earlier run)")
    return 0


_MOE_OWN = ("--overwrite", "--resume", "--dry-run", "--no-progress")


def cmd_moe(args) -> int:
    """mergekit-moe's command line: CONFIG OUT_PATH and mergekit-moe 0.1.5's flags (config/mergekit_moe.py)."""
    from .config import parse_config
    from .config.load import read_yaml
    from .config.mergekit_moe import apply_flags, mergekit_refusals, parse_flags

    own = {f for f in args.flags if f in _MOE_OWN}
    given, notes = parse_flags([f for f in args.flags if f not in _MOE_OWN])
    if "-v" in given or "--verbose" in given:
        logging.getLogger().setLevel(logging.INFO)
    for note in notes:
        logging.getLogger("zenith_merge.moe").warning(note)
    if given.get("--device") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    path = Path(args.config).resolve()
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ZenithError(f"{path}: expected a mapping of keys at the top level")
    mergekit_refusals(data, allow_all_same="--i-understand-this-is-not-useful-without-training" in given)
    cfg = parse_config(apply_flags(data, given), where=str(path))
    quiet = "--no-progress" in own or given.get("--quiet") is True
    if quiet:
        _quiet_transformers()
    return _merge(cfg, path.parent, Path(args.out_path).resolve(), dry_run="--dry-run" in own, progress=not quiet,
                  resume="--resume" in own, overwrite="--overwrite" in own)


def cmd_align(args) -> int:
    from .pipeline import prepare_stages

    cfg, config_dir = _load(args.config)
    if args.no_progress:
        _quiet_transformers()
    plan = prepare_stages(cfg, config_dir=config_dir, output_dir=args.output, resume=not args.overwrite,
                          overwrite=args.overwrite,
                          progress=not args.no_progress)
    print("\n".join(format_expert_table(plan)))
    out = Path(plan.output_dir) / ".zenith"
    if plan.stages.usage:
        usage = json.loads((out / "usage.json").read_text())["sources"]
        for source, layers in usage.items():
            chosen = {(s.source_layer, s.expert) for le in plan.expert_table for s in le.slots if s.source == source}
            print(f"expert usage of {source} on its prompts (picks per expert; * kept):")
            for layer, stats in layers.items():
                cells = [f"{c}{'*' if (int(layer), e) in chosen else ''}" for e, c in enumerate(stats["counts"])]
                print(f"  L{layer:<3} " + " ".join(f"{c:>5}" for c in cells) + f"   ({stats['tokens']} tokens)")
    for source in plan.stages.align:
        info = json.loads((out / f"align-{source}" / "align.json").read_text())
        print(f"alignment {source}: {info['n_tokens']} paired tokens, ridge {info['ridge']}, "
              f"widths {info['d_base']} (base) / {info['d_donor']} ({source})")
        for kind in ("A", "B"):
            print(f"  R^2 {kind}: " + "  ".join(f"{k.split('.', 1)[1]}: {v:.3f}" for k, v in info["r2"][kind].items()))
    if plan.vocab is not None:
        from .vocab.token_map import TokenMap

        print("\n".join(format_union(plan, TokenMap.load(out / ".zenith").header)))
    if plan.stages.router_offsets:
        from .stages.router_offsets import load_offsets

        print("router offsets (selection bias added to each source's slots; hit / leak: share of top-k picks on "
              "its own / the other sources' prompts that land on its slots):")
        for layer, per in (load_offsets(out) or {}).items():
            print(f"  L{layer:<3} " + "  ".join(
                f"{s} {v['offset']:+.3f}: hit {v['hit_before']:.2f} -> {v['hit']:.2f}, "
                f"leak {v['leak_before']:.2f} -> {v['leak']:.2f}" for s, v in per.items()))
    for source in plan.stages.regmean:
        from safetensors import safe_open

        from .stages.regmean import grams_file

        with safe_open(str(grams_file(out, source)), framework="pt") as f:
            print(f"RegMean statistics of {source}: {len(f.keys())} Gram matrices for "
                  f"{len(plan.stages.regmean[source].tensors)} weights (input second moments on "
                  f"{', '.join(plan.stages.regmean[source].data)}; weights reading one input share one)")
    if not (plan.stages.usage or plan.stages.align or plan.vocab is not None or plan.stages.router_offsets
            or plan.stages.regmean):
        print("nothing to compute: no expert selection, alignment fit or union vocabulary in this plan")
    print(f"artefacts in {out}; `zenith-merge merge CONFIG --resume` reuses them")
    return 0


def cmd_search(args) -> int:
    import yaml

    from .plan.output import output_path
    from .search import check_searchable, run_search, search_table, write_search

    cfg, config_dir = _load(args.config)
    settings = check_searchable(cfg)
    out = Path(args.out).resolve() if args.out else output_path(cfg, config_dir, args.output).with_name(
        output_path(cfg, config_dir, args.output).name + "-search")
    if args.dry_run:
        n = len(set(settings.grid)) + settings.generations * settings.population
        print(f"search: {n} candidates at most (2 parents, {len(set(settings.grid))} uniform lambdas, "
              f"{settings.generations} rounds of {settings.population}), each scored on keep = "
              f"{', '.join(settings.keep)} and gain = {', '.join(settings.gain)}; allowed loss "
              f"{100 * settings.max_loss:g}%; classes: {', '.join(settings.classes or ['every class of the base'])}")
        print(f"would write {out}/search.md, search.json, search.png, best.yml\ndry run: nothing scored")
        return 0
    if args.no_progress:
        _quiet_transformers()
    result = run_search(cfg, config_dir=config_dir, progress=not args.no_progress, work_dir=out)
    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    paths = write_search(result, data, Path(args.config).resolve(), out)
    print(search_table(result))
    print(f"\nwritten: {paths['md']} (with {paths['png'].name}), {paths['json'].name}; the config with the chosen "
          f"weights: {paths['config']}")
    return 0


def cmd_routing(args) -> int:
    from .checks.routing_report import prompt_domains, routing_table, routing_usage, save_routing
    from .plan.models import Plan

    out = Path(args.output_dir)
    domains = prompt_domains(Plan.load(out))
    domains.update({name: [text] for name, text in _named_texts(args.text).items()})
    if not domains:
        raise ZenithError(f"{out}: the plan has no prompts to route; give texts with --text NAME=FILE")
    if args.no_progress:
        _quiet_transformers()
    report = routing_usage(out, domains, max_tokens=args.max_tokens, progress=not args.no_progress)
    if not report:
        print(f"{out}: no MoE layer, nothing to report")
        return 0
    json_path, png = save_routing(report, out)
    print("\n".join(routing_table(report)))
    print(f"written: {json_path}, {png}")
    return 0


def cmd_fp8_cast(args) -> int:
    from .fp8_cast import fp8_cast

    block = tuple(args.block) if args.block else None
    result = fp8_cast(args.input, args.output, to=args.to, block=block, resume=args.resume, overwrite=args.overwrite,
                      workers=args.workers, progress=not args.no_progress)
    print(f"cast {args.input} to {args.to} in {args.output}: {len(result.written)} shards written, "
          f"{len(result.skipped)} kept from an earlier run, {human(result.total_bytes)} of tensors")
    return 0


def cmd_tokenizer(args) -> int:
    from .pipeline import build_tokenizer, union_dir
    from .vocab.token_map import TokenMap

    cfg, config_dir = _load(args.config)
    plan = build_tokenizer(cfg, config_dir=config_dir, output_dir=args.output, overwrite=args.overwrite)
    zdir = Path(plan.output_dir) / ".zenith"
    print("\n".join(format_union(plan, TokenMap.load(zdir).header)))
    print(f"tokenizer files in {union_dir(Path(plan.output_dir))} (AutoTokenizer.from_pretrained loads them); "
          f"token map {zdir / 'token_map.json'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import ALL_DEMO_NAMES, ensure_demo

    if args.print_path:
        print(ensure_demo(args.print_path, progress=not args.no_progress))
        return 0
    for name in args.names or ALL_DEMO_NAMES:
        print(f"{name}: {ensure_demo(name, progress=not args.no_progress)}")
    return 0


def cmd_update_config(args) -> int:
    from .pipeline.output_config import patch_output

    drift = patch_output(Path(args.output_dir), check=args.check)
    for d in drift:
        print(("drift: " if args.check else "updated: ") + str(d))
    if args.check:
        print("config is up to date" if not drift else f"{len(drift)} differences")
        return 1 if drift else 0
    print(f"{len(drift)} keys updated" if drift else "config already up to date")
    return 0


def cmd_smoke_test(args) -> int:
    from .checks.smoke import command

    return command(args)


def cmd_chat(args) -> int:
    from .checks.chat import chat

    chat(args.output_dir, max_new_tokens=args.max_new_tokens, show_prompt=args.show_prompt)
    return 0


def cmd_umoe_demo(args) -> int:
    import json as _json

    from .umoe.demo import DemoSettings, format_demo, run_demo

    settings = DemoSettings(steps=args.steps, seed=args.seed)
    result = run_demo(settings, progress=not args.no_progress)
    print(format_demo(result))
    print(f"held-out: {result['heldout_bytes']} bytes of demo code; {settings.steps} steps of {settings.batch} x "
          f"{settings.seq_len} tokens, lr {settings.lr}, seed {settings.seed}, {settings.layers} layers")
    if args.json:
        Path(args.json).write_text(_json.dumps(result, indent=1))
    return 0


def _named_texts(items: list[str] | None) -> dict[str, str]:
    """`--text NAME=FILE` options as name -> the file's text."""
    texts = {}
    for item in items or []:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ZenithError(f"--text {item!r}: give NAME=FILE")
        try:
            texts[name] = Path(file).read_text(encoding="utf-8")
        except OSError as err:
            raise ZenithError(f"--text {name}: cannot read {file} ({err.strerror})") from None
    return texts


def _config_args(sp: argparse.ArgumentParser) -> None:
    """The arguments every config-driven subcommand takes: the config, and where its output goes."""
    sp.add_argument("config", help="merge config (YAML), e.g. merge/config.yml")
    sp.add_argument("--output", metavar="DIR", help="output folder (overrides the config's output_dir)")


def _mergekit_flags():
    from .config.mergekit_moe import FLAGS

    return FLAGS


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

    sp = sub.add_parser("moe", help="mergekit-moe's command line: CONFIG OUT_PATH [mergekit-moe flags]",
                        description="Run a mergekit-moe config as mergekit-moe 0.1.5 would be called: every one of "
                                    "its flags is accepted with its meaning here (honoured, or without effect and "
                                    "said so, or refused with the reason). zenith-merge's own: --overwrite, "
                                    "--resume, --dry-run, --no-progress.",
                        epilog="mergekit-moe flags: " + "; ".join(f"{' / '.join(f.names)}: {f.effect} ({f.why})"
                                                                  for f in _mergekit_flags()))
    sp.add_argument("config", help="a mergekit-moe config (YAML)")
    sp.add_argument("out_path", help="output folder")
    sp.add_argument("flags", nargs=argparse.REMAINDER, help="mergekit-moe's flags, and --overwrite, --resume, "
                                                            "--dry-run, --no-progress")
    sp.set_defaults(fn=cmd_moe)

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
    from .checks.smoke import add_arguments as smoke_arguments

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zenith-merge` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except ZenithError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
