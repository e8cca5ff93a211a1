"""Checks a finished output folder, reading only the written files.

Each check is named, so a failure says which one (`manifest`, `finite`, ...).
Structure first (cheap, streamed tensor by tensor), then a real load with
transformers and a short greedy generation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ZenithError

INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = ".zenith/manifest.json"
DEFAULT_PROMPTS = ("def fibonacci(n):", "Question: what is 12 + 7?")


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class SmokeReport:
    folder: Path
    checks: list[CheckResult] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> text -> bits per byte

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def check_index(folder: Path) -> str:
    """The index names existing shards, and each shard holds exactly the tensors the index gives it."""
    from .io.safetensors_format import read_header

    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ZenithError(f"{INDEX_FILE} is missing")
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    by_file: dict[str, set[str]] = {}
    for tensor, file in weight_map.items():
        by_file.setdefault(file, set()).add(tensor)
    for file, names in sorted(by_file.items()):
        if not (folder / file).is_file():
            raise ZenithError(f"shard {file} named in the index is missing")
        in_file = set(read_header(folder / file).tensors)
        if in_file != names:
            extra, missing = sorted(in_file - names), sorted(names - in_file)
            raise ZenithError(f"{file}: tensors not in the index {extra[:3]}, in the index but absent {missing[:3]}")
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in by_file)
    if stray:
        raise ZenithError(f"shards not named in the index: {stray}")
    return f"{len(weight_map)} tensors in {len(by_file)} shards"


def check_manifest(folder: Path) -> str:
    """Every shard's sha256 equals the one recorded when it was written."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ZenithError(f"{MANIFEST_FILE} is missing")
    shards = json.loads(path.read_text())["shards"]
    for name, entry in sorted(shards.items()):
        if _sha256(folder / name) != entry["sha256"]:
            raise ZenithError(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    return f"{len(shards)} shards verified"


def check_planned_tensors(folder: Path) -> str:
    """Every tensor of the plan is present with the planned shape and dtype, and nothing else."""
    from .io.reader import Checkpoint
    from .plan import Plan

    plan = Plan.load(folder)
    with Checkpoint.open(folder) as ckpt:
        names = set(ckpt.names())
        names |= {f"{n}_scale_inv" for n in names if ckpt.is_fp8(n)}  # block-FP8 scales, as written
        planned = {t.name: t for t in plan.tensors}
        if names != set(planned):
            raise ZenithError(f"missing {sorted(set(planned) - names)[:3]}, unplanned {sorted(names - set(planned))[:3]}")
        for name, t in planned.items():
            info = ckpt.stored_info(name)
            if (info.dtype, tuple(info.shape)) != (t.dtype, tuple(t.shape)):
                raise ZenithError(f"{name}: {info.dtype}{list(info.shape)}, planned {t.dtype}{list(t.shape)}")
    return f"{len(planned)} tensors as planned"


def check_finite(folder: Path) -> str:
    """No NaN or Inf in any tensor (streamed: one tensor in memory at a time)."""
    import torch

    from .io.reader import Checkpoint

    with Checkpoint.open(folder) as ckpt:
        for name in ckpt.names():
            t = ckpt.read(name)
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                raise ZenithError(f"{name} has NaN or Inf values")
        return f"{len(ckpt)} tensors finite"


def check_config_tokenizer(folder: Path) -> str:
    """config.json, the tokenizer and generation_config.json agree on vocabulary size and special-token ids."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) > config.vocab_size:
        raise ZenithError(f"tokenizer has {len(tok)} tokens but config.json vocab_size is {config.vocab_size}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cid, tid = getattr(config, key, None), getattr(tok, key, None)
        if tid is not None and cid is not None and cid != tid and not (isinstance(cid, list) and tid in cid):
            raise ZenithError(f"config.json {key}={cid} but the tokenizer's is {tid}")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        bad = [e for e in eos if not 0 <= e < config.vocab_size]
        if bad:
            raise ZenithError(f"generation_config.json eos_token_id {bad} outside the vocabulary")
    return f"vocab {config.vocab_size}, tokenizer {len(tok)}"


def check_special_tokens(folder: Path) -> str:
    """Every special token the tokenizer files name (bos, eos, pad, unk, extra) is a token of tokenizer.json."""
    files = [f for f in ("tokenizer_config.json", "special_tokens_map.json") if (folder / f).is_file()]
    if not (folder / "tokenizer.json").is_file():
        raise ZenithError("tokenizer.json is missing")
    data = json.loads((folder / "tokenizer.json").read_text())
    known = set((data.get("model") or {}).get("vocab") or {}) | {a["content"] for a in data.get("added_tokens", [])}
    named: dict[str, str] = {}
    for f in files:
        config = json.loads((folder / f).read_text())
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                named[value] = f"{f} {key}"
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for value in config.get(key) or []:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    named[value] = f"{f} {key}"
    missing = [f"{tok!r} ({where})" for tok, where in named.items() if tok not in known]
    if missing:
        raise ZenithError(f"special token {missing[0]} is not in tokenizer.json"
                          + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    return f"{len(named)} special tokens present"


def load_model(folder: Path, *, max_memory: int | None = None):
    """The merged model and tokenizer as a user loads them (AutoModelForCausalLM, no custom code), with
    transformers' own account of missing, unexpected and mis-shaped weights.

    Small models load on the CPU. With a GPU, or when the weights exceed `max_memory` (default: half
    this machine's RAM), accelerate places them (`device_map="auto"`) and offloads what does not fit
    to a temporary folder, removed with the model.
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration import block_fp8_loaded_as_read
    from .system import physical_memory

    folder = Path(folder)
    fp8 = bool(json.loads((folder / "config.json").read_text()).get("quantization_config"))
    # without a GPU, block FP8 is dequantised to bfloat16 (as our reader does it): the rest of the model must match it
    kwargs = {"dtype": torch.bfloat16 if fp8 else torch.float32, "output_loading_info": True}
    # bytes once loaded, about: float32 doubles bfloat16 weights (FP8 ones become bfloat16)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 2
    cap = max_memory if max_memory is not None else (physical_memory() or 2**62) // 2
    if torch.cuda.is_available() or size > cap:
        offload = tempfile.TemporaryDirectory(prefix="zenith-smoke-offload-")
        kwargs.update(device_map="auto", offload_folder=offload.name,
                      max_memory=None if torch.cuda.is_available() and max_memory is None else {"cpu": cap})
    else:
        offload = None
    with block_fp8_loaded_as_read(folder):
        model, info = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if offload is not None:
        model._zenith_offload = offload  # the folder lives as long as the model
    return model.eval(), AutoTokenizer.from_pretrained(folder), info


def check_loading(folder: Path, loaded: dict) -> str:
    """transformers builds the model the config describes and finds each of its weights, with its shape."""
    model, _, info = _model(folder, loaded)
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "not used by the model"),
                      ("mismatched_keys", "of the wrong shape")):
        bad = sorted(str(k) for k in info.get(key) or [])
        if bad:
            raise ZenithError(f"{len(bad)} weights {what}: {', '.join(bad[:3])}" + (" ..." if len(bad) > 3 else ""))
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.1f}M parameters, every weight found"


