""".venv/bin/python bench/mergekit_moe_table.py [--work DIR]

Issue 21's table, rerun: each mergekit-moe config shape through mergekit-moe 0.1.5 and `zenith-merge moe` on tiny
local models (Llama, Mistral, Qwen2, Qwen3; random float32 weights, a trained BPE tokenizer), printed as a
markdown table: what each tool did (exit code, output architecture), whether zenith-merge's output loads in
transformers with no remote code and generates, and whether the experts equal mergekit-moe's (fused layouts split
back; `deepseek` without shared_experts writes a zero shared expert, checked to be zeros and left out). The
configs and the comparisons are the compatibility tests' (tests/test_mergekit_moe_compat.py), run here for the
table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import make_tiny_dense  # noqa: E402
from test_mergekit_moe_compat import (  # noqa: E402
    PROMPTS,
    _experts,
    _experts_by_meaning,
    _generates,
    _run,
)

ROWS = {
    "3 Mistral donors, no architecture (the classic)": (
        lambda m: {"base_model": str(m["mistral", 0]), "gate_mode": "hidden",
                   "experts": _experts([m["mistral", i] for i in range(3)])}, ()),
    "3 Llama donors, no architecture, gate_mode random": (
        lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random",
                   "experts": _experts([m["llama", i] for i in range(3)], prompts=False)}, ()),
    "architecture: mixtral": (
        lambda m: {"base_model": str(m["llama", 0]), "architecture": "mixtral", "gate_mode": "cheap_embed",
                   "experts": _experts([m["llama", i] for i in range(3)])}, ()),
    "architecture: qwen, Qwen2 donors, shared expert with prompts, residual_scale": (
        lambda m: {"base_model": str(m["qwen2", 0]), "architecture": "qwen", "gate_mode": "hidden",
                   "experts": _experts([m["qwen2", i] for i in range(2)], residual_scale=0.5),
                   "shared_experts": [{"source_model": str(m["qwen2", 1]), "positive_prompts": ["shared"],
                                       "residual_scale": 0.25}]}, ()),
    "architecture: qwen, Qwen3 donors": (
        lambda m: {"base_model": str(m["qwen3", 0]), "architecture": "qwen",
                   "experts": _experts([m["qwen3", i] for i in range(3)])}, ()),
    "architecture: qwen3, Qwen3 donors": (
        lambda m: {"base_model": str(m["qwen3", 0]), "architecture": "qwen3",
                   "experts": _experts([m["qwen3", i] for i in range(3)])}, ()),
    "architecture: deepseek, Llama donors, shared expert": (
        lambda m: {"base_model": str(m["llama", 0]), "architecture": "deepseek", "gate_mode": "random",
                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False),
                   "shared_experts": [{"source_model": str(m["llama", 1])}]}, ()),
    "architecture: deepseek, Llama donors, no shared expert": (
        lambda m: {"base_model": str(m["llama", 0]), "architecture": "deepseek", "gate_mode": "hidden",
                   "experts": _experts([m["llama", i] for i in range(2)])}, ()),
    "architecture: deepseek moe, Mistral donors, shared expert with residual_scale, experts_per_token 1": (
        lambda m: {"base_model": str(m["mistral", 0]), "architecture": "deepseek moe", "gate_mode": "random",
                   "experts_per_token": 1, "experts": _experts([m["mistral", i] for i in range(3)], prompts=False),
                   "shared_experts": [{"source_model": str(m["mistral", 1]), "residual_scale": 0.5}]}, ()),
    "architecture: deepseek, Llama donors, no shared expert, experts_per_token 1": (
        lambda m: {"base_model": str(m["llama", 0]), "architecture": "deepseek", "gate_mode": "random",
                   "experts_per_token": 1, "experts": _experts([m["llama", i] for i in range(2)], prompts=False)},
        ()),
    "architecture: qwen, Mistral donors, shared expert": (
        lambda m: {"base_model": str(m["mistral", 0]), "architecture": "qwen", "gate_mode": "random",
                   "experts": _experts([m["mistral", i] for i in range(2)], prompts=False),
                   "shared_experts": [{"source_model": str(m["mistral", 2])}]}, ()),
    "tokenizer_source: union (a mergekit-yaml key)": (
        lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random", "tokenizer_source": "union",
                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False)}, ()),
    "architecture: Qwen3 MoE + shared_experts": (
        lambda m: {"base_model": str(m["qwen3", 0]), "architecture": "Qwen3 MoE", "gate_mode": "random",
                   "experts": _experts([m["qwen3", i] for i in range(2)], prompts=False),
                   "shared_experts": [{"source_model": str(m["qwen3", 0])}]}, ()),
    "the same model 3 times with noise_scale (upcycling)": (
        lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random",
                   "experts": [{"source_model": str(m["llama", 0]), "noise_scale": 0.01} for _ in range(3)]},
        ("--i-understand-this-is-not-useful-without-training",)),
    "out_dtype: float16": (
        lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random", "out_dtype": "float16",
                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False)}, ()),
    "mergekit-moe's flags": (
        lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random",
                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False)},
        ("--out-shard-size", "5B", "--random-seed", "0", "--trust-remote-code", "--allow-crimes",
         "--lazy-unpickle", "--clone-tensors", "--copy-tokenizer",
         "--i-understand-this-is-not-useful-without-training")),
}


def _arch(folder: Path) -> str:
    path = folder / "config.json"
    return json.loads(path.read_text())["architectures"][0] if path.exists() else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/zenith-mergekit-moe-table"))
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t0 = time.perf_counter()
    families = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    models = {(cls.removesuffix("ForCausalLM").lower(), i): make_tiny_dense(args.work / f"{cls}{i}", seed=7 * i + n,
                                                                             cls=cls, dtype=torch.float32)
              for n, cls in enumerate(families) for i in range(3)}
    assert len(PROMPTS) >= 3
    print("| config | mergekit-moe 0.1.5 | zenith-merge | zenith output loads and generates | experts equal |")
    print("| --- | --- | --- | --- | --- |")
    for i, (row, (make, flags)) in enumerate(ROWS.items()):
        mk_rc, mk, zm_rc, err, zm = _run(args.work, f"row{i}", make(models), flags)
        mk_said = f"exit {mk_rc}, {_arch(mk)}" if mk_rc == 0 else f"refused (exit {mk_rc})"
        zm_said = f"exit 0, {_arch(zm)}" if zm_rc == 0 else "refused: " + err.strip().splitlines()[-1][:140]
        loads = "-"
        equal = "-"
        if zm_rc == 0:
            try:
                _generates(zm)
                loads = "yes"
            except Exception as exc:  # reported in the table, not raised
                loads = f"no ({type(exc).__name__})"
            if mk_rc == 0:
                a, b = _experts_by_meaning(mk), _experts_by_meaning(zm)
                if not any(k[1] == "shared" for k in a):  # DeepSeek without shared_experts: a zero shared expert
                    zeros = [k for k in b if k[1] == "shared"]
                    if any(b.pop(k).any() for k in zeros):
                        b["non-zero shared expert"] = None
                same = a.keys() == b.keys() and all(  # at zenith's dtype: mergekit-moe ignores out_dtype
                    torch.equal(b[k].float(), a[k].float().to(b[k].dtype).float()) for k in a)
                equal = "yes" if same else ("by noise scale only" if "upcycling" in row else "no")
                if "out_dtype" in row:
                    dtypes = {next(iter(x.values())).dtype for x in (a, b)}
                    equal += f" (dtypes {', '.join(sorted(map(str, dtypes)))}: mergekit-moe ignores out_dtype)"
        print(f"| {row} | {mk_said} | {zm_said} | {loads} | {equal} |", flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s; work folder {args.work}")


if __name__ == "__main__":
    main()
