"""Fuzz the parsers that take hostile bytes (issue 22) for as long as asked, and count what breaks them.

    .venv/bin/python bench/fuzz.py --minutes 30                    # every target, 30 minutes each, in turn
    .venv/bin/python bench/fuzz.py --target header --minutes 10    # header | config | json | all
    .venv/bin/python bench/fuzz.py --target config --minutes 1 --out /tmp/fuzz --time-limit 5

The strategies and checks are tests/test_fuzz_parsers.py's (`TARGETS`): safetensors headers for
`read_header`, YAML configs for `read_yaml` + `load_config`, source JSON files for `read_json_file`.
Here they run under hypothesis without derandomisation or shrinking, in batches of fresh runs (so that
hypothesis's memory of past inputs stays small), until the wall clock runs out.

Every input is written to <out>/<target>/work/input.<ext> and parsed in-process. It counts as a crash
when the parser raises anything but a `ZenithError` (exception), runs past --time-limit seconds (hang,
SIGALRM), allocates more than --memory-limit-mb at its peak (tracemalloc) or raises the process's peak
RSS by as much (memory), or kills the process (died: a C-level hang past 3x the time limit, ended by
faulthandler, or the OOM killer; the worker is restarted and the run goes on). A refusal that does not
name the file, or an accepted input that breaks the parser's promise (a non-finite number in a loaded
config, ...), counts as a violation. Each crash or violation is kept, up to --keep per distinct
signature, as <out>/<target>/crashes/<kind>-<signature hash>-<input hash>.<ext> with a .txt beside it
(signature, traceback, message). Soft concerns (multi-line messages, lone surrogates accepted, ...) are
counted and a few examples kept under <out>/<target>/concerns/.

"slowest input s" is the whole check of one input: for config, read_yaml and load_config together (each
call has its own time limit). The peak RSS reported is the whole worker's: torch and hypothesis (about
300 MiB) and the generation of the inputs (up to 4 MiB each, built in memory) included.

Prints a markdown table (target, minutes, inputs tried, crashes by kind, violations, peak RSS) and the
distinct signatures, and writes both to <out>/summary.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = ("header", "config", "json")


class _Stop(BaseException):
    """The wall clock ran out (a BaseException: hypothesis lets it through without replaying anything)."""


def _signature(kind: str, err: BaseException) -> str:
    """What tells one bug from another: the exception type and where it was raised (in zenith_merge, and
    in the library below it for a plain exception)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "zenith_merge" in f.filename and not f.name.startswith("<")]
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
    if kind in ("memory", "hang") and not ours:
        return f"{kind}: in {str(err).split(':')[0]}"
    if kind == "violation":
        return f"violation: {re.sub(r'[0-9]+', 'N', str(err).split(chr(10))[0])[:90]}"
    if kind == "exception" and frames and not isinstance(err, (RecursionError, MemoryError)):
        inner = frames[-1]
        where += f" <- {Path(inner.filename).name}:{inner.lineno} {inner.name}"
    return f"{kind}: {type(err).__name__} at {where}"


class Stats:
    def __init__(self, folder: Path, suffix: str, keep: int):
        self.folder, self.suffix, self.keep = folder, suffix, keep
        self.tried, self.slowest_s = 0, 0.0
        self.kinds: dict[str, int] = {}
        self.signatures: dict[str, dict] = {}
        self.concerns: dict[str, int] = {}

    def crash(self, kind: str, sig: str, blob: bytes, report: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        entry = self.signatures.setdefault(sig, {"kind": kind, "count": 0, "examples": [], "message": ""})
        entry["count"] += 1
        if len(entry["examples"]) < self.keep:
            crashes = self.folder / "crashes"
            crashes.mkdir(parents=True, exist_ok=True)
            stem = f"{kind}-{hashlib.sha1(sig.encode()).hexdigest()[:8]}-{hashlib.sha1(blob).hexdigest()[:10]}"
            (crashes / f"{stem}{self.suffix}").write_bytes(blob)
            (crashes / f"{stem}.txt").write_text(f"{sig}\n{len(blob)} bytes\n\n{report}", errors="backslashreplace")
            entry["examples"].append(str(crashes / f"{stem}{self.suffix}"))
            entry["message"] = entry["message"] or report.strip().split("\n")[-1][:300]

    def concern(self, what: str, blob: bytes) -> None:
        self.concerns[what] = self.concerns.get(what, 0) + 1
        if self.concerns[what] <= 3:
            folder = self.folder / "concerns"
            folder.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")
            (folder / f"{name}-{self.concerns[what]}{self.suffix}").write_bytes(blob)

    def dump(self, path: Path) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tried": self.tried, "kinds": self.kinds, "signatures": self.signatures,
                                   "concerns": self.concerns, "peak_rss_mb": peak, "slowest_s": self.slowest_s}))
        os.replace(tmp, path)