CHAT_PROMPTS = ("/think What is 17 + 25?", "/no_think What is 17 + 25?")
SOURCE_LIMIT = 2 * 2**30  # sources up to this size on disk are loaded for comparison (thinking, quality)


def _model(folder: Path, loaded: dict):
    if "model" not in loaded:
        loaded["model"] = load_model(folder)
    return loaded["model"]


def chat_prompt(tok, message: str) -> str | None:
    """`message` as one user turn through the tokenizer's chat template, ready for the reply (None: no template)."""
    if not tok.chat_template:
        return None
    return tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)


def greedy(model, tok, text: str, max_new_tokens: int, *, special: bool) -> list[int]:
    """The ids `model` generates greedily after `text` (its logits checked finite first)."""
    import torch

    ids = tok(text, return_tensors="pt", add_special_tokens=special)
    with torch.no_grad():
        logits = model(**ids).logits
        if not bool(torch.isfinite(logits).all()):
            raise ZenithError(f"non-finite logits for prompt {text!r}")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def check_generation(folder: Path, loaded: dict, prompts=DEFAULT_PROMPTS, max_new_tokens: int = 16) -> tuple[str, dict[str, str]]:
    """The loaded model generates greedily with finite logits, on plain prompts (code, maths) and, through
    the chat template, on a /think and a /no_think prompt; no output is one token repeated."""
    model, tok, _ = _model(folder, loaded)
    runs = [(p, p, True) for p in prompts]
    runs += [(f"chat: {m}", text, False) for m in CHAT_PROMPTS if (text := chat_prompt(tok, m)) is not None]
    samples = {}
    for label, text, special in runs:
        new = greedy(model, tok, text, max_new_tokens, special=special)
        if not new:
            raise ZenithError(f"generated nothing for prompt {label!r}")
        if len(new) >= 4 and len(set(new)) == 1:
            raise ZenithError(f"degenerate output for prompt {label!r}: token {new[0]} "
                              f"({tok.decode(new[:1])!r}) {len(new)} times")
        samples[label] = tok.decode(new, skip_special_tokens=False)
    return f"{len(runs)} prompts, {sum(map(len, samples.values()))} characters generated", samples


