"""Prompt vectors: each source's direction in the base's MoE input space, from its prompts.

mergekit-moe's `hidden` router rows: for each source, the base model's hidden state on the
source's positive prompts minus that on its negative prompts, per layer, normalised to unit
length, so a token that looks like the source's prompts scores high for its experts:

    v_s(l) = normalise( mean_p h_l(p+) - mean_p h_l(p-) )

h_l is what the output's router sees: the normalised input of layer l's MoE block (`gate_source:
moe_input`, the default). mergekit-moe reads the residual stream before the layer instead (`gate_source:
residual`: its rows bit for bit, computed in bfloat16 as mergekit computes them); the router's own input
is the better match (README, measured).
`hidden` and `hidden_last` take each prompt's last token, `hidden_avg` the mean over its
tokens. `cheap_embed` needs no forward pass: the normalised sum of the prompts' token
embeddings, the same for every layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..architectures import architecture_of, tensor_name
from ..errors import CalibrationError
from ..forward import dense as dense_forward
from ..forward.calibration import CapturePoint, capture_batch, head_skipping
from ..forward.loading import load_for_calibration, release_memory
from ..io.reader import Checkpoint
from ..io.safetensors_format import save_keyed
from ..io.safetensors_format import saved_key as _saved_key

VECTORS_FILE = "prompt_vectors.safetensors"


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _prompt_states(model, tokenizer, prompts: Sequence[str], points: dict[int, CapturePoint], mode: str,
                   ) -> dict[int, torch.Tensor]:
    """Per layer: the mean over prompts of each prompt's last-token (or mean-token) state (one forward pass)."""
    bos = tokenizer.bos_token or ""
    per_prompt = capture_batch(model, tokenizer, [bos + p for p in prompts], list(points.values()))
    out = {}
    for layer, point in points.items():
        rows = [s[point].mean(0) if mode == "hidden_avg" else s[point][-1] for s in per_prompt]
        out[layer] = torch.stack(rows).mean(0)
    return out


def hidden_vectors(base_path: Path, layers: Sequence[int], prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                   *, mode: str = "hidden", load: Mapping | None = None, progress: bool = True,
                   source: str = "moe_input") -> dict[str, torch.Tensor]:
    """source -> (len(layers), hidden) unit vectors from the base model's states on that source's prompts.

    `prompts[source]` is (positive, negative); the negative mean is subtracted where given. `load`
    holds `load_for_calibration`'s options (8-bit, max_memory, dtype). `source`: which state is read,
    the MoE block's normalised input (`moe_input`), or mergekit-moe's residual stream (`residual`:
    `mergekit_vectors`).
    """
    if source == "residual":
        return mergekit_vectors(base_path, layers, prompts, mode=mode, progress=progress)
    with Checkpoint.open(base_path, check_shapes=False) as ckpt:
        arch = architecture_of(ckpt.config, where=str(base_path / "config.json"))
        config = ckpt.config
    load = dict(load or {})
    if not load.get("load_in_8bit") and dense_forward.supported(config, max_tokens=PLAIN_MAX_TOKENS):
        return _plain_vectors(base_path, layers, prompts, mode=mode, dtype=load.get("dtype"))
    model, tokenizer = load_for_calibration(base_path, **load)
    points = {layer: CapturePoint.input_of(arch.mlp_module.format(layer=layer)) for layer in layers}
    out = {}
    try:
        for source, (positive, negative) in tqdm(prompts.items(), desc="prompt vectors", disable=not progress,
                                                 leave=False):
            pos = _prompt_states(model, tokenizer, positive, points, mode)
            neg = _prompt_states(model, tokenizer, negative, points, mode) if negative else None
            rows = [pos[layer] - (neg[layer] if neg is not None else 0) for layer in layers]
            out[source] = _unit(torch.stack(rows))
    finally:
        del model
        release_memory()
    return out


