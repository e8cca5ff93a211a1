"""Checks a model folder, reading only the written files, in bounded memory.

Each check is named, so a failure says which one (`manifest`, `finite`, ...). Structure first, from headers
and streamed weights (`smoke_checks`: never more than a slab of one tensor in memory), then a real load with
transformers within a memory cap and a short greedy generation (`smoke_model`). A check that does not apply
(no zenith-merge plan to compare with, a model that cannot run within the cap) is skipped with a note.

Works on any model folder: a merge (with `.zenith/plan.json`), an `fp8-cast` output or a plain Hugging Face
folder. Reports are written into a folder only when it is a merge; otherwise to `--report DIR`, or to a new
temporary folder that is named on the way out, so that a source model's folder is never written.

    report = run_smoke_test(folder, max_memory=2 * 2**30)
    print(format_report(report)); write_reports(report, report_dir=None)
    python -m zenith_merge.checks.smoke FOLDER [--no-generate] [--max-memory 2GB] [--report DIR] [--text NAME=FILE]

`add_arguments` and `command` are the command line (`zenith-merge smoke-test` without --max-memory and
--report takes its cap from $ZENITH_SMOKE_MAX_MEMORY, default 2 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZenithError
from .smoke_checks import (  # noqa: F401
    INDEX_FILE,
    MANIFEST_FILE,
    Skipped,
    check_config_tokenizer,
    check_finite,
    check_index,
    check_manifest,
    check_planned_tensors,
    check_special_tokens,
    check_tensor_names,
    expected_tensor_names,
    is_zenith_output,
)
from .smoke_model import (  # noqa: F401
    CHAT_PROMPTS,
    DEFAULT_MAX_MEMORY,
    DEFAULT_PROMPTS,
    MAX_MEMORY_ENV,
    SOURCE_LIMIT,
    chat_prompt,
    check_generation,
    check_loading,
    check_quality,
    check_thinking,
    default_max_memory,
    greedy,
    load_model,
    opens_thinking,
    parse_memory,
    plan_load,
    quality_texts,
)


@dataclass
class CheckResult:
    """One check's outcome: passed, failed or skipped (`ok` is True for a skipped check), with its detail."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False

    @property
    def status(self) -> str:
        """'pass', 'FAIL' or 'skip'."""
        return "skip" if self.skipped else "pass" if self.ok else "FAIL"


