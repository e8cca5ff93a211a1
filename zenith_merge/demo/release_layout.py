"""Checkpoints laid out exactly as DeepSeek-V3 and Qwen3-MoE ship, at any depth, expert count and width.

Tests and benchmarks need what a user downloads from the hub, without downloading it: the release
config.json (its `auto_map`, `num_nextn_predict_layers`, `quantization_config`), every tensor the
release has under the release's on-disk name and shape, block-FP8 weights with float32
`weight_scale_inv` (some in another shard than their weight), DeepSeek's multi-token-prediction
layer `model.layers.<num_hidden_layers>.*`, the release's shard naming and index, the custom-code
files beside them, the release tokenizer and generation config. The weights are random but
realistic-ish (projections ~N(0, 0.02), norms ~1, FP8 blocks at amax 448 with scales ~1e-4) and
deterministic; two "children of one parent" (like V3 and R1) differ by a small dense delta.

    from zenith_merge.demo.release_layout import release_fixture, write_release_checkpoint
    folder = release_fixture("deepseek-v3-fp8-small")        # cached, built on first use (seconds)
    write_release_checkpoint("/tmp/v3", "deepseek-v3", overrides={"num_hidden_layers": 3,
                             "first_k_dense_replace": 1, "n_routed_experts": 16})   # release widths, ~11 GB

What the DeepSeek-V3 release stores as float8_e4m3fn (each with a `<name>_scale_inv` of
ceil(rows/128) x ceil(cols/128) float32): every 2-D projection of MLA attention (q_a_proj, q_b_proj
(q_proj without q_lora_rank), kv_a_proj_with_mqa, kv_b_proj, o_proj), of the dense MLPs, the routed
experts and the shared experts, the MTP layer's decoder layer included. BF16: embeddings, lm_head,
norms, the routers' `gate.weight`, and the MTP layer's `embed_tokens`, `enorm`, `hnorm`, `eh_proj`,
`shared_head.*`; float32: `gate.e_score_correction_bias`. (DeepSeek's inference code builds every
Linear but the router and the head in FP8; vLLM's DeepSeek MTP module builds `eh_proj` as a plain
unquantised `nn.Linear`, so the release has no `eh_proj.weight_scale_inv`.) Qwen3-MoE ships BF16;
its -FP8 releases use the same block-128 `weight_scale_inv` naming on attention and expert
projections (router, norms, embeddings, head unquantised), which `fp8=True` reproduces.

How the bytes are made, fast: each tensor has its own PCG64 stream (seeded from the seed and the
tensor's name), drawn in chunks of a few MB, so a checkpoint is written at about disk speed with
bounded memory (a writer thread overlaps the writes; shards are written by this module, header
first, never held whole). Values come from inverse-CDF tables: a BF16 or float32 value is the
normal quantile of a random 16-bit index; an FP8 code is one of 256 normal quantiles scaled so that
the extreme ones are +-448 (never a NaN code). A quantisable weight is always generated as FP8
codes and block scales; its BF16 form (fp8=False) is their dequantisation, exactly what DeepSeek's
fp8_cast_bf16.py gives for the FP8 form. A child adds `child_delta` x (a typical magnitude) x
unit-variance noise (uniform, 256 levels) from its own stream to every value (FP8 codes re-rounded,
scales x (1 + delta u)), so two children of one parent differ by ~1.4 x child_delta (relative).
"""

from __future__ import annotations

import copy
import json
import queue
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ZenithError
from .release_configs import (
    BLOCK,
    DEFAULT_SHARD_BYTES,
    FAMILIES,
    FP8_QUANTIZATION_CONFIG,
    RELEASE_CONFIGS,
    RELEASE_FIXTURES,
    RELEASE_TOKENIZERS_OF,
    SMALL_SHARD_BYTES,
)
from .release_tokenizers import TOKENIZER_FILES, ensure_built, fingerprint, release_tokenizer
from .release_values import BIAS_STD, DTYPE_BYTES, NORM_STD, ReleaseTensor, Seeds, Values

DELETE = object()  # an override value that removes the key from config.json




