"""Kill-and-resume campaign: kill -9 a job at many exact write steps, resume it, compare every file's sha256.

    .venv/bin/python bench/kill_resume.py                       (100 kills per job, every job; bench/RESULTS.md)
    .venv/bin/python bench/kill_resume.py --jobs passthrough --kills 20 --work /tmp/kr
    .venv/bin/python bench/kill_resume.py --small --kills-per-job regmean=30 graft=30   (the stage jobs, shorter)

Jobs (on the embedded demo models, built on first use):
  passthrough   merge/examples/passthrough.yml (copy, routing report)
  graft         merge/config.yml (the flagship demo: tokenizer union, usage, alignment stages, graft)
  regmean       merge/examples/chimera.yml (assembly with RegMean statistics)
  fp8-cast      `zenith-merge fp8-cast` of demo zen-tiny to block FP8

Each job runs once uninterrupted with ZENITH_STEP_LOG set, which lists its durable write steps (a tensor
appended, a file renamed into place; `zenith_merge/io/failpoints.py`). Then, for each chosen step N, the
job runs with ZENITH_KILL_AT=N (it SIGKILLs itself there: no cleanup runs), is checked to be incomplete
(never a manifest saying "complete"), is resumed with --resume, and every file of the output folder,
`.zenith/` included, is compared by sha256 with the uninterrupted run. Steps are spread evenly over the
job's steps (all of them when there are fewer than --kills); when a job has fewer steps than --kills,
the rest of the kills are made at random times (seeded) instead, with `kill -9` from outside.
Prints a markdown table: job, steps, kills, of which at a step / at a time, resumed byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "zenith_merge.cli"]
JOBS = {
    "passthrough": ["merge", str(ROOT / "merge/examples/passthrough.yml")],
    "graft": ["merge", str(ROOT / "merge/config.yml")],
    "regmean": ["merge", str(ROOT / "merge/examples/chimera.yml")],
    "fp8-cast": ["fp8-cast", "demo://zen-tiny", "--to", "fp8"],
}


# the stage jobs with less calibration text and no routing report: the same stages and kinds of write steps
SMALL = {"regmean": ("merge/examples/chimera.yml", {"routing_report": False, "assembly.regmean.max_tokens": 512}),
         "graft": ("merge/config.yml", {"routing_report": False, "align.max_tokens": 1000})}


def smaller(job: str, work: Path) -> str:
    """Register `<job>-small`, the SMALL variant of a stage job, with its config written into `work`."""
    import yaml

    example, overrides = SMALL[job]
    data = yaml.safe_load((ROOT / example).read_text())
    for key, value in overrides.items():
        parent = data
        *path, last = key.split(".")
        for k in path:
            parent = parent[k]
        parent[last] = value
    config = work / f"{job}-small.yml"
    config.write_text(yaml.safe_dump(data))
    JOBS[f"{job}-small"] = ["merge", str(config)]
    return f"{job}-small"


def command(job: str, out: Path, *, resume: bool = False) -> list[str]:
    """The job's command line writing into `out` (resuming an earlier run there)."""
    args = list(JOBS[job])
    if args[0] == "fp8-cast":
        if args[1].startswith("demo://"):
            args[1] = demo_path(args[1].removeprefix("demo://"))
        args.insert(2, str(out))
    else:
        args += ["--output", str(out)]
    return [*CLI, *args, "--no-progress", *(["--resume"] if resume else [])]


def demo_path(name: str) -> str:
    """The folder of an embedded demo model (built on first use)."""
    from zenith_merge.demo import ensure_demo

    return str(ensure_demo(name, progress=False))


