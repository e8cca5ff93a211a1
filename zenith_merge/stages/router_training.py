"""Training a written merge: the router rows, and (align.train_steps) the maps A and B folded
into a donor's experts; every other weight frozen.

The merged checkpoint is loaded with transformers; the router weights of its MoE layers
(the grafted sources' rows, or all rows with `router.train: all`) are trained with AdamW on
next-token loss over the training text, deterministically for a seed. Where maps train, each
MoE layer's donor expert slots are recomputed from the donor's own weights at every step,

    gate' = gate . A_l,   up' = up . A_l,   down' = c . B_l . down,

so the gradient reaches A_l and B_l (initialised from the ridge fit), and the checkpoint stays
a plain one: the trained maps are folded in by the writer exactly as the fitted ones were. With
`align.teacher_data`, a soft cross-entropy to the donor's next-token distribution on that text
is added: the donor reads its own tokens, the merge the same tokens as union ids, so positions
line up; the loss is -sum_v p_donor(v) log p_merge(union(v)), weighted by `align.teacher_weight`. DeepSeek's selection bias
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
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from ..architectures import ARCHITECTURES, facts, tensor_name
from ..forward.loading import block_fp8_loaded_as_read
from ..forward.token_batches import token_batches
from ..io.manifest import write_json_atomic
from ..io.safetensors_format import save_keyed, saved_key
from ..maths.routing import RoutingSpec, route, routing_spec
from ..vocab.token_map import TokenMap

TRAINED_FILE = "router_trained.safetensors"
MAPS_FILE = "align_trained.safetensors"
LOG_FILE = "router_training.json"
# transformers' fused expert tensors of a MoE block (DeepseekV3, Qwen3-MoE): gate_up_proj[e] is
# cat(gate_e, up_e) of shape (2 I, H), down_proj[e] is down_e of shape (H, I); checked on loading.
FUSED_EXPERTS = ("experts", "gate_up_proj", "down_proj")


def balance_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float, trainable: torch.Tensor) -> torch.Tensor:
    """One auxiliary-loss-free step: each trainable expert's bias moves by gamma against its load imbalance."""
    step = gamma * torch.sign(load.float().mean() - load.float())
    return bias + step * trainable.to(bias.dtype)


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


class _FoldedSlots(torch.nn.Module):
    """A parametrisation of one fused expert tensor: the donor slots recomputed from trainable maps.

    `gate_up`: slot e becomes cat(pad(G_e A), pad(U_e A)); `down`: slot e becomes pad(c_e B D_e).
    Every other slot keeps the written values (frozen).
    """

    def __init__(self, kind: str, slots: list[int], weights: tuple[torch.Tensor, ...], maps: torch.nn.Parameter,
                 scales: torch.Tensor, inter: int):
        super().__init__()
        self.kind, self.inter, self.maps = kind, inter, maps
        self.register_buffer("slots", torch.tensor(slots), persistent=False)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w, persistent=False)
        self.register_buffer("scales", scales.reshape(-1, 1, 1), persistent=False)

    def folded(self) -> torch.Tensor:
        """The donor slots' values, (slots, 2 I, H) for gate_up or (slots, H, I) for down."""
        if self.kind == "gate_up":
            gate, up = self.w0 @ self.maps, self.w1 @ self.maps  # (S, I_d, H_d) @ (H_d, H) -> (S, I_d, H)
            rows = self.inter - gate.shape[1]
            return torch.cat([F.pad(gate, (0, 0, 0, rows)), F.pad(up, (0, 0, 0, rows))], dim=1)
        down = self.scales * (self.maps @ self.w0)  # (H, H_d) @ (S, H_d, I_d) -> (S, H, I_d)
        return F.pad(down, (0, self.inter - down.shape[2]))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(0, self.slots, self.folded().to(original.dtype))