def mergekit_vectors(base_path: Path, layers: Sequence[int],
                     prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]], *, mode: str = "hidden",
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """`gate_source: residual`: mergekit-moe 0.1.5's rows bit for bit, computed the way it computes them.

    The base runs through transformers in bfloat16; a source's prompts go in one batch, each `bos + prompt`,
    left-padded with the bos token (position ids are not shifted for the padding, as in mergekit). Per layer
    l, with h the bfloat16 residual stream entering l, every step rounded in bfloat16:

        s_p = h_l(p)[-1]  (`hidden`, `hidden_last`)   or   sum_t h_l(p)[t] / T  (`hidden_avg`, pads included)
        v = sum_p s_p / P  (minus the same over the negative prompts),   row = v / max(|v|, 1e-8)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CalibrationError(f"gate_source: residual loads the base and its tokenizer through transformers in "
                               f"bfloat16, as mergekit-moe does, but {base_path} does not load so: {first_line}; "
                               f"use gate_source: moe_input") from e
    model.eval()
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    skip_head = head_skipping(model, ())

    def states(model, texts: Sequence[str]) -> torch.Tensor:
        batch = tokenizer([(tokenizer.bos_token or "") + t for t in texts], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True, return_dict=True, **skip_head)
            hidden = torch.stack(out.hidden_states[:-1])
        per_prompt = hidden.sum(dim=2) / hidden.shape[2] if mode == "hidden_avg" else hidden[:, :, -1, :]
        return per_prompt.sum(dim=1) / per_prompt.shape[1]

    out = {}
    try:
        for name, (positive, negative) in tqdm(prompts.items(), desc="prompt vectors", disable=not progress,
                                               leave=False):
            v = states(model, positive)
            if negative:
                v -= states(model, negative)
            v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
            out[name] = v[list(layers)].clone()
    finally:
        del model
        release_memory()
    return out


# Prompts longer than this (in tokens) are cut, as capture_batch cuts them.
PLAIN_MAX_TOKENS = dense_forward.PLAIN_MAX_TOKENS


def _plain_vectors(base_path: Path, layers: Sequence[int],
                   prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]], *, mode: str,
                   dtype: torch.dtype | str | None) -> dict[str, torch.Tensor]:
    """`hidden_vectors` by the plain dense pass: no transformers, one layer's weights in memory at a time.

    `stored` computes in float32 here: the pass holds one layer, so float32 costs little memory, it is exact,
    and on CPUs without bfloat16 arithmetic (AVX2) it is about 3x faster than bfloat16 (1.35 s against 3.87 s
    for 8 prompts through a 12-layer, 1024-wide Llama, measured).
    """
    if dtype == "stored" or dtype is None:
        dtype = torch.float32
    bos = dense_forward.bos_text(base_path)
    groups = [(source, sign, texts) for source, (positive, negative) in prompts.items()
              for sign, texts in ((1.0, positive), (-1.0, negative)) if texts]
    flat = [bos + text for _, _, texts in groups for text in texts]  # one pass for every source's prompts
    per_text = iter(dense_forward.mlp_inputs(base_path, flat, layers, dtype=dtype,
                                             max_tokens=PLAIN_MAX_TOKENS))
    sums = {source: {layer: 0.0 for layer in layers} for source in prompts}
    for source, sign, texts in groups:
        states = [next(per_text) for _ in texts]
        for layer in layers:
            sums[source][layer] = sums[source][layer] + sign * torch.stack(
                [s[layer].mean(0) if mode == "hidden_avg" else s[layer][-1] for s in states]).mean(0)
    return {source: _unit(torch.stack([sums[source][layer] for layer in layers])) for source in prompts}


def cheap_embed_vectors(base_path: Path, layers: Sequence[int],
                        prompts: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, torch.Tensor]:
    """source -> (len(layers), hidden): the normalised sum of the token embeddings of its positive prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with Checkpoint.open(base_path, check_shapes=False) as ckpt:
        arch = architecture_of(ckpt.config, where=str(base_path / "config.json"))
        embed = ckpt.read(tensor_name(arch, "embed")).float()
    out = {}
    for source, (positive, negative) in prompts.items():
        total = torch.zeros(embed.shape[1])
        for sign, group in ((1.0, positive), (-1.0, negative)):
            for p in group:
                ids = tokenizer(p, add_special_tokens=False)["input_ids"]
                total += sign * embed[ids].sum(0)
        out[source] = _unit(total).expand(len(layers), -1).clone()
    return out


def save_vectors(vectors: dict[str, torch.Tensor], layers: Sequence[int], folder: Path, key: str) -> Path:
    """Write `<folder>/prompt_vectors.safetensors`: `<source>.<layer>` -> unit vector, with the plan key."""
    tensors = {f"{source}.{layer}": v[i].contiguous() for source, v in vectors.items() for i, layer in enumerate(layers)}
    return save_keyed(tensors, Path(folder) / VECTORS_FILE, key)


def saved_key(folder: Path) -> str | None:
    """The plan key the saved vectors were computed for (None when there are none)."""
    return _saved_key(Path(folder) / VECTORS_FILE)


def load_vectors(folder: Path) -> dict[str, torch.Tensor]:
    """Every saved vector, by `<source>.<layer>` (a few KB: one row per source and layer)."""
    return load_file(str(Path(folder) / VECTORS_FILE))


def load_vector(folder: Path, source: str, layer: int) -> torch.Tensor:
    """One source's unit vector at one output layer."""
    with safe_open(str(Path(folder) / VECTORS_FILE), "pt") as f:
        return f.get_tensor(f"{source}.{layer}")
