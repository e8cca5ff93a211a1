""".venv/bin/python bench/deepseek_from_dense.py [--work DIR] [--layers N] [--dtype bfloat16|float32]

`architecture: deepseek` from a dense model at Llama-3-8B's widths (hidden 4096, 32 heads, 8 KV heads of 128,
intermediate 14336, rope theta 500000 with Llama 3.1's llama3 scaling; random weights, norms spread 0.05..2,
`--layers` deep, vocab 320): the model listed as both experts (top-2, no shared expert), merged by `zenith-merge
merge` into DeepseekV3ForCausalLM and, side by side, into Mixtral. Prints wall time and peak RSS of each merge
(/usr/bin/time), output size and parameter count (the MLA form's q holds 8 x 128 rotary dims per head, mostly
zeros), and how far each output's logits are from the dense model's in transformers (float32 compute on the
written weights, 2 x 300 tokens): the Mixtral form only by the rounding of its expert sum, the DeepSeek form also
by the rounding of its folded scales (sqrt(8) on q, sqrt(eps) / c on the values) to the written dtype.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from common import timed  # noqa: E402


def _dense(folder: Path, layers: int, dtype) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms as trained models have them (not ones): spread 0.05..2
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.rand(p.shape) * 1.95 + 0.05)
    model.to(dtype).save_pretrained(folder)
    from conftest import save_tokenizer

    save_tokenizer(folder)
    return folder


def _merge(work: Path, name: str, dense: Path, architecture: str, dtype: str) -> tuple[float, float, int]:
    import yaml

    out = work / name
    cfg = work / f"{name}.yml"
    cfg.write_text(yaml.safe_dump({"base_model": str(dense), "architecture": architecture, "gate_mode": "random",
                                   "dtype": dtype, "experts_per_token": 2, "output_dir": str(out),
                                   "experts": [{"source_model": str(dense)}] * 2}))
    wall, peak = timed([str(BIN / "zenith-merge"), "merge", str(cfg), "--no-progress"])
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return wall, peak / 2**20, size


def _distance(dense: Path, out: Path) -> tuple[float, float, int]:
    """(max |logit difference| / max |logit|, mean |difference| / mean |logit|, parameters) in float32 compute."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 320, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()(ids).logits
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    diff = (got - want).abs()
    return float(diff.max() / want.abs().max()), float(diff.mean() / want.abs().mean()), params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/zenith-deepseek-from-dense"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args()
    import torch

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    dense = _dense(args.work / "dense", args.layers, getattr(torch, args.dtype))
    print(f"dense: {args.layers} layers at Llama-3-8B widths, {args.dtype}")
    print("| output | wall s | peak RSS MB | output GB | parameters | max |diff| / max |logit| | "
          "mean |diff| / mean |logit| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, arch in (("mixtral", "mixtral"), ("deepseek", "deepseek")):
        wall, rss, size = _merge(args.work, name, dense, arch, args.dtype)
        worst, mean, params = _distance(dense, args.work / name)
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {size / 1e9:.2f} | {params / 1e6:.0f} M | {worst:.2e} | "
              f"{mean:.2e} |", flush=True)


if __name__ == "__main__":
    main()