def release_config(family: str, overrides: dict[str, Any] | None = None, *, fp8: bool | None = None) -> dict:
    """The config.json of a `family` checkpoint: the release's values updated by `overrides`.

    An override of None writes null (as DeepSeek-V2-Lite's `q_lora_rank`); `DELETE` removes the key.
    `quantization_config` is the release's block-FP8 one when the weights are FP8 and absent otherwise
    (a leftover one makes transformers load BF16 weights as FP8). fp8=None means the release's own
    format: FP8 for DeepSeek-V3, BF16 for Qwen3-MoE.
    """
    _check_family(family)
    fp8 = _fp8_default(family, fp8)
    config = copy.deepcopy(RELEASE_CONFIGS[family])
    for key, value in (overrides or {}).items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = copy.deepcopy(value)
    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = copy.deepcopy(FP8_QUANTIZATION_CONFIG)
    _check_config(family, config)
    return dict(sorted(config.items()))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ZenithError(f"unknown release family {family!r}; families: {', '.join(FAMILIES)}")


def _fp8_default(family: str, fp8: bool | None) -> bool:
    return family == "deepseek-v3" if fp8 is None else bool(fp8)


def _check_config(family: str, c: dict) -> None:
    """Refuse configs whose shapes cannot be built (a clear message beats a shape error in transformers)."""
    experts = c["n_routed_experts"] if family == "deepseek-v3" else c["num_experts"]
    if c["num_experts_per_tok"] > experts:
        raise ZenithError(f"num_experts_per_tok {c['num_experts_per_tok']} > {experts} experts")
    if family == "deepseek-v3" and experts % c["n_group"]:
        raise ZenithError(f"n_routed_experts {experts} is not a multiple of n_group {c['n_group']}")
    if c["num_attention_heads"] % c["num_key_value_heads"]:
        raise ZenithError("num_attention_heads must be a multiple of num_key_value_heads")


