""".venv/bin/python bench/release_layout.py [--hidden 7168] [--layers 3] [--experts 16] [--runs 3] [--work DIR]
                                          [--profile] [--out FILE]

zenith-merge on checkpoints laid out exactly as DeepSeek-V3 ships (zenith_merge.demo.release_layout):
two FP8 parents at release widths, children of one parent as V3 and R1 are (defaults: hidden 7168,
3 layers (the first dense) + the MTP layer, 16 routed experts: about 11 GB each), written under --work
once and reused. Each of --runs interleaved repeats times, each right after a `cp -r` of one parent:

  chimera-bf16  `zenith-merge merge` of a Chimera assembly (both parents as experts, assembly.weights
                {default: [1, 0], routed_experts: [0, 1]}: V3's body, R1's routed experts), dtype bfloat16
  chimera-fp8   the same with `fp8_output: true` (block FP8 in, block FP8 out)
  fp8-cast      `zenith-merge fp8-cast PARENT OUT` (block FP8 -> BF16)
  ties-fp8      a mergekit-yaml TIES config over the two parents (R1's task vector on V3 at density 0.5,
                weight 1; density 1 for the embeddings and heads, whose sort would need ~30 GB), block FP8
                in and out: every tensor computed (dequantised, TIES, quantised again)

--jobs picks some of them (default: all).

Each runs in its own process through a small wrapper that prints its peak RSS
(getrusage ru_maxrss, the process and its children). Throughput is output bytes / wall; the ratio
compares it with the `cp -r` just before it (parent bytes / wall, `cp -r` then `sync`, as zenith-merge
fsyncs its shards). Medians over the runs. The page cache cannot be dropped without root: the
parents (2 x ~11 GB) are read warm or partly warm; each output is deleted before the next command.
--profile adds one more run of each job under cProfile (top 15 by cumulative time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from zenith_merge.demo.release_layout import release_config, release_tensors, write_release_checkpoint  # noqa: E402

JOBS = ("chimera-bf16", "chimera-fp8", "fp8-cast", "ties-fp8")
TARGET_RATIO = {"chimera-bf16": 0.5, "chimera-fp8": 0.8, "fp8-cast": 0.5}  # x cp's MB/s
TARGET_RSS_MB = 1024.0
PARENTS = {"v3": 1, "r1": 2}  # child seeds of one parent (parent_seed 0)

# One zenith-merge command; prints its peak RSS (kB) last.
_RUN = ("import resource, sys\nfrom zenith_merge.cli import main\ncode = main(sys.argv[1:])\n"
        "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print('peak_kb', peak, flush=True)\nsys.exit(code)\n")
# The same under cProfile: the top 15 functions by cumulative time go to the file in argv[1].
_PROFILE = ("import cProfile, pstats, sys\nfrom zenith_merge.cli import main\nprof = cProfile.Profile()\n"
            "code = prof.runcall(main, sys.argv[2:])\n"
            "with open(sys.argv[1], 'w') as f:\n"
            "    pstats.Stats(prof, stream=f).strip_dirs().sort_stats('cumulative').print_stats(15)\n"
            "sys.exit(code)\n")


def machine(work: Path) -> str:
    """nproc, RAM, CPU model, kernel and free disk under `work`, in one line."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    free = shutil.disk_usage(work).free / 2**30
    return (f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, {cpu}, {platform.system()} {platform.release()}, "
            f"{free:.0f} GiB free under {work}")