def _trainable_maps(model, plan, arch, source) -> dict[tuple[str, int, int], tuple[torch.nn.Parameter,
                                                                                 torch.nn.Parameter]]:
    """Per output MoE layer with slots of a training source: its maps (A, B) as parameters, wired into the
    model's fused expert tensors by parametrisation. Checks first that the fold of the fitted maps gives
    the written tensors, so a different expert layout is refused rather than trained. `source` gives the
    fitted maps and the donor weights (`maps`, `source_weight`); it is closed here."""
    from torch.nn.utils import parametrize

    maps = {}
    try:
        for le in (le for le in plan.expert_table if le.like is None):  # no forward pass runs an MTP layer
            for key in plan.stages.train_maps:
                slots = [j for j, s in enumerate(le.slots) if s.source == key]
                if not slots:
                    continue
                src_layer = le.slots[slots[0]].source_layer
                A0, B0 = source.maps(key, le.layer, src_layer)
                A, B = torch.nn.Parameter(A0.float().clone()), torch.nn.Parameter(B0.float().clone())
                weights = {proj: torch.stack([source.source_weight(le.layer, j, proj).float() for j in slots])
                           for proj in ("gate", "up", "down")}
                scales = torch.tensor([le.slots[j].scale for j in slots], dtype=torch.float32)
                module = model.get_submodule(f"{arch.mlp_module.format(layer=le.layer)}.{FUSED_EXPERTS[0]}")
                inter = getattr(module, FUSED_EXPERTS[2]).shape[-1]
                folds = {FUSED_EXPERTS[1]: _FoldedSlots("gate_up", slots, (weights["gate"], weights["up"]), A,
                                                        scales, inter),
                         FUSED_EXPERTS[2]: _FoldedSlots("down", slots, (weights["down"],), B, scales, inter)}
                for name, fold in folds.items():
                    written = getattr(module, name).detach()[slots]
                    with torch.no_grad():
                        err = float(torch.linalg.vector_norm(fold.folded() - written)
                                    / torch.linalg.vector_norm(written).clamp_min(1e-30))
                    if err > 1e-2:
                        raise ValueError(f"layer {le.layer}: {type(module).__name__}.{name} does not hold the folded "
                                         f"experts of {key} (relative difference {err:.3g}); this transformers "
                                         f"version lays experts out otherwise, so maps cannot train")
                    parametrize.register_parametrization(module, name, fold, unsafe=True)
                maps[key, le.layer, src_layer] = (A, B)
    finally:
        source.close()
    return maps


def _teacher(plan, out_dir: Path, texts: Sequence[str], steps: int, batch_size: int, seq_len: int, seed: int):
    """The donor as teacher: its model, its token batches, and its token ids as union ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = plan.stages.train_maps[0]
    path = plan.sources[key].path
    if plan.vocab is None or key not in plan.vocab.donors:
        raise ValueError(f"align.teacher_data: the teacher's tokens reach the merge through the union vocabulary; "
                         f"set tokenizer.source: union with {key} in it")
    to_union = TokenMap.load(out_dir / ".zenith").to_union(key)
    with block_fp8_loaded_as_read(Path(path)):
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    batches = token_batches(AutoTokenizer.from_pretrained(path), texts, seq_len, batch_size, steps, seed + 1,
                            where="align.teacher_data")
    ids = torch.tensor(sorted(to_union))
    union_ids = torch.tensor([to_union[int(i)] for i in ids])
    lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    lookup[ids] = union_ids
    return teacher, batches, ids, union_ids, lookup


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_ids: torch.Tensor,
                       student_ids: torch.Tensor) -> torch.Tensor:
    """-sum_v p_teacher(v) log p_student(v) over the tokens both know (teacher_ids[i] is student_ids[i]),
    both distributions renormalised over them (tokens only the student knows are neither pushed down
    nor up); mean over positions."""
    p = torch.softmax(teacher_logits.float()[..., teacher_ids], dim=-1)
    logq = torch.log_softmax(student_logits.float()[..., student_ids], dim=-1)
    return -(p * logq).sum(-1).mean()


def check_training_text(plan, texts: Sequence[str], where: str, teacher_texts: Sequence[str] = ()) -> None:
    """Refuse, before anything is written, training text too short for one sequence: the student's counted
    with the base's tokenizer (the union keeps the base's splits), the teacher's with its own."""
    from transformers import AutoTokenizer

    seq_len = plan.config["router"]["seq_len"]
    token_batches(AutoTokenizer.from_pretrained(plan.sources["base"].path), texts, seq_len, 1, 0, 0, where=where)
    if teacher_texts:
        teacher = plan.sources[plan.stages.train_maps[0]].path
        token_batches(AutoTokenizer.from_pretrained(teacher), teacher_texts, seq_len, 1, 0, 0,
                      where="align.teacher_data")