@dataclass
class SmokeReport:
    """Every check's result on one folder, the greedy samples and the bits per byte measured."""

    folder: Path
    checks: list[CheckResult] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> text -> bits per byte
    max_memory: int | None = None

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped ones included)."""
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """The names of the checks that failed."""
        return [c.name for c in self.checks if not c.ok]

    @property
    def skipped(self) -> list[str]:
        """The names of the checks that did not apply."""
        return [c.name for c in self.checks if c.skipped]


def run_smoke_test(folder: str | Path, *, generate: bool = True,
                   progress: Callable[[str], None] | None = None, texts: dict[str, str] | None = None,
                   max_memory: int | None = None) -> SmokeReport:
    """Run every check on `folder`; each failure is recorded under its check's name rather than raised, and a
    check that does not apply is recorded as skipped with its note. `texts` (name -> text) are what quality is
    measured on (default: see `quality_texts`); `max_memory` caps the model's weights in memory (default:
    `default_max_memory()`, 2 GiB): a larger model streams from disk, one that cannot run within it is
    skipped."""
    folder = Path(folder).resolve()
    cap = max_memory if max_memory is not None else default_max_memory()
    report = SmokeReport(folder, max_memory=cap)
    loaded: dict = {}  # the model, loaded once by the first check that needs it
    checks: list[tuple[str, Callable[[Path], object]]] = [
        ("index", check_index),
        ("manifest", check_manifest),
        ("planned-tensors", check_planned_tensors),
        ("tensor-names", check_tensor_names),
        ("finite", check_finite),
        ("config-tokenizer", check_config_tokenizer),
        ("special-tokens", check_special_tokens),
    ]
    if generate:
        checks.append(("loading", lambda f: check_loading(f, loaded, cap)))
        checks.append(("generate", lambda f: check_generation(f, loaded, max_memory=cap)))
        checks.append(("thinking", lambda f: check_thinking(f, loaded, cap)))
        checks.append(("quality", lambda f: check_quality(f, loaded, texts, report.quality, cap)))
    for name, fn in checks:
        if progress:
            progress(name)
        try:
            detail = fn(folder)
            if isinstance(detail, tuple):
                detail, report.samples = detail
            report.checks.append(CheckResult(name, True, str(detail)))
        except Skipped as note:
            report.checks.append(CheckResult(name, True, f"skipped: {note}", skipped=True))
        except Exception as err:  # a check's failure is data for the report, whatever raised it
            report.checks.append(CheckResult(name, False, str(err) if isinstance(err, ZenithError)
                                             else f"{type(err).__name__}: {err}"))
            if name == "index":  # nothing else can be trusted without a consistent index
                break
    loaded.clear()
    return report


def format_report(report: SmokeReport) -> str:
    """A short plain-text table of the checks."""
    width = max(len(c.name) for c in report.checks)
    lines = [f"smoke test: {report.folder}"]
    lines += [f"  {c.status.upper():<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    for prompt, text in report.samples.items():
        lines.append(f"  sample  {prompt!r} -> {text!r}")
    skipped = f" ({len(report.skipped)} skipped: {', '.join(report.skipped)})" if report.skipped else ""
    lines.append("  result: " + ("ok" if report.ok else "FAILED: " + ", ".join(report.failed)) + skipped)
    return "\n".join(lines)


REPORT_JSON, REPORT_MD = "report.json", "report.md"


def report_table(report: SmokeReport) -> list[str]:
    """Markdown: one row per check."""
    lines = ["| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c.name} | {'**FAIL**' if not c.ok else c.status} | {c.detail.replace('|', '/')} |"
              for c in report.checks]
    return lines


def report_dir_for(report: SmokeReport, report_dir: str | Path | None = None) -> Path:
    """Where the reports of `report` go: `report_dir` when given; the checked folder when it is a zenith-merge
    merge (it holds `.zenith/plan.json`); else a new temporary folder, so that a source model's folder, an
    `fp8-cast` output or any other folder is never written."""
    if report_dir is not None:
        out = Path(report_dir).resolve()
        if out == report.folder and not is_zenith_output(report.folder):
            raise ZenithError(f"--report {out}: the checked folder is not a zenith-merge merge; it is never "
                              f"written into (give another folder)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    if is_zenith_output(report.folder):
        return report.folder
    return Path(tempfile.mkdtemp(prefix=f"zenith-smoke-{report.folder.name}-"))


def write_reports(report: SmokeReport, report_dir: str | Path | None = None) -> tuple[Path, Path]:
    """`report.json` and `report.md` (the checks, the samples, the routing report with its heatmap) in
    `report_dir_for(report, report_dir)`, and the smoke-test table in the model card (README.md) when that is
    the checked folder itself (a merge). Returns the two paths."""
    from ..io.manifest import changing, write_json_atomic, write_text_atomic

    folder = report.folder
    out = report_dir_for(report, report_dir)
    routing = _routing(folder)
    data = {"folder": str(folder), "ok": report.ok, "failed": report.failed, "skipped": report.skipped,
            "max_memory": report.max_memory,
            "checks": [{"name": c.name, "ok": c.ok, "skipped": c.skipped, "detail": c.detail}
                       for c in report.checks],
            "samples": report.samples, "quality_bits_per_byte": report.quality, "routing": routing}
    result = "ok" if report.ok else "FAILED: " + ", ".join(report.failed)
    md = [f"# Smoke test of {folder.name}", "", f"**{result}**", "", *report_table(report), ""]
    if report.samples:
        md += ["## Greedy samples", "", *[f"- `{p!r}` -> `{t!r}`" for p, t in report.samples.items()], ""]
    if report.quality:
        names = list(next(iter(report.quality.values())))
        md += ["## Quality (bits per byte, lower is better)", "", "| model | " + " | ".join(names) + " |",
               "| --- | " + " | ".join("---:" for _ in names) + " |",
               *[f"| {m} | " + " | ".join(f"{q[n]:.4f}" for n in names) + " |"
                 for m, q in report.quality.items()], ""]
    if routing:
        from .routing_report import ROUTING_PNG, routing_table

        image = f".zenith/{ROUTING_PNG}" if out == folder else str(folder / ".zenith" / ROUTING_PNG)
        md += ["## Routing", "", *routing_table(routing), "", f"![routing]({image})", ""]
    # a merge's own folder stays complete (its manifest records the new files' sha256s) or incomplete
    with changing(folder) if out == folder else contextlib.nullcontext():
        write_json_atomic(out / REPORT_JSON, data)
        write_text_atomic(out / REPORT_MD, "\n".join(md))
        if out == folder:
            _update_model_card(folder, report, routing)
    return out / REPORT_JSON, out / REPORT_MD


def _routing(folder: Path) -> dict | None:
    from .routing_report import load_routing

    try:
        return load_routing(folder)
    except (OSError, ValueError):
        return None


def _update_model_card(folder: Path, report: SmokeReport, routing: dict | None) -> None:
    from ..plan.models import Plan
    from .model_card import write_model_card

    if not is_zenith_output(folder):
        return
    plan = Plan.load(folder)
    token_map = None
    if plan.vocab is not None:
        from ..vocab.token_map import token_map_header

        token_map = token_map_header(folder / ".zenith")
    write_model_card(plan, folder, token_map, routing, smoke=report_table(report))


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The smoke-test options, for `zenith-merge smoke-test` and `python -m zenith_merge.checks.smoke`."""
    parser.add_argument("output_dir", help="a model folder: a zenith-merge merge, an fp8-cast output or any "
                                           "Hugging Face folder (only a merge is ever written into)")
    parser.add_argument("--no-generate", action="store_true", help="skip loading the model and generating")
    parser.add_argument("--text", action="append", metavar="NAME=FILE",
                        help="held-out text to measure bits per byte on, for the model and each source "
                             "small enough to load (repeatable; default for demo sources: the demo's "
                             "held-out code and maths)")
    parser.add_argument("--max-memory", type=parse_memory, metavar="SIZE",
                        help=f"memory for the model's weights (e.g. 2GB; default ${MAX_MEMORY_ENV} or "
                             f"{DEFAULT_MAX_MEMORY / 2**30:g} GiB): larger models stream from disk, and "
                             f"the checks that run the model are skipped with a note when it cannot run "
                             f"within it")
    parser.add_argument("--report", metavar="DIR", type=Path,
                        help="write report.json / report.md here (default: into a merge's own folder; for "
                             "any other folder a new temporary folder, printed)")
    parser.add_argument("--no-report", action="store_true",
                        help="write no report.json / report.md (nor the model card's smoke-test table)")


def command(args: argparse.Namespace) -> int:
    """Run the smoke test as `add_arguments` parsed it: print the table, write the reports; 0 when it passed,
    1 when a check failed."""
    texts = {}
    for item in args.text or []:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ZenithError(f"--text {item!r}: give NAME=FILE")
        try:
            texts[name] = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ZenithError(f"--text {name}: cannot read {file} ({getattr(err, 'strerror', None) or err})") from None
    report = run_smoke_test(args.output_dir, generate=not args.no_generate, texts=texts or None,
                            max_memory=getattr(args, "max_memory", None),
                            progress=lambda name: print(f"[smoke] {name} ...", file=sys.stderr))
    print(format_report(report))
    if not args.no_report:
        json_path, md_path = write_reports(report, getattr(args, "report", None))
        print(f"  report: {md_path} ({json_path.name})")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m zenith_merge.checks.smoke FOLDER ...`: the smoke test with every option (exit 2 on a usage error).
    """
    parser = argparse.ArgumentParser(prog="python -m zenith_merge.checks.smoke",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command(args)
    except ZenithError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