def opens_thinking(model, tok, message: str = CHAT_PROMPTS[0]) -> bool | None:
    """Whether a reply to `message` opens a <think> block: in the rendered prompt or as its first
    generated text (None: no chat template)."""
    text = chat_prompt(tok, message)
    if text is None:
        return None
    if text.rstrip().endswith("<think>"):
        return True
    return tok.decode(greedy(model, tok, text, 8, special=False), skip_special_tokens=False).lstrip().startswith("<think>")


def check_thinking(folder: Path, loaded: dict) -> str:
    """Where a source opens <think> for a /think prompt, the merge does too (sources up to SOURCE_LIMIT)."""
    model, tok, _ = _model(folder, loaded)
    merged = opens_thinking(model, tok)
    if merged is None:
        return "no chat template: nothing to check"
    seen = {"merge": merged}
    for key, path in _small_sources(folder).items():
        source_model, source_tok, _ = load_model(path)
        seen[key] = opens_thinking(source_model, source_tok)
        del source_model
    missing = [k for k, v in seen.items() if v and not merged]
    summary = ", ".join(f"{k} {'yes' if v else 'no' if v is not None else 'no template'}" for k, v in seen.items())
    if missing:
        raise ZenithError(f"/think opens <think> in {', '.join(missing)} but not in the merge ({summary})")
    return f"/think opens <think>: {summary}"


def quality_texts(folder: Path, texts: dict[str, str] | None) -> dict[str, str]:
    """The texts quality is measured on: those given, else the demo's held-out code and maths when every
    source is a demo model (their held-out split: never trained or calibrated on)."""
    from .plan import PLAN_FILE, Plan

    if texts:
        return dict(texts)
    if not (folder / PLAN_FILE).is_file():
        return {}
    if not all(s.ref.startswith("demo://") for s in Plan.load(folder).sources.values()):
        return {}
    from .demo import heldout_text

    return {"code (demo held-out)": heldout_text("code"), "maths (demo held-out)": heldout_text("maths")}


def check_quality(folder: Path, loaded: dict, texts: dict[str, str] | None, report: SmokeReport) -> str:
    """Bits per byte of the merge and of each source small enough to load, on each text (measured, not judged)."""
    from .demo import bits_per_byte

    texts = quality_texts(folder, texts)
    if not texts:
        return "no text to measure on (give --text NAME=FILE)"
    model, tok, _ = _model(folder, loaded)
    report.quality["merge"] = {name: bits_per_byte(model, tok, t) for name, t in texts.items()}
    for key, path in _small_sources(folder).items():
        source_model, source_tok, _ = load_model(path)
        report.quality[key] = {name: bits_per_byte(source_model, source_tok, t) for name, t in texts.items()}
        del source_model
    return "; ".join(f"{m}: " + ", ".join(f"{n.split(' ')[0]} {v:.3f}" for n, v in q.items())
                     for m, q in report.quality.items()) + " bits per byte"


