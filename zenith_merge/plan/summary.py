"""Readable summaries of a plan: sources, output layout, expert table, union vocabulary.

The command line prints them; the model card quotes them.
"""

from __future__ import annotations

import math


def human(n: int) -> str:
    """A byte count in binary units (1.5 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n}"


def format_plan(plan) -> str:
    """A readable summary of a plan: sources, output, shards and estimates."""
    e = plan.estimates
    lines = [f"plan {plan.plan_id[:12]}  method: {plan.method_name}", "sources:"]
    lines += [f"  {key:<8} {s.architecture:<24} {s.ref}  ({s.path})" for key, s in plan.sources.items()]
    t = plan.target_config
    lines += [
        f"output: {plan.output_dir}",
        f"  architecture {t.get('architectures', ['?'])[0]}, dtype {t.get('dtype') or t.get('torch_dtype')}, "
        f"vocab {t.get('vocab_size')}, layers {t.get('num_hidden_layers')}",
        f"  tensors {e.tensor_count}, {human(e.total_bytes)} in {len(plan.shards)} shards:",
    ]
    lines += [f"    {s.filename}  {len(s.tensors):>6} tensors  {human(s.nbytes):>11}" for s in plan.shards[:8]]
    if len(plan.shards) > 8:
        lines.append(f"    ... {len(plan.shards) - 8} more")
    lines += [
        f"  largest tensor {e.largest_tensor} ({human(e.largest_tensor_bytes)})",
        f"  estimated peak memory {human(e.peak_memory_bytes)}, disk {human(e.total_bytes)}",
    ]
    if e.stage_memory_bytes:
        lines.append(f"  stages (forward passes) hold about {human(e.stage_memory_bytes)}; "
                     f"calibration_max_memory caps it")
    if plan.vocab is not None:
        v = plan.vocab
        lines.append(f"tokenizer: union of base + {', '.join(v.donors)}: {v.size} tokens ({v.appended} appended), "
                     f"embedding rows {v.padded_size}; shared tokens SLERPed at t={v.slerp_t}; donor rows "
                     + ", ".join(f"{k} {m}" for k, m in v.maps.items())
                     + (f"; forced: {', '.join(t for t, r in v.tokens.items() if r.force)}"
                        if any(r.force for r in v.tokens.values()) else ""))
        if v.donor_merges:
            lines.append("  encoding: the base's merges, then the donors' (donor_merges: true): base text can "
                         "tokenize differently from the base" + (" outside the protected text" if v.protect else ""))
        else:
            lines.append("  encoding: the base's (same normaliser, pre-tokenizer, merges): text tokenizes to the "
                         "base's ids unless it contains the added tokens below")
        if v.plain_text_added:
            shown = ", ".join(v.plain_text_added[:12]) + (" ..." if len(v.plain_text_added) > 12 else "")
            lines.append(f"  donor added tokens that are plain text to the base ({len(v.plain_text_added)}): {shown}; "
                         f"text containing them tokenizes differently from the base")
        for donor, n in v.subwords_left_out.items():
            lines.append(f"  {donor}: {n} subwords not appended (the base's BPE would reach them without a merge); "
                         f"their text encodes through the base's tokens")
    lines += _format_extra_layers(plan)
    lines += _format_fp8(plan)
    lines += format_expert_table(plan)
    if plan.method in ("assembly", "method"):
        lines.append(f"{plan.method_name} (tensors per recipe):")
        counts: dict[str, int] = {}
        for t in plan.tensors:
            what = recipe_label(t.recipe)
            counts[what] = counts.get(what, 0) + 1
        lines += [f"  {n:>6}  {what}" for what, n in sorted(counts.items())]
        for key, st in plan.stages.regmean.items():
            passes = (f"; {st.passes} passes within max_memory {human(st.max_memory)}" if st.max_memory is not None
                      else "; one pass")
            lines.append(f"  stage RegMean statistics: {key}, {st.matrices} input Gram matrices for {len(st.tensors)} "
                         f"weights on {', '.join(st.data)} (at most {st.max_tokens} tokens{passes}, "
                         f"{human(st.sum_bytes)} of sums at once)")
    return "\n".join(lines)


def recipe_label(r) -> str:
    """A short description of how one output tensor is made, for counting tensors per recipe.

    Covers every kind in `plan.Recipe` (copy, expert, router, assemble, vocab, fp8_scale, zeros); a kind this
    function does not know yet is shown by its name rather than failing.
    """
    kind = getattr(r, "kind", type(r).__name__)
    if kind == "copy":
        return f"copied from {r.source}" + (" (zero-padded)" if r.pad else "")
    if kind == "assemble":
        return (f"{r.tensor_class}{' (RegMean)' if r.regmean else ''}: "
                + " + ".join(f"{w:g} {k}" for k, w in zip(r.sources, r.weights)))
    if kind == "method":
        base = f" (method base: {r.sources[r.base]})" if r.base is not None else ""
        scope = (", statistics over the layer's experts (expert_scope layer)" if r.fused else
                 ", expert by expert" if r.expert_axis is not None else "")
        return f"{r.tensor_class}: {r.method} of {', '.join(r.sources)}{base}, in {r.merge_dtype}{scope}"
    if kind == "expert":
        return f"routed expert {r.proj} (expert table)"
    if kind == "router":
        return f"router {r.part} (expert table)"
    if kind == "vocab":
        return f"union vocabulary {'embedding' if r.part == 'embed' else 'lm_head'}"
    if kind == "fp8_scale":
        return "block scales (fp8_output)"
    if kind == "mla":
        return f"{r.part} of the dense attention as MLA (maths/mla.py)"
    if kind == "zeros":
        return "zeros (the output architecture has it, the dense base not)"
    return str(kind)


def _format_fp8(plan) -> list[str]:
    """fp8_output: how many output weights become block FP8, and their float32 scale tensors."""
    scales = [t for t in plan.tensors if getattr(t.recipe, "kind", None) == "fp8_scale"]
    fp8 = [t for t in plan.tensors if t.dtype == "F8_E4M3"]
    if not scales and not fp8 and not plan.config.get("fp8_output"):
        return []
    q = plan.target_config.get("quantization_config") or {}
    block = "x".join(map(str, q.get("weight_block_size") or ())) or "?"
    vias = sorted({t.recipe.via for t in scales})
    fp8_bytes = sum(math.prod(t.shape) for t in fp8)
    scale_bytes = sum(4 * math.prod(t.shape) for t in scales)
    return [f"fp8_output: {len(fp8)} of {len(plan.tensors)} tensors written as F8_E4M3 ({human(fp8_bytes)}), "
            f"{len(scales)} block scales (fp8_output) beside them: float32 weight_scale_inv, one per {block} "
            f"block ({human(scale_bytes)})",
            f"  each weight rounded to {', '.join(vias) or '?'} before quantising (amax / 448 per block); "
            f"config.json gets quantization_config {q.get('quant_method', '?')} {q.get('fmt', '?')}; "
            f"the other tensors as planned"]


def _slot_range(slots) -> str:
    """A run of slots from one source as `donor1 L2 e0-e5` (or `top 4 by usage`, `MLP`)."""
    s = slots[0]
    where = f"{s.source} L{s.source_layer}"
    if s.kind != "routed":
        return f"{where} {'MLP' if s.kind == 'dense_mlp' else 'shared expert'}"
    if s.expert is None:
        return f"{where} top {len(slots)} by usage"
    ids = [x.expert for x in slots]
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{where} e{ids[0]}-e{ids[-1]}" if len(ids) > 1 else f"{where} e{ids[0]}"
    return f"{where} e" + ",".join(map(str, ids))


def _format_extra_layers(plan) -> list[str]:
    """A line per extra layer of the output (DeepSeek-V3's MTP modules): where its tensors come from."""
    from ..architectures import ARCHITECTURES, classify, extra_layer_indices

    arch = ARCHITECTURES.get(plan.target_config.get("architectures", [None])[0])
    if arch is None or arch.extra_layers is None:
        return []
    names = [t.name for t in plan.tensors]
    lines = []
    for layer in extra_layer_indices(arch, plan.target_config, names):
        recipes = [t.recipe for t in plan.tensors if (tid := classify(arch, t.name)) is not None and tid.layer == layer]
        sources: dict[str, int] = {}
        for r in recipes:
            what = (f"from {r.source}" if r.kind == "copy" else "assembled" if r.kind == "assemble"
                    else "block scales" if r.kind == "fp8_scale" else "union vocabulary" if r.kind == "vocab"
                    else "expert table")
            sources[what] = sources.get(what, 0) + 1
        line = (f"{arch.extra_layers.kind.upper()} layer {layer} ({arch.extra_layers.count_key}): {len(recipes)} tensors: "
                + ", ".join(f"{n} {what}" for what, n in sources.items()))
        row = next((le for le in plan.expert_table if le.layer == layer), None)
        if row is not None and row.like is not None:
            line += f"; its experts follow MoE layer {row.like}'s table (grafted slots, maps and router rows alike)"
        lines.append(line)
    return lines


def format_expert_table(plan) -> list[str]:
    """The plan's layer map and expert table: for each output MoE layer, which source fills which slots."""
    if not plan.expert_table:
        return []
    t = plan.target_config
    lines = ["experts:"]
    for key, tr in plan.transforms.items():
        how = {"none": "the base's own", "identity": "same width, copied", "fit": "mapped by fitted A/B"}[tr.align]
        lines.append(f"  {key:<8} {how}; routing {tr.routing['scoring']} top-{tr.routing['top_k']}"
                     f"{' normalised' if tr.routing['norm_topk_prob'] else ''}")
    groups = f", {t['n_group']} groups, top-{t['topk_group']} groups" if "n_group" in t else ""
    lines.append(f"  per MoE layer: {len(plan.expert_table[0].slots)} experts, top-k "
                 f"{t.get('num_experts_per_tok')}{groups}")
    for le in plan.expert_table:
        runs, start = [], 0
        for j in range(1, len(le.slots) + 1):
            if j == len(le.slots) or (le.slots[j].source, le.slots[j].kind) != (le.slots[start].source,
                                                                                le.slots[start].kind):
                scale = le.slots[start].scale
                runs.append(f"[{start}-{j - 1}] {_slot_range(le.slots[start:j])}"
                            + (f" x{scale:.3g}" if scale not in (None, 1.0) else ""))
                start = j
        if le.shared is not None:
            gate = "always on" if le.shared_gate == "ungated" else "gated"
            scale = f" x{le.shared.scale:.3g}" if le.shared.scale not in (None, 1.0) else ""
            runs.append(f"[shared] {_slot_range((le.shared,))}{scale} ({gate})")
        elif le.shared_gate == "ungated":
            runs.append("[shared] zeros (no shared_experts)")
        lines.append(f"  layer {le.layer:>3}: " + "  ".join(runs))
    stages = plan.stages
    if stages.usage:
        lines.append("  stage usage: " + ", ".join(f"{k} layers {list(v)}" for k, v in stages.usage.items()))
    if stages.align:
        lines.append("  stage align: " + ", ".join(f"{k} pairs {list(v)}" for k, v in stages.align.items()))
    if stages.router_offsets:
        lines.append("  stage router offsets: " + ", ".join(stages.router_offsets))
    if stages.train_routers:
        r = plan.config["router"]
        lines.append(f"  router training after writing: {stages.train_routers} steps, {r['train']} rows, lr {r['lr']}, "
                     f"rewrites {', '.join(plan.retrained_shards)}")
        if stages.train_maps:
            a = plan.config["align"]
            lines.append(f"  maps A, B of {', '.join(stages.train_maps)} train with the routers, lr {a['lr']}"
                         + (f"; the donor teaches on {', '.join(a['teacher_data'])} (weight {a['teacher_weight']})"
                            if a["teacher_data"] else ""))
    return lines


def format_union(plan, token_map: dict) -> list[str]:
    """A readable summary of a built union vocabulary (the token map's header): sizes, merges, specials, rows, maps."""
    vp = plan.vocab
    rows, specials = token_map["rows"], token_map["appended_specials"]
    plain = [t for t in token_map["appended_added"]]
    if token_map["donor_merges"]:
        dropped = token_map["merges_dropped"]
        merges = (f"  donor merges (opt-in): {token_map['merges_added']} added after the base's, {len(dropped)} left "
                  f"out to keep protected text exact" + (f" ({', '.join(map(repr, dropped[:8]))}"
                                                         f"{' ...' if len(dropped) > 8 else ''})" if dropped else ""))
    else:
        merges = ("  encoding: the base's (no donor merges): every text without the added tokens below tokenizes "
                  "to the base's ids")
    lines = [f"union tokenizer: {token_map['size']} tokens ({token_map['base_size']} base ids kept, "
             f"{token_map['appended']} appended from {', '.join(token_map['donors'])}), embedding rows "
             f"{vp.padded_size}", merges,
             f"  special tokens added: {', '.join(specials) or 'none'}",
             f"  added tokens that are plain text to the base ({len(plain)}): "
             + (", ".join(plain[:12]) + (" ..." if len(plain) > 12 else "") if plain else "none"),
             "  rows: " + ", ".join(f"{n} {rule}" for rule, n in rows.items()) + f" (slerp_t {vp.slerp_t})"]
    lines += [f"  forced: {tok!r} from {rule.source}" for tok, rule in vp.tokens.items() if rule.force]
    for donor, parts in token_map["maps"].items():
        lines.append(f"  {donor} rows into the base's space: " + ", ".join(
            f"{part} {m['mode']}" + (f" (R^2 {m['r2']:.3f} over {m['shared_tokens']} shared tokens)"
                                     if m["r2"] is not None else "") for part, m in parts.items()))
    return lines