def _worker(args: argparse.Namespace) -> None:
    """Fuzz one target in this process until `args.seconds` have passed; stats go to <out>/<target>/."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz_parsers as fz
    from hypothesis import HealthCheck, Phase, given, settings

    target = fz.TARGETS[args.worker]
    folder = Path(args.out) / target.name
    work = folder / "work" / f"input{target.suffix}"
    work.parent.mkdir(parents=True, exist_ok=True)
    stats = Stats(folder, target.suffix, args.keep)
    stats_file = folder / f"stats-{os.getpid()}.json"
    limits = fz.Limits(time_s=args.time_limit, memory_mb=args.memory_limit_mb)
    vm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("VmSize:"))
    cap = vm_kb * 1024 + args.max_memory_mb * 2**20  # address space: what is mapped now, plus the headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    faulthandler.enable()
    if target.trace:  # once for the worker: see tests/test_fuzz_parsers.py `_call`
        tracemalloc.start()
    deadline = time.monotonic() + args.seconds
    last_dump = time.monotonic()

    @settings(max_examples=args.batch, deadline=None, derandomize=False, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(blob=target.inputs)
    def one(blob: bytes) -> None:
        nonlocal last_dump
        now = time.monotonic()
        if now >= deadline:
            raise _Stop
        if now - last_dump > 1:
            stats.dump(stats_file)
            last_dump = now
        work.write_bytes(blob)
        stats.tried += 1
        faulthandler.dump_traceback_later(3 * args.time_limit + 10, exit=True)
        start = time.perf_counter()
        try:
            concerns = target.check(work, limits)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - every way out but a ZenithError is a finding
            kind = ("hang" if isinstance(err, fz.Hang) else "memory" if isinstance(err, fz.MemoryBlowup)
                    else "violation" if isinstance(err, fz.Violation) else "exception")
            report = "".join(traceback.format_exception(type(err), err, err.__traceback__)[-12:])
            stats.crash(kind, _signature(kind, err), blob, report)
        else:
            for what in set(concerns):
                stats.concern(what, blob)
        finally:
            faulthandler.cancel_dump_traceback_later()
            stats.slowest_s = max(stats.slowest_s, time.perf_counter() - start)

    try:
        while time.monotonic() < deadline:
            one()
    except _Stop:
        pass
    stats.dump(stats_file)


def _run_target(name: str, args: argparse.Namespace) -> dict:
    """Fuzz `name` for args.minutes, restarting the worker whenever an input kills it."""
    folder = Path(args.out) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    end = time.monotonic() + 60 * args.minutes
    total = {"tried": 0, "kinds": {}, "signatures": {}, "concerns": {}, "peak_rss_mb": 0.0, "slowest_s": 0.0}
    start = time.monotonic()
    while (left := end - time.monotonic()) > 1:
        cmd = [sys.executable, __file__, "--worker", name, "--seconds", f"{left:.1f}", "--out", str(args.out),
               "--time-limit", str(args.time_limit), "--memory-limit-mb", str(args.memory_limit_mb),
               "--max-memory-mb", str(args.max_memory_mb), "--batch", str(args.batch), "--keep", str(args.keep)]
        log = folder / "worker.log"
        with open(log, "ab") as err:
            proc = subprocess.Popen(cmd, stdout=err, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        total["peak_rss_mb"] = max(total["peak_rss_mb"], usage.ru_maxrss / 1024)
        stats = {}
        if (f := folder / f"stats-{proc.pid}.json").is_file():
            stats = json.loads(f.read_text())
        total["tried"] += stats.get("tried", 0)
        total["slowest_s"] = max(total["slowest_s"], stats.get("slowest_s", 0.0))
        for key in ("kinds", "concerns"):
            for k, n in stats.get(key, {}).items():
                total[key][k] = total[key].get(k, 0) + n
        for sig, entry in stats.get("signatures", {}).items():
            mine = total["signatures"].setdefault(sig, {**entry, "count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"] += entry["examples"]
        if proc.returncode != 0:  # the input being parsed killed the worker
            work = next((folder / "work").glob("input.*"), folder / "work" / "input.bin")
            blob = work.read_bytes() if work.is_file() else b""
            crashes = folder / "crashes"
            crashes.mkdir(exist_ok=True)
            stem = f"died-{hashlib.sha1(blob).hexdigest()[:10]}"
            (crashes / (stem + work.suffix)).write_bytes(blob)
            tail = log.read_text(errors="replace")[-3000:]
            (crashes / f"{stem}.txt").write_text(f"worker exit status {proc.returncode}\n\n{tail}")
            sig = f"died: exit status {proc.returncode}"
            entry = total["signatures"].setdefault(sig, {"kind": "died", "count": 0, "examples": [], "message": ""})
            entry["count"] += 1
            entry["examples"].append(str(crashes / (stem + work.suffix)))
            total["kinds"]["died"] = total["kinds"].get("died", 0) + 1
            total["tried"] += 1
            print(f"[{name}] worker died (status {proc.returncode}) on {stem}; restarting", flush=True)
    total["minutes"] = (time.monotonic() - start) / 60
    (folder / "summary.json").write_text(json.dumps(total, indent=1))
    return total


def _table(results: dict[str, dict]) -> str:
    rows = ["| target | minutes | inputs tried | inputs/s | crashes | exception | hang | memory | died | "
            "violations | slowest input s | peak RSS MiB |", "|" + " --- |" * 12]
    for name, r in results.items():
        k = r["kinds"]
        crashes = sum(k.get(x, 0) for x in ("exception", "hang", "memory", "died"))
        rows.append(f"| {name} | {r['minutes']:.1f} | {r['tried']:,} | {r['tried'] / max(1e-9, 60 * r['minutes']):.0f} | "
                    f"{crashes:,} | {k.get('exception', 0):,} | {k.get('hang', 0):,} | {k.get('memory', 0):,} | "
                    f"{k.get('died', 0):,} | {k.get('violation', 0):,} | {r['slowest_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines = ["\n".join(rows), "", "Distinct signatures (count, one kept input):", ""]
    for name, r in results.items():
        for sig, e in sorted(r["signatures"].items(), key=lambda kv: -kv[1]["count"]):
            example = e["examples"][0] if e["examples"] else "-"
            lines.append(f"- {name}: `{sig}` x{e['count']:,}: {example}")
        for what, n in sorted(r["concerns"].items()):
            lines.append(f"- {name} (soft concern): {what} x{n:,}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=[*ALL, "all"], default="all")
    p.add_argument("--minutes", type=float, default=30.0, help="per target (default 30, the issue's target)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "fuzz"))
    p.add_argument("--time-limit", type=float, default=5.0, help="seconds per parser call before it is a hang")
    p.add_argument("--memory-limit-mb", type=float, default=256.0, help="what one parser call may allocate at its "
                                                                        "peak (tracemalloc) or add to the peak RSS")
    p.add_argument("--max-memory-mb", type=int, default=6144, help="address space the worker may add (RLIMIT_AS)")
    p.add_argument("--batch", type=int, default=2000, help="inputs per hypothesis run")
    p.add_argument("--keep", type=int, default=10, help="inputs kept per distinct crash signature")
    p.add_argument("--worker", choices=ALL, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _worker(args)
        return
    results = {}
    for name in ALL if args.target == "all" else (args.target,):
        print(f"[{name}] fuzzing for {args.minutes:g} min ...", flush=True)
        results[name] = _run_target(name, args)
    text = _table(results)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