def _small_sources(folder: Path) -> dict[str, Path]:
    """The plan's sources small enough to load beside the merge, by key."""
    from .plan import PLAN_FILE, Plan

    if not (folder / PLAN_FILE).is_file():
        return {}
    out = {}
    for key, src in Plan.load(folder).sources.items():
        path = Path(src.path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else SOURCE_LIMIT + 1
        if size <= SOURCE_LIMIT:
            out[key] = path
    return out


def run_smoke_test(folder: str | Path, *, generate: bool = True, progress: Callable[[str], None] | None = None,
                   texts: dict[str, str] | None = None) -> SmokeReport:
    """Run every check on `folder`; each failure is recorded under its check's name rather than raised.
    `texts` (name -> text) are what quality is measured on (default: see `quality_texts`)."""
    folder = Path(folder).resolve()
    report = SmokeReport(folder)
    loaded: dict = {}  # the model, loaded once by the first check that needs it
    checks: list[tuple[str, Callable[[Path], object]]] = [
        ("index", check_index),
        ("manifest", check_manifest),
        ("planned-tensors", check_planned_tensors),
        ("finite", check_finite),
        ("config-tokenizer", check_config_tokenizer),
        ("special-tokens", check_special_tokens),
    ]
    if generate:
        checks.append(("loading", lambda f: check_loading(f, loaded)))
        checks.append(("generate", lambda f: check_generation(f, loaded)))
        checks.append(("thinking", lambda f: check_thinking(f, loaded)))
        checks.append(("quality", lambda f: check_quality(f, loaded, texts, report)))
    for name, fn in checks:
        if progress:
            progress(name)
        try:
            detail = fn(folder)
            if isinstance(detail, tuple):
                detail, report.samples = detail
            report.checks.append(CheckResult(name, True, str(detail)))
        except Exception as err:  # a check's failure is data for the report, whatever raised it
            report.checks.append(CheckResult(name, False, f"{type(err).__name__}: {err}" if not isinstance(err, ZenithError) else str(err)))
            if name == "index":  # nothing else can be trusted without a consistent index
                break
    return report


def format_report(report: SmokeReport) -> str:
    """A short plain-text table of the checks."""
    width = max(len(c.name) for c in report.checks)
    lines = [f"smoke test: {report.folder}"]
    lines += [f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    for prompt, text in report.samples.items():
        lines.append(f"  sample  {prompt!r} -> {text!r}")
    lines.append("  result: " + ("ok" if report.ok else "FAILED: " + ", ".join(report.failed)))
    return "\n".join(lines)




REPORT_JSON, REPORT_MD = "report.json", "report.md"


def report_table(report: SmokeReport) -> list[str]:
    """Markdown: one row per check."""
    lines = ["| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c.name} | {'pass' if c.ok else '**FAIL**'} | {c.detail.replace('|', '/')} |" for c in report.checks]
    return lines


def write_reports(report: SmokeReport) -> tuple[Path, Path]:
    """`report.json` and `report.md` in the checked folder (the checks, the samples, the routing report with its
    heatmap), and the smoke-test table in the model card (README.md) when the folder holds a zenith-merge plan."""
    from .io.manifest import write_json_atomic, write_text_atomic

    folder = report.folder
    routing = _routing(folder)
    data = {"folder": str(folder), "ok": report.ok, "failed": report.failed,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
            "samples": report.samples, "quality_bits_per_byte": report.quality, "routing": routing}
    write_json_atomic(folder / REPORT_JSON, data)
    md = [f"# Smoke test of {folder.name}", "", f"**{'ok' if report.ok else 'FAILED: ' + ', '.join(report.failed)}**",
          "", *report_table(report), ""]
    if report.samples:
        md += ["## Greedy samples", "", *[f"- `{p!r}` -> `{t!r}`" for p, t in report.samples.items()], ""]
    if report.quality:
        names = list(next(iter(report.quality.values())))
        md += ["## Quality (bits per byte, lower is better)", "", "| model | " + " | ".join(names) + " |",
               "| --- | " + " | ".join("---:" for _ in names) + " |",
               *[f"| {m} | " + " | ".join(f"{q[n]:.4f}" for n in names) + " |" for m, q in report.quality.items()], ""]
    if routing:
        from .routing_report import ROUTING_PNG, routing_table

        md += ["## Routing", "", *routing_table(routing), "", f"![routing](.zenith/{ROUTING_PNG})", ""]
    write_text_atomic(folder / REPORT_MD, "\n".join(md))
    _update_model_card(folder, report, routing)
    return folder / REPORT_JSON, folder / REPORT_MD


def _routing(folder: Path) -> dict | None:
    from .routing_report import load_routing

    try:
        return load_routing(folder)
    except (OSError, ValueError):
        return None


def _update_model_card(folder: Path, report: SmokeReport, routing: dict | None) -> None:
    from .model_card import write_model_card
    from .plan import PLAN_FILE, Plan

    if not (folder / PLAN_FILE).is_file():
        return
    plan = Plan.load(folder)
    token_map = None
    if plan.vocab is not None:
        from .vocab.token_map import token_map_header

        token_map = token_map_header(folder / ".zenith")
    write_model_card(plan, folder, token_map, routing, smoke=report_table(report))