def run(cmd: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a job quietly; its output is kept for the failure message."""
    return subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def is_complete(folder: Path) -> bool:
    """What the folder's manifest says (what the smoke test and --resume read)."""
    path = folder / ".zenith/manifest.json"
    return path.is_file() and json.loads(path.read_text()).get("state") == "complete"


def reference(job: str, work: Path) -> tuple[dict[str, str], list[str], float]:
    """The uninterrupted run: its files' sha256s, its steps (in the main process), its wall time."""
    out, log = work / job, work / f"{job}-steps.log"  # the kills write to the same path: the plan records it
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    done = run(command(job, out), env={"ZENITH_STEP_LOG": str(log)})
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{job}: the uninterrupted run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    files = digests(out)
    shutil.rmtree(out)
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    main_pid = lines[0][0]
    return files, [name for pid, _, name in lines if pid == main_pid], wall


def kill_and_resume(job: str, work: Path, *, at_step: int | None = None, at_time: float | None = None,
                    last_step: int = 0) -> str | None:
    """Kill the job at step `at_step` (or after `at_time` seconds), check it is not complete unless that was
    its last step (the completion itself), resume it.

    Returns None when the resumed folder matches the reference, else what differed."""
    out = work / job
    shutil.rmtree(out, ignore_errors=True)
    if at_step is not None:
        killed = run(command(job, out), env={"ZENITH_KILL_AT": str(at_step)})
        if killed.returncode != -signal.SIGKILL:
            return f"step {at_step}: exit {killed.returncode}, not killed:\n{killed.stderr[-2000:]}"
    else:
        proc = subprocess.Popen(command(job, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=at_time)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if at_step is not None and at_step < last_step and is_complete(out):
        return f"step {at_step}: killed, yet the manifest says complete"
    resumed = run(command(job, out, resume=out.exists()))
    if resumed.returncode:
        return f"{at_step or at_time}: the resume failed ({resumed.returncode}):\n{resumed.stderr[-2000:]}"
    return None if digests(out) == reference_digests[job] else (
        f"{at_step or at_time}: files differ: "
        f"{sorted(k for k in set(digests(out)) | set(reference_digests[job]) if digests(out).get(k) != reference_digests[job].get(k))}")


reference_digests: dict[str, dict[str, str]] = {}


def spread(n_steps: int, kills: int) -> list[int]:
    """`kills` step numbers (1-based) spread evenly over `n_steps`, all of them when there are fewer."""
    if n_steps <= kills:
        return list(range(1, n_steps + 1))
    return sorted({1 + round(i * (n_steps - 1) / (kills - 1)) for i in range(kills)})


def main() -> None:
    """Run the campaign and print its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--kills", type=int, default=100, help="kills per job (100)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one, removed after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help="regmean and graft with less calibration text and no routing report (as the tests)")
    parser.add_argument("--kills-per-job", nargs="*", default=[], metavar="JOB=N", help="another count for a job")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="zenith-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    kills = {job: args.kills for job in args.jobs} | {k: int(v) for k, v in (x.split("=") for x in args.kills_per_job)}
    if args.small:
        args.jobs = [smaller(job, work) if job in SMALL else job for job in args.jobs]
        kills = {(f"{job}-small" if job in SMALL else job): n for job, n in kills.items()}
    rng = random.Random(args.seed)
    rows, failures = [], []
    for job in args.jobs:
        ref, steps, wall = reference(job, work)
        reference_digests[job] = ref
        at_steps = spread(len(steps), kills[job])
        at_times = [rng.uniform(0.5, wall) for _ in range(kills[job] - len(at_steps))]
        same = 0
        for n in at_steps:
            problem = kill_and_resume(job, work, at_step=n, last_step=len(steps))
            same += problem is None
            failures += [f"{job}: {problem}"] if problem else []
        for t in at_times:
            problem = kill_and_resume(job, work, at_time=t)
            same += problem is None
            failures += [f"{job}: {problem}"] if problem else []
        rows.append((job, len(steps), len(ref), len(at_steps) + len(at_times), len(at_steps), len(at_times), same,
                     wall))
        print(f"{job}: {same}/{len(at_steps) + len(at_times)} byte-identical", file=sys.stderr, flush=True)
    print("| job | steps | files | kills | at a step | at a random time | resumed byte-identical | "
          "uninterrupted wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for job, n_steps, n_files, kills, k_step, k_time, same, wall in rows:
        print(f"| {job} | {n_steps} | {n_files} | {kills} | {k_step} | {k_time} | {same}/{kills} "
              f"({100 * same / kills:.0f}%) | {wall:.1f} |")
    for f in failures:
        print(f"- {f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
