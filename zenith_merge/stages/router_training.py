"""Router-only training of a written merge: every weight frozen but the router rows.

The merged checkpoint is loaded with transformers; the router weights of its MoE layers
(the grafted sources' rows, or all rows with `router.train: all`) are trained with AdamW on
next-token loss over the training text, deterministically for a seed. DeepSeek's selection bias
(`e_score_correction_bias`) gets no gradient (it only decides which experts are picked); after
each step it moves by DeepSeek-V3's auxiliary-loss-free rule, against each expert's load
imbalance on the step's tokens:

    b_e <- b_e + gamma * sign(mean_load - load_e)

The trained router tensors are saved to `.zenith/router_trained.safetensors` (with the key of
the plan they were trained for) and the loss and load per step to `.zenith/router_training.json`;
the writer then rewrites the shards that hold the routers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..architectures import ARCHITECTURES, facts, tensor_name
from ..io.manifest import write_json_atomic
from ..io.safetensors_format import save_keyed, saved_key
from ..routing import RoutingSpec, route, routing_spec

TRAINED_FILE = "router_trained.safetensors"
LOG_FILE = "router_training.json"


def balance_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float, trainable: torch.Tensor) -> torch.Tensor:
    """One auxiliary-loss-free step: each trainable expert's bias moves by gamma against its load imbalance."""
    step = gamma * torch.sign(load.float().mean() - load.float())
    return bias + step * trainable.to(bias.dtype)


def token_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int, steps: int,
                  seed: int) -> list[torch.Tensor]:
    """`steps` batches (batch_size, seq_len) of consecutive tokens from the texts, picked with a seeded generator."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, verbose=False)["input_ids"]  # long texts are cut into sequences below
    if len(ids) < seq_len:
        raise ValueError(f"router training needs at least {seq_len} tokens of text, got {len(ids)}")
    n = len(ids) // seq_len
    chunks = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    gen = torch.Generator().manual_seed(seed)
    return [chunks[torch.randint(0, n, (batch_size,), generator=gen)] for _ in range(steps)]


class _LoadMeter:
    """Counts, per MoE layer, how often each expert is picked, from the router's input and current weights."""

    def __init__(self, model, arch, layers: Sequence[int], spec: RoutingSpec):
        self.spec, self.counts, self._handles = spec, {}, []
        self._routers = {}
        for layer in layers:
            module = model.get_submodule(tensor_name(arch, "router", layer).removesuffix(".weight"))
            self._routers[layer] = module
            self._handles.append(module.register_forward_pre_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(module, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            bias = getattr(module, "e_score_correction_bias", None)
            idx, _ = route(h @ module.weight.detach().float().T, self.spec, bias)
            self.counts[layer] = self.counts.get(layer, 0) + torch.bincount(idx.reshape(-1),
                                                                            minlength=self.spec.n_experts)
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        out, self.counts = self.counts, {}
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def train_routers(out_dir: Path, plan, texts: Sequence[str], *, key: str, progress: bool = True) -> Path:
    """Train the router rows of the merge written in `out_dir`; save them (and the log) into `<out>/.zenith/`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = plan.config["router"]
    out_dir = Path(out_dir)
    arch = ARCHITECTURES[plan.target_config["architectures"][0]]
    layers = facts(plan.target_config).moe_layers
    spec = routing_spec(plan.target_config)
    torch.manual_seed(plan.config.get("seed", 0))
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    weights, biases, masks = {}, {}, {}
    for layer in layers:
        name = tensor_name(arch, "router", layer)
        weights[layer] = model.get_parameter(name)
        weights[layer].requires_grad_(True)
        slots = plan.layer_experts(layer).slots
        masks[layer] = torch.tensor([cfg["train"] == "all" or s.source != "base" for s in slots])
        if "router_bias" in arch.roles:
            biases[layer] = model.get_buffer(tensor_name(arch, "router_bias", layer))
    optim = torch.optim.AdamW([weights[layer] for layer in layers], lr=cfg["lr"], weight_decay=0.0)
    batches = token_batches(tokenizer, texts, cfg["seq_len"], cfg["batch_size"], cfg["train_steps"],
                            plan.config.get("seed", 0))
    meter = _LoadMeter(model, arch, layers, spec)
    log = {"key": key, "steps": []}
    try:
        for step, batch in enumerate(tqdm(batches, desc="router training", disable=not progress, leave=False)):
            loss = model(input_ids=batch, labels=batch).loss
            value = float(loss.detach())
            optim.zero_grad()
            loss.backward()
            for layer in layers:  # rows that do not train keep their values exactly
                weights[layer].grad[~masks[layer]] = 0.0
            optim.step()
            loads = meter.take()
            with torch.no_grad():
                for layer, bias in biases.items():
                    bias.copy_(balance_bias(bias, loads[layer], cfg["bias_update"], masks[layer]))
            imbalance = {layer: float(c.float().std() / max(1e-9, float(c.float().mean()))) for layer, c in loads.items()}
            log["steps"].append({"step": step, "loss": value, "load_cv": imbalance})
            if not math.isfinite(value):
                raise FloatingPointError(f"router training: loss is {value} at step {step}")
    finally:
        meter.close()
    trained = {tensor_name(arch, "router", layer): weights[layer].detach().float().contiguous() for layer in layers}
    trained.update({tensor_name(arch, "router_bias", layer): b.detach().float().contiguous()
                    for layer, b in biases.items()})
    zdir = out_dir / ".zenith"
    save_keyed(trained, zdir / TRAINED_FILE, key)
    write_json_atomic(zdir / LOG_FILE, log)
    return zdir / TRAINED_FILE


def trained_key(zdir: Path) -> str | None:
    """The plan key the saved trained routers belong to (None when there are none)."""
    return saved_key(Path(zdir) / TRAINED_FILE)


def read_trained(zdir: Path, name: str) -> torch.Tensor:
    """One trained router tensor (float32) by its output name."""
    with safe_open(str(Path(zdir) / TRAINED_FILE), "pt") as f:
        return f.get_tensor(name)


def training_log(zdir: Path) -> dict:
    """`router_training.json`: the loss and load imbalance (coefficient of variation) per step."""
    return json.loads((Path(zdir) / LOG_FILE).read_text())