def release_tensors(family: str, config: dict, *, fp8: bool | None = None) -> list[ReleaseTensor]:
    """Every tensor of a `family` checkpoint with `config` (release_config's), in the order they are written.

    Names and shapes are the release's on disk (per-expert tensors, `weight_scale_inv` after each FP8
    weight when fp8); for DeepSeek-V3 the MTP layers follow the main model as layers
    num_hidden_layers + i.
    """
    _check_family(family)
    fp8 = _fp8_default(family, fp8)
    build = _deepseek_tensors if family == "deepseek-v3" else _qwen3_tensors
    out: list[ReleaseTensor] = []
    for t in build(config):
        if t.kind == "weight":
            out.append(t if fp8 else ReleaseTensor(t.name, "BF16", t.shape, "weight", key=t.key))
            if fp8:
                rows, cols = t.shape
                out.append(ReleaseTensor(f"{t.name}_scale_inv", "F32", (-(-rows // BLOCK), -(-cols // BLOCK)),
                                         "scale", of=t.name))
        else:
            out.append(t)
    return out


def _w(name: str, rows: int, cols: int) -> ReleaseTensor:
    """A quantisable projection weight (F8_E4M3 in the FP8 form)."""
    return ReleaseTensor(name, "F8_E4M3", (rows, cols), "weight")


def _bf16(name: str, *shape: int, key: str = "") -> ReleaseTensor:
    return ReleaseTensor(name, "BF16", tuple(shape), key=key)


def _norm(name: str, size: int) -> ReleaseTensor:
    return ReleaseTensor(name, "BF16", (size,), mean=1.0, std=NORM_STD)


def _deepseek_layer(c: dict, i: int) -> list[ReleaseTensor]:
    """One DeepSeek-V3 decoder layer: MLA attention, then a dense MLP (i < first_k_dense_replace) or MoE."""
    p, h = f"model.layers.{i}", c["hidden_size"]
    heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kv_rank, q_rank = c["kv_lora_rank"], c.get("q_lora_rank")
    out = [_norm(f"{p}.input_layernorm.weight", h)]
    if q_rank:
        out += [_w(f"{p}.self_attn.q_a_proj.weight", q_rank, h), _norm(f"{p}.self_attn.q_a_layernorm.weight", q_rank),
                _w(f"{p}.self_attn.q_b_proj.weight", heads * (nope + rope), q_rank)]
    else:
        out.append(_w(f"{p}.self_attn.q_proj.weight", heads * (nope + rope), h))
    out += [_w(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_rank + rope, h),
            _norm(f"{p}.self_attn.kv_a_layernorm.weight", kv_rank),
            _w(f"{p}.self_attn.kv_b_proj.weight", heads * (nope + v), kv_rank),
            _w(f"{p}.self_attn.o_proj.weight", h, heads * v),
            _norm(f"{p}.post_attention_layernorm.weight", h)]
    moe = (c.get("n_routed_experts") and i >= c["first_k_dense_replace"] and i % c.get("moe_layer_freq", 1) == 0)
    if not moe:
        inter = c["intermediate_size"]
        return out + [_w(f"{p}.mlp.gate_proj.weight", inter, h), _w(f"{p}.mlp.up_proj.weight", inter, h),
                      _w(f"{p}.mlp.down_proj.weight", h, inter)]
    experts, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    out += [_bf16(f"{p}.mlp.gate.weight", experts, h),
            ReleaseTensor(f"{p}.mlp.gate.e_score_correction_bias", "F32", (experts,), std=BIAS_STD)]
    for e in range(experts):
        out += [_w(f"{p}.mlp.experts.{e}.gate_proj.weight", inter, h), _w(f"{p}.mlp.experts.{e}.up_proj.weight", inter, h),
                _w(f"{p}.mlp.experts.{e}.down_proj.weight", h, inter)]
    shared = inter * c["n_shared_experts"]
    if shared:
        out += [_w(f"{p}.mlp.shared_experts.gate_proj.weight", shared, h),
                _w(f"{p}.mlp.shared_experts.up_proj.weight", shared, h),
                _w(f"{p}.mlp.shared_experts.down_proj.weight", h, shared)]
    return out


def _deepseek_tensors(c: dict) -> Iterator[ReleaseTensor]:
    h, vocab, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    yield _bf16("model.embed_tokens.weight", vocab, h)
    for i in range(layers):
        yield from _deepseek_layer(c, i)
    yield _norm("model.norm.weight", h)
    yield _bf16("lm_head.weight", vocab, h)
    for i in range(layers, layers + c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{i}"
        yield _bf16(f"{p}.embed_tokens.weight", vocab, h, key="model.embed_tokens.weight")
        yield _norm(f"{p}.enorm.weight", h)
        yield _norm(f"{p}.hnorm.weight", h)
        yield _bf16(f"{p}.eh_proj.weight", h, 2 * h)
        yield from _deepseek_layer(c, i)
        yield _norm(f"{p}.shared_head.norm.weight", h)
        yield _bf16(f"{p}.shared_head.head.weight", vocab, h, key="lm_head.weight")


def _qwen3_tensors(c: dict) -> Iterator[ReleaseTensor]:
    h, vocab, hd = c["hidden_size"], c["vocab_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield _bf16("model.embed_tokens.weight", vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield _norm(f"{p}.input_layernorm.weight", h)
        yield _w(f"{p}.self_attn.q_proj.weight", q, h)
        yield _w(f"{p}.self_attn.k_proj.weight", kv, h)
        yield _w(f"{p}.self_attn.v_proj.weight", kv, h)
        yield _w(f"{p}.self_attn.o_proj.weight", h, q)
        yield _norm(f"{p}.self_attn.q_norm.weight", hd)
        yield _norm(f"{p}.self_attn.k_norm.weight", hd)
        yield _norm(f"{p}.post_attention_layernorm.weight", h)
        sparse = (i not in c.get("mlp_only_layers", []) and c["num_experts"] > 0
                  and (i + 1) % c.get("decoder_sparse_step", 1) == 0)
        if sparse:
            inter = c["moe_intermediate_size"]
            yield _bf16(f"{p}.mlp.gate.weight", c["num_experts"], h)
            for e in range(c["num_experts"]):
                yield _w(f"{p}.mlp.experts.{e}.gate_proj.weight", inter, h)
                yield _w(f"{p}.mlp.experts.{e}.up_proj.weight", inter, h)
                yield _w(f"{p}.mlp.experts.{e}.down_proj.weight", h, inter)
        else:
            inter = c["intermediate_size"]
            yield _w(f"{p}.mlp.gate_proj.weight", inter, h)
            yield _w(f"{p}.mlp.up_proj.weight", inter, h)
            yield _w(f"{p}.mlp.down_proj.weight", h, inter)
    yield _norm("model.norm.weight", h)
    if not c.get("tie_word_embeddings"):
        yield _bf16("lm_head.weight", vocab, h)


def plan_shards(tensors: list[ReleaseTensor], shard_bytes: int) -> list[list[ReleaseTensor]]:
    """The tensors in shards of at most `shard_bytes` (a larger tensor alone), in order; with FP8, at least
    one `weight_scale_inv` sits in another shard than its weight, as happens in the DeepSeek-V3 release.

    When no shard boundary falls between a weight and its scale by itself, the scale of the last FP8
    weight of the first shard that has one moves to the start of the next shard.
    """
    shards: list[list[ReleaseTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    where = {t.name: i for i, shard in enumerate(shards) for t in shard}
    scales = [t for t in tensors if t.kind == "scale"]
    if len(shards) > 1 and scales and all(where[s.name] == where[s.of] for s in scales):
        for i, shard in enumerate(shards[:-1]):
            movable = [t for t in shard if t.kind == "scale"]
            if movable:
                shard.remove(movable[-1])
                shards[i + 1].insert(0, movable[-1])
                break
    return shards


def shard_file_name(family: str, index: int, count: int) -> str:
    """The release's shard file name: DeepSeek-V3 writes the count with six digits
    (`model-00001-of-000163.safetensors`), Qwen3 with five (`model-00001-of-00016.safetensors`)."""
    width = 6 if family == "deepseek-v3" else 5
    return f"model-{index:05d}-of-{count:0{width}d}.safetensors"


class _Writer:
    """Writes buffers to files on a thread of its own, so that drawing the next chunk overlaps the write."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=6)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fh, data = item
            try:
                if self._error is None:
                    if data is None:
                        fh.close()
                    else:
                        fh.write(data)
            except BaseException as err:  # kept, raised in the caller's thread
                self._error = err

    def put(self, fh, data) -> None:
        """Queue `data` for `fh` (None closes it); raises a write error met so far."""
        if self._error is not None:
            raise self._error
        self._queue.put((fh, data))

    def finish(self) -> None:
        """Wait for every queued write; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _header(tensors: list[ReleaseTensor]) -> bytes:
    """A safetensors header for `tensors` in this order (8-byte length, JSON padded to 8 bytes)."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        meta[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_CONFIGURATION_STUB = '''"""Stand-in for the release's `configuration_deepseek.py` (written by zenith-merge's release_layout).

DeepSeek ships its own configuration code beside the weights and names it in config.json's
`auto_map`; this file is not DeepSeek's. It only makes the names resolve (to transformers' own
DeepseekV3Config) for a loader run with trust_remote_code=True.
"""

from transformers import DeepseekV3Config as _TransformersDeepseekV3Config


class DeepseekV3Config(_TransformersDeepseekV3Config):
    """transformers' DeepseekV3Config under the name the release's auto_map uses."""
'''


_MODELING_STUB = '''"""Stand-in for the release's `modeling_deepseek.py` (written by zenith-merge's release_layout).

DeepSeek ships its own modelling code beside the weights and names it in config.json's `auto_map`;
this file is not DeepSeek's. Its classes are transformers' own DeepSeek-V3 classes under the names
the release's auto_map uses, so a loader run with trust_remote_code=True finds them.
"""

from transformers import DeepseekV3ForCausalLM as _CausalLM
from transformers import DeepseekV3Model as _Model

from .configuration_deepseek import DeepseekV3Config


class DeepseekV3Model(_Model):
    """transformers' DeepseekV3Model, configured by this folder's DeepseekV3Config."""

    config_class = DeepseekV3Config


class DeepseekV3ForCausalLM(_CausalLM):
    """transformers' DeepseekV3ForCausalLM, configured by this folder's DeepseekV3Config."""

    config_class = DeepseekV3Config
'''


def write_release_checkpoint(folder: str | Path, family: str, *, overrides: dict[str, Any] | None = None,
                             fp8: bool | None = None, seed: int = 0, parent_seed: int | None = None,
                             child_seed: int | None = None, child_delta: float = 0.02,
                             shard_bytes: int | None = None, tokenizer: bool = True) -> Path:
    """Write a `family` ("deepseek-v3" or "qwen3-moe") checkpoint in the release layout into `folder`; return it.

    config.json holds the release's values updated by `overrides` (release_config); the weights are
    every tensor the release has, named and shaped as on disk (release_tensors), in shards of at most
    `shard_bytes` (default: about the release's) named as the release names them, with
    model.safetensors.index.json (metadata.total_size: the tensors' bytes). fp8 (default: the
    release's own format) writes the quantisable projections as float8_e4m3fn with float32
    `weight_scale_inv`, at least one of them in another shard than its weight; fp8=False writes their
    dequantisation in BF16. DeepSeek-V3 gets the custom-code files its auto_map names (short
    stand-ins, not DeepSeek's). tokenizer=True copies the release tokenizer and generation config.

    Values: `seed` draws them; with `parent_seed`, the checkpoint is a child of the checkpoint that
    `parent_seed` draws: its values plus `child_delta` x (their typical magnitude) x unit-variance
    noise drawn from `child_seed` (default: `seed`). The same arguments give the same bytes; memory stays
    bounded (a few tens of MB) whatever the size. `folder` must not exist or be empty.
    """
    import torch

    _check_family(family)
    fp8 = _fp8_default(family, fp8)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ZenithError(f"{folder}: not empty; write_release_checkpoint writes only into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = release_config(family, overrides, fp8=fp8)
    tensors = release_tensors(family, config, fp8=fp8)
    shards = plan_shards(tensors, shard_bytes or DEFAULT_SHARD_BYTES[family])
    if parent_seed is None:
        seeds = Seeds(seed)
    else:
        seeds = Seeds(parent_seed, seed if child_seed is None else child_seed, float(child_delta))
    values = Values(seeds)
    weight_map: dict[str, str] = {}
    writer = _Writer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its small element-wise ops run fastest on one thread; the writer has the other
    try:
        for i, shard in enumerate(shards):
            name = shard_file_name(family, i + 1, len(shards))
            ordered = sorted(shard, key=lambda t: (-DTYPE_BYTES[t.dtype], t.name))  # as safetensors orders them
            fh = (folder / name).open("wb")
            writer.put(fh, _header(ordered))
            for t in ordered:
                for chunk in values.chunks(t):
                    writer.put(fh, chunk)
                weight_map[t.name] = name
            writer.put(fh, None)
    finally:
        torch.set_num_threads(threads)
        writer.finish()
    total = sum(t.nbytes for t in tensors)
    _write_json(folder / "config.json", config)
    if family == "deepseek-v3":
        (folder / "configuration_deepseek.py").write_text(_CONFIGURATION_STUB)
        (folder / "modeling_deepseek.py").write_text(_MODELING_STUB)
    if tokenizer:
        source = release_tokenizer(RELEASE_TOKENIZERS_OF[family])
        for file in TOKENIZER_FILES:
            shutil.copyfile(source / file, folder / file)
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return folder


def release_fixture(name: str) -> Path:
    """The folder of small release-layout fixture `name` (RELEASE_FIXTURES), built on first use.

    It lives in `cache_root()/release-<key>/<name>`, the key hashing this module's, release_configs',
    release_values' and release_tokenizers' code and the versions of numpy, torch, safetensors and the
    tokenizer packages; built into a temporary folder and renamed, safe across processes.
    """
    from .cache import cache_root

    if name not in RELEASE_FIXTURES:
        raise ZenithError(f"unknown release fixture {name!r}; fixtures: {', '.join(RELEASE_FIXTURES)}")
    args = dict(RELEASE_FIXTURES[name])
    release_tokenizer(RELEASE_TOKENIZERS_OF[args["family"]])  # outside the fixture's lock
    key = fingerprint(("release_tokenizers", "release_configs", "release_values", "release_layout"),
                      ("numpy", "torch", "safetensors"))
    files = ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES)
    return ensure_built(cache_root() / f"release-{key}", name,
                        lambda tmp: write_release_checkpoint(tmp, shard_bytes=SMALL_SHARD_BYTES, **args), files)
