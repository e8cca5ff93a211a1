"""The output's model card (README.md): what was merged, how, and how the vocabulary maps to the sources.

Hugging Face metadata front matter first (base_model, tags, library_name), as mergekit's
cards have it, then the sources, the vocabulary (for a union: sizes, added specials, how
rows were made, and where the token map is) and the config that produced the merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..io.manifest import write_text_atomic


def _vocabulary(plan, token_map: dict[str, Any] | None) -> list[str]:
    if plan.vocab is None or token_map is None:
        return ["## Vocabulary", "", "The base model's tokenizer, unchanged: token ids are the base's.", ""]
    vp = plan.vocab
    rows, specials = token_map["rows"], token_map["appended_specials"]
    names = {key: plan.sources[key].ref for key in ("base", *vp.donors)}
    how = {"base": "copied from the base", "slerp": f"SLERP of the base row and the mapped donor row, t={vp.slerp_t}"}
    if token_map["donor_merges"]:
        encoding = (f"Donor subwords are BPE tokens produced by {token_map['merges_added']} donor merges ranked "
                    f"after the base's; {len(token_map['merges_dropped'])} were left out because they changed how "
                    f"protected text splits. Base text can tokenize differently from the base.")
    else:
        encoding = ("The encoder is the base's (same normaliser, pre-tokenizer and merges): any text without the "
                    "donors' added tokens tokenizes to exactly the base's ids. Donor subwords are in the "
                    "vocabulary, so the model can emit them and they decode, but encoding never produces them.")
    lines = ["## Vocabulary", "",
             f"A union of the base's tokenizer and {', '.join(names[k] for k in vp.donors)}'s: "
             f"{token_map['size']} tokens (ids 0-{token_map['base_size'] - 1} are the base's, unchanged; "
             f"{token_map['appended']} donor tokens follow), embedding and lm_head padded to {vp.padded_size} rows.",
             encoding,
             f"Special tokens added: {', '.join(f'`{s}`' for s in specials) or 'none'}.", "",
             "| rows | tokens | made as |", "|---|---:|---|"]
    for rule, n in rows.items():
        kind, _, donor = rule.partition(":")
        what = how.get(kind, f"transferred from {names.get(rule, rule)} (mapped, norm matched to the base's)")
        lines.append(f"| `{rule}` | {n} | {what if kind != 'slerp' else how['slerp'] + f' ({names[donor]})'} |")
    lines += ["", "`.zenith/token_map.safetensors` maps every union id to its id in each source (`base`, "
              + ", ".join(f"`{k}` = {names[k]}" for k in vp.donors) + ") and how its rows were made; `.zenith/token_map.json` describes it.", ""]
    return lines


def _files(plan) -> list[str]:
    """The side files beside the weights and where each came from (the plan's `side_files`)."""
    if not plan.side_files:
        return []
    from ..plan.models import UNION_SIDE_FILES
    from ..plan.sources import side_file_kind

    def origin(key: str) -> str:
        if key == UNION_SIDE_FILES:
            return "the union tokenizer (`zenith-merge tokenizer` stage)"
        return f"{key} (`{plan.sources[key].ref}`)" if key in plan.sources else key

    lines = ["## Files", "", "Beside the weights, each a byte-for-byte copy of its origin's (config.json is written "
             "from the plan's target config):", "",
             "| file | what | from |", "|---|---|---|"]
    lines += [f"| `{name}` | {side_file_kind(name)} | {origin(key)} |" for name, key in sorted(plan.side_files.items())]
    return [*lines, ""]


def _plan_summary(plan) -> list[str]:
    from ..plan.summary import format_expert_table, human

    e = plan.estimates
    lines = ["## Plan", "", f"Method `{plan.method_name}`: {e.tensor_count} tensors, {human(e.total_bytes)} in "
             f"{len(plan.shards)} shards (`.zenith/plan.json` has every tensor's recipe).", ""]
    table = format_expert_table(plan)
    return lines + (["```", *table, "```", ""] if table else [])


def _routing(routing: dict[str, Any] | None) -> list[str]:
    if not routing:
        return []
    from .routing_report import ROUTING_PNG, routing_table

    return ["## Routing", "",
            f"How the merged routers split the top-{routing['top_k']} picks between the sources, per MoE layer and "
            "text (`.zenith/routing.json`); \"slots\" is each source's share of the experts, what uniform "
            "routing would give.", "", *routing_table(routing), "", f"![routing](.zenith/{ROUTING_PNG})", ""]


def model_card(plan, token_map: dict[str, Any] | None = None, routing: dict[str, Any] | None = None,
               smoke: list[str] | None = None) -> str:
    """The README.md text of a merged folder."""
    base = plan.sources["base"]
    front = {"base_model": base.ref, "tags": ["merge", "zenith-merge", "moe"], "library_name": "transformers"}
    arch = (plan.target_config.get("architectures") or ["?"])[0]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(plan.output_dir).name}", "",
             f"A `{arch}` checkpoint merged with zenith-merge (method `{plan.method_name}`, plan `{plan.plan_id[:12]}`).",
             "", "## Sources", "",
             "Fingerprint: sha256 over each source's config, index, safetensors headers, file sizes and a fixed "
             "sample of each shard's data (what the plan was made from; `zenith-merge merge --resume` refuses a "
             "changed or swapped source).", "",
             "| key | model | architecture | fingerprint (sha256) |", "|---|---|---|---|"]
    lines += [f"| {key} | {s.ref} | {s.architecture} | `{s.fingerprint}` |" for key, s in plan.sources.items()]
    smoke_lines = ["## Smoke test", "", "`zenith-merge smoke-test` on this folder (report.md has the samples):", "",
                   *smoke, ""] if smoke else []
    lines += ["", *_plan_summary(plan), *_vocabulary(plan, token_map), *_files(plan), *_routing(routing), *smoke_lines,
              "## Configuration", "", "```yaml",
              yaml.safe_dump(plan.config, sort_keys=False, allow_unicode=True).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(plan, out_dir: Path, token_map: dict[str, Any] | None = None,
                     routing: dict[str, Any] | None = None, smoke: list[str] | None = None) -> Path:
    """Write `<out>/README.md` atomically."""
    path = Path(out_dir) / "README.md"
    write_text_atomic(path, model_card(plan, token_map, routing, smoke))
    return path