def overrides(args: argparse.Namespace) -> dict:
    """The release config's overrides for the flags; routing groups shrunk with the expert count so that
    every group holds at least two experts and top-k fits in the chosen groups, as in the release."""
    experts = args.experts
    groups = min(8, max(1, experts // 2))
    topk_group = max(1, min(4, groups // 2))
    per_tok = min(8, topk_group * (experts // groups))
    return {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "first_k_dense_replace": args.first_dense,
            "n_routed_experts": experts, "n_group": groups, "topk_group": topk_group,
            "num_experts_per_tok": per_tok}


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_parent(work: Path, name: str, over: dict) -> tuple[Path, float | None]:
    """Parent `name` under `work`, written unless an identical one (same arguments) is there; (folder, seconds
    spent writing it, or None when reused)."""
    folder = work / f"parent-{name}"
    recipe = {"family": "deepseek-v3", "overrides": over, "fp8": True, "parent_seed": 0,
              "child_seed": PARENTS[name]}
    stamp = folder / "zenith_bench_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    partial = work / f".parent-{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    write_release_checkpoint(partial, **recipe)
    seconds = time.perf_counter() - t0
    (partial / stamp.name).write_text(json.dumps(recipe))
    partial.rename(folder)
    return folder, seconds


def write_configs(work: Path, v3: Path, r1: Path) -> dict[str, Path]:
    """The Chimera merge configs, BF16 and FP8 output."""
    paths = {}
    for job, fp8 in (("chimera-bf16", False), ("chimera-fp8", True)):
        cfg = {"base_model": str(v3), "gate_mode": "random", "merge_method": "assembly",
               "experts": [{"source_model": str(v3)}, {"source_model": str(r1)}],
               "assembly": {"weights": {"default": [1, 0], "routed_experts": [0, 1]}},
               "dtype": "bfloat16", "fp8_output": fp8, "routing_report": False,
               "output_dir": str(work / f"out-{job}")}
        paths[job] = work / f"{job}.yml"
        paths[job].write_text(yaml.safe_dump(cfg, sort_keys=False))
    # density 1 for the embeddings and heads: TIES's sort of a 129280 x 7168 task vector needs ~30 GB
    dense = [{"filter": f, "value": 1.0} for f in ("embed_tokens", "lm_head", "shared_head.head")]
    ties = {"merge_method": "ties", "base_model": str(v3), "models": [
        {"model": str(r1), "parameters": {"weight": 1.0, "density": [*dense, {"value": 0.5}]}}], "fp8_output": True,
        "output_dir": str(work / "out-ties-fp8")}
    paths["ties-fp8"] = work / "ties-fp8.yml"
    paths["ties-fp8"].write_text(yaml.safe_dump(ties, sort_keys=False))
    return paths


def job_argv(job: str, configs: dict[str, Path], v3: Path, out: Path) -> list[str]:
    """The zenith-merge command line of `job`, writing into `out`."""
    if job == "fp8-cast":
        return ["fp8-cast", str(v3), str(out), "--no-progress"]
    return ["merge", str(configs[job]), "--output", str(out), "--no-progress"]


def timed_cp(src: Path, dst: Path) -> float:
    """Seconds of `cp -r src dst` followed by `sync`."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    os.sync()
    return time.perf_counter() - t0


def timed_job(argv: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one zenith-merge command in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"zenith-merge {' '.join(argv)} failed (exit {run.returncode}):\n"
                         f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return wall, int(run.stdout.split("peak_kb")[-1].split()[0]) / 1024


def profile_job(argv: list[str], out: Path) -> str:
    """cProfile's top 15 (cumulative) of one run of a zenith-merge command."""
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        run = subprocess.run([sys.executable, "-c", _PROFILE, f.name, *argv], capture_output=True, text=True,
                             cwd=ROOT)
        if run.returncode != 0:
            raise SystemExit(f"profiling zenith-merge {' '.join(argv)} failed:\n{run.stderr[-5000:]}")
        text = Path(f.name).read_text()
    shutil.rmtree(out, ignore_errors=True)
    return text.strip()


def med(xs: list[float]) -> float:
    """The median (the report's summary of the runs)."""
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168, help="hidden_size (release: 7168)")
    ap.add_argument("--layers", type=int, default=3, help="num_hidden_layers, the MTP layer not counted (3)")
    ap.add_argument("--first-dense", type=int, default=1, help="first_k_dense_replace: dense layers first (1)")
    ap.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (16)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved repeats; medians reported (3)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zenith-release-layout-bench",
                    help="where the parents (kept, reused) and outputs (deleted) go")
    ap.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="which jobs (default: all)")
    ap.add_argument("--profile", action="store_true", help="also profile one run of each job (cProfile top 15)")
    ap.add_argument("--out", type=Path, help="also write the report to this file")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    over = overrides(args)
    config = release_config("deepseek-v3", over)
    parent_bytes = sum(t.nbytes for t in release_tensors("deepseek-v3", config))
    need = 3.5 * parent_bytes  # two parents, then the largest output (BF16: ~1.3x a parent)
    have = shutil.disk_usage(work).free + sum(folder_bytes(p) for p in work.glob("parent-*"))
    if have < need:
        raise SystemExit(f"{work}: needs about {need / 1e9:.0f} GB of disk, has {have / 1e9:.0f} GB")
    print(f"parents: {parent_bytes / 1e9:.2f} GB of tensors each, in {work}", flush=True)
    made = {}
    parents = {}
    for name in PARENTS:
        parents[name], made[name] = ensure_parent(work, name, over)
        if made[name] is not None:
            print(f"  wrote parent-{name} in {made[name]:.0f} s", flush=True)
    v3, r1 = parents["v3"], parents["r1"]
    configs = write_configs(work, v3, r1)
    cp_bytes = folder_bytes(v3)
    rows: dict[str, dict[str, list[float]]] = {j: {"wall": [], "bytes": [], "rss": [], "cp": []} for j in args.jobs}
    for run in range(args.runs):
        for job in args.jobs:
            cp_wall = timed_cp(v3, work / "out-cp")
            shutil.rmtree(work / "out-cp")
            out = work / f"out-{job}"
            wall, rss = timed_job(job_argv(job, configs, v3, out), out)
            rows[job]["bytes"].append(folder_bytes(out))
            shutil.rmtree(out)
            rows[job]["wall"].append(wall)
            rows[job]["rss"].append(rss)
            rows[job]["cp"].append(cp_wall)
            print(f"run {run + 1}/{args.runs} {job}: {wall:.1f} s, {rss:.0f} MB peak; cp -r {cp_wall:.1f} s",
                  flush=True)
    profiles = {}
    if args.profile:
        for job in args.jobs:
            out = work / f"out-{job}"
            profiles[job] = profile_job(job_argv(job, configs, v3, out), out)

    lines = [
        f"date: {datetime.date.today().isoformat()}", f"machine: {machine(work)}",
        f"command: `.venv/bin/python bench/release_layout.py {' '.join(sys.argv[1:])}` (hidden {args.hidden}, "
        f"{args.layers} layers, first {args.first_dense} dense, {args.experts} experts, {args.runs} runs)",
        f"parents: two DeepSeek-V3 release-layout FP8 checkpoints (children of one parent), {args.layers} layers "
        f"+ 1 MTP layer, hidden {args.hidden}, {args.experts} routed experts: {cp_bytes / 1e9:.2f} GB on disk each"
        + "".join(f"; parent-{n} written in {s:.0f} s" for n, s in made.items() if s is not None),
        "note: page cache not dropped (no root); cp is `cp -r` + `sync` (zenith-merge fsyncs its shards); "
        "outputs deleted between commands", "",
        "| job | wall, median (each) | output | MB/s | cp -r MB/s | ratio to cp | target | peak RSS, median "
        "(each) | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for job in args.jobs:
        r = rows[job]
        speeds = [b / w / 1e6 for b, w in zip(r["bytes"], r["wall"])]
        cps = [cp_bytes / w / 1e6 for w in r["cp"]]
        ratio = med([s / c for s, c in zip(speeds, cps)])
        rss = med(r["rss"])
        target = TARGET_RATIO.get(job)
        ok = "no target" if target is None else "met" if ratio >= target else "MISSED"
        ok_rss = "met" if rss < TARGET_RSS_MB else "MISSED"
        lines.append(
            f"| {job} | {med(r['wall']):.1f} s ({', '.join(f'{w:.1f}' for w in r['wall'])}) "
            f"| {med(r['bytes']) / 1e9:.2f} GB | {med(speeds):.0f} | {med(cps):.0f} | {ratio:.2f}x "
            f"| {'-' if target is None else f'>= {target}x'}: {ok} | {rss:.0f} MB ({', '.join(f'{x:.0f}' for x in r['rss'])}) "
            f"| < {TARGET_RSS_MB:.0f} MB: {ok_rss} |")
    for job, text in profiles.items():
        lines += ["", f"### cProfile, {job} (top 15, cumulative)", "", "```", text, "```"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
