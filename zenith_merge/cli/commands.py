"""The subcommands' bodies: each reads its arguments, calls the library and prints; `parser.py` wires them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import ZenithError
from ..io.manifest import changing
from ..plan.summary import format_expert_table, format_plan, format_union, human


def _load(config: str):
    from ..config import load_config

    path = Path(config).resolve()
    return load_config(path), path.parent


def cmd_plan(args) -> int:
    from ..plan.build import build_plan

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
    from ..pipeline import check_training_inputs, run_merge
    from ..plan.build import build_plan

    if dry_run:
        from ..pipeline.stage_runs import warn_if_memory_short

        plan = build_plan(cfg, config_dir=config_dir, output_dir=output)
        check_training_inputs(plan, cfg, config_dir)
        warn_if_memory_short(plan)
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
    return _mergekit_command(args, "moe")


def cmd_yaml(args) -> int:
    """mergekit-yaml's command line: CONFIG OUT_PATH and mergekit-yaml 0.1.5's flags (config/mergekit_yaml.py)."""
    return _mergekit_command(args, "yaml")


def _mergekit_command(args, command: str) -> int:
    from ..config import parse_config
    from ..config.load import read_yaml
    from ..config.mergekit_moe import apply_flags, mergekit_refusals, parse_flags
    from ..config.mergekit_yaml import is_mergekit_yaml

    own = {f for f in args.flags if f in _MOE_OWN}
    given, notes = parse_flags([f for f in args.flags if f not in _MOE_OWN], command)
    if "-v" in given or "--verbose" in given:
        logging.getLogger().setLevel(logging.INFO)
    for note in notes:
        logging.getLogger(f"zenith_merge.{command}").warning(note)
    if given.get("--device") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    path = Path(args.config).resolve()
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ZenithError(f"{path}: expected a mapping of keys at the top level")
    if command == "moe":
        mergekit_refusals(data, allow_all_same="--i-understand-this-is-not-useful-without-training" in given)
    elif not is_mergekit_yaml(data):
        raise ZenithError(f"{path}: not a mergekit-yaml config (it has no models: list"
                          f"{'; experts: is a mergekit-moe or zenith config: zenith-merge moe or merge' if 'experts' in data else ''})")
    cfg = parse_config(apply_flags(data, given), where=str(path))
    quiet = "--no-progress" in own or given.get("--quiet") is True
    if quiet:
        _quiet_transformers()
    return _merge(cfg, path.parent, Path(args.out_path).resolve(), dry_run="--dry-run" in own, progress=not quiet,
                  resume="--resume" in own, overwrite="--overwrite" in own)


def cmd_align(args) -> int:
    from ..pipeline import prepare_stages

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
        from ..vocab.token_map import TokenMap

        print("\n".join(format_union(plan, TokenMap.load(out / ".zenith").header)))
    if plan.stages.router_offsets:
        from ..stages.router_offsets import load_offsets

        print("router offsets (selection bias added to each source's slots; hit / leak: share of top-k picks on "
              "its own / the other sources' prompts that land on its slots):")
        for layer, per in (load_offsets(out) or {}).items():
            print(f"  L{layer:<3} " + "  ".join(
                f"{s} {v['offset']:+.3f}: hit {v['hit_before']:.2f} -> {v['hit']:.2f}, "
                f"leak {v['leak_before']:.2f} -> {v['leak']:.2f}" for s, v in per.items()))
    for source in plan.stages.regmean:
        from safetensors import safe_open

        from ..stages.regmean import grams_file

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

    from ..plan.output import output_path
    from ..search import check_searchable, run_search, search_table, write_search

    cfg, config_dir = _load(args.config)
    settings = check_searchable(cfg)
    out = Path(args.out).resolve() if args.out else output_path(cfg, config_dir, args.output).with_name(
        output_path(cfg, config_dir, args.output).name + "-search")
    if args.dry_run and settings.parameters:
        from ..search import parameter_grid

        print(f"search: {len(parameter_grid(settings))} candidates (every combination of "
              f"{', '.join(f'{k} in {v}' for k, v in sorted(settings.parameters.items()))}), each scored on keep = "
              f"{', '.join(settings.keep)} and gain = {', '.join(settings.gain)}; allowed loss "
              f"{100 * settings.max_loss:g}%")
        print(f"would write {out}/search.md, search.json, search.png, best.yml\ndry run: nothing scored")
        return 0
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
    from ..checks.routing_report import prompt_domains, routing_table, routing_usage, save_routing
    from ..plan.models import Plan

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
    with changing(out):
        json_path, png = save_routing(report, out)
    print("\n".join(routing_table(report)))
    print(f"written: {json_path}, {png}")
    return 0


def cmd_fp8_cast(args) -> int:
    from ..fp8_cast import fp8_cast

    block = tuple(args.block) if args.block else None
    result = fp8_cast(args.input, args.output, to=args.to, block=block, resume=args.resume, overwrite=args.overwrite,
                      workers=args.workers, progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite)
    print(f"cast {args.input} to {args.to} in {args.output}: {len(result.written)} shards written, "
          f"{len(result.skipped)} kept from an earlier run, {human(result.total_bytes)} of tensors")
    return 0


def cmd_tokenizer(args) -> int:
    from ..pipeline import build_tokenizer, union_dir
    from ..vocab.token_map import TokenMap

    cfg, config_dir = _load(args.config)
    plan = build_tokenizer(cfg, config_dir=config_dir, output_dir=args.output, overwrite=args.overwrite)
    zdir = Path(plan.output_dir) / ".zenith"
    print("\n".join(format_union(plan, TokenMap.load(zdir).header)))
    print(f"tokenizer files in {union_dir(Path(plan.output_dir))} (AutoTokenizer.from_pretrained loads them); "
          f"token map {zdir / 'token_map.json'}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import ALL_DEMO_NAMES, ensure_demo

    if args.print_path:
        print(ensure_demo(args.print_path, progress=not args.no_progress))
        return 0
    for name in args.names or ALL_DEMO_NAMES:
        print(f"{name}: {ensure_demo(name, progress=not args.no_progress)}")
    return 0


def cmd_update_config(args) -> int:
    from ..pipeline.output_config import patch_output

    with contextlib.nullcontext() if args.check else changing(Path(args.output_dir)):
        drift = patch_output(Path(args.output_dir), check=args.check)
    for d in drift:
        print(("drift: " if args.check else "updated: ") + str(d))
    if args.check:
        print("config is up to date" if not drift else f"{len(drift)} differences")
        return 1 if drift else 0
    print(f"{len(drift)} keys updated" if drift else "config already up to date")
    return 0


def cmd_smoke_test(args) -> int:
    from ..checks.smoke import command

    return command(args)


def cmd_chat(args) -> int:
    from ..checks.chat import chat

    chat(args.output_dir, max_new_tokens=args.max_new_tokens, show_prompt=args.show_prompt)
    return 0


def cmd_umoe_demo(args) -> int:
    import json as _json

    from ..umoe_demo import DemoSettings, format_demo, run_demo

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