def train_routers(out_dir: Path, plan, texts: Sequence[str], *, key: str, teacher_texts: Sequence[str] = (),
                  where: str = "router.data", progress: bool = True, tensor_source=None) -> Path:
    """Train the router rows (and the maps the plan trains) of the merge written in `out_dir`; save them
    (and the log) into `<out>/.zenith/`. `where` names the config key the texts come from. Training maps
    needs `tensor_source`, the merge's tensor source for this plan (the pipeline's `PlanTensorSource`), which
    gives the fitted maps and the donor weights they fold."""
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
    steps, seed, align = plan.stages.train_routers, plan.config.get("seed", 0), plan.config["align"]
    groups = [{"params": [weights[layer] for layer in layers], "lr": cfg["lr"]}]
    maps = _trainable_maps(model, plan, arch, tensor_source) if plan.stages.train_maps else {}
    if maps:
        groups.append({"params": [p for pair in maps.values() for p in pair], "lr": align["lr"]})
    optim = torch.optim.AdamW(groups, weight_decay=0.0)
    batches = token_batches(tokenizer, texts, cfg["seq_len"], cfg["batch_size"], steps, seed, where=where)
    teacher = _teacher(plan, out_dir, teacher_texts, steps, cfg["batch_size"], cfg["seq_len"], seed) \
        if teacher_texts else None
    meter = _LoadMeter(model, arch, layers, spec)
    log = {"key": key, "steps": []}
    try:
        for step, batch in enumerate(tqdm(batches, desc="training", disable=not progress, leave=False)):
            loss = model(input_ids=batch, labels=batch).loss
            entry = {"step": step, "loss": float(loss.detach())}
            if teacher is not None:
                t_model, t_batches, t_ids, u_ids, lookup = teacher
                t_batch = t_batches[step]
                with torch.no_grad():
                    t_logits = t_model(input_ids=t_batch).logits
                kd = soft_cross_entropy(model(input_ids=lookup[t_batch]).logits, t_logits, t_ids, u_ids)
                entry["teacher"] = float(kd.detach())
                loss = loss + align["teacher_weight"] * kd
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
            log["steps"].append({**entry, "load_cv": imbalance})
            if not math.isfinite(value):
                raise FloatingPointError(f"router training: loss is {value} at step {step}")
    finally:
        meter.close()
    trained = {tensor_name(arch, "router", layer): weights[layer].detach().float().contiguous() for layer in layers}
    trained.update({tensor_name(arch, "router_bias", layer): b.detach().float().contiguous()
                    for layer, b in biases.items()})
    zdir = out_dir / ".zenith"
    if maps:  # written first: the routers' file is what marks training as finished
        save_keyed({_map_key(src, kind, layer, src_layer): m.detach().float().contiguous()
                    for (src, layer, src_layer), pair in maps.items() for kind, m in zip("AB", pair)},
                   zdir / MAPS_FILE, key)
    save_keyed(trained, zdir / TRAINED_FILE, key)
    write_json_atomic(zdir / LOG_FILE, log)
    return zdir / TRAINED_FILE


def _map_key(source: str, kind: str, layer: int, source_layer: int) -> str:
    return f"{source}.{kind}.{layer}.{source_layer}"


def read_trained_maps(zdir: Path, source: str, layer: int, source_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained (A, B) of one source's output layer (float32)."""
    with safe_open(str(Path(zdir) / MAPS_FILE), "pt") as f:
        return tuple(f.get_tensor(_map_key(source, kind, layer, source_layer)) for kind in "AB")


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
