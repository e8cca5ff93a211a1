"""The smoke test's checks that run the model (loading, generation, thinking, bits per byte), under a cap.

`plan_load` decides from the headers how a model runs within `max_memory`:
- "memory": its float32 weights (bfloat16 for block FP8) fit, with what loading them costs on the way
  (LOAD_FACTOR): loaded whole on the CPU, as a user loads it, with transformers' own account of missing and
  unused weights;
- "stream": larger, and an architecture of the tables: transformers' model on the meta device, each module
  reading its weights from the checkpoint as it runs (`smoke_stream`); the peak is the interpreter plus about
  twice the largest tensor but the vocabulary matrices (read by rows and slabs), whatever the model's size;
- "offload": larger, another architecture: accelerate's disk offload in bfloat16 (reading shards with
  `pread`), the cap less what bringing one module in costs resident.
Where even that does not fit, every check that needs the model is skipped with a note saying so, rather than
failing or swapping.

Read from disk, each forward pass reads every weight it uses once, so the plain and chat prompts are generated
in one left-padded batch (one pass per new token for all of them), fewer new tokens each, and the thinking
check reads the /think reply the generation check produced instead of generating again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZenithError
from .smoke_checks import Skipped, expected_tensor_names, extra_layers_note, is_zenith_output

DEFAULT_MAX_MEMORY = 2 * 2**30  # the smoke test's cap on model weights in memory (--max-memory)
MAX_MEMORY_ENV = "ZENITH_SMOKE_MAX_MEMORY"  # the default cap, where set (bytes, or "2GB", "512MiB")
DEFAULT_PROMPTS = ("def fibonacci(n):", "Question: what is 12 + 7?")
CHAT_PROMPTS = ("/think What is 17 + 25?", "/no_think What is 17 + 25?")
NEW_TOKENS = 16  # generated per prompt by a model in memory
STREAMED_NEW_TOKENS = 8  # by a model read from disk (each token reads every weight it uses once)
SOURCE_LIMIT = 2 * 2**30  # sources up to this size on disk are loaded for comparison (thinking, quality)
LOAD_FACTOR = 1.5  # loading a model whole peaks at about this times its weights (measured: 1.4x, block FP8)
STREAM_FACTOR = 3  # peak memory of streaming one tensor (loading it for offload), in tensor sizes
FUSED_STREAM_FACTOR = 2  # the same for a layer's routed experts, which transformers 5 fuses while loading
LOGITS_BUDGET = 256 * 2**20  # float32 logits (and their log-softmax) one bits-per-byte batch may hold
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str | int) -> int:
    """Bytes from '2GB', '1.5GiB', '512MB' or a plain number of bytes; ValueError otherwise."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"not a memory size: {text!r} (e.g. 2GB, 512MiB or a number of bytes)")
    return int(float(number) * _UNITS[unit])


def default_max_memory() -> int:
    """The smoke test's cap when none is given: $ZENITH_SMOKE_MAX_MEMORY, else DEFAULT_MAX_MEMORY (2 GiB)."""
    value = os.environ.get(MAX_MEMORY_ENV)
    return parse_memory(value) if value else DEFAULT_MAX_MEMORY


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@dataclass(frozen=True)
class LoadPlan:
    """How a model is loaded under a cap, decided from the headers before any weight is read.

    `mode`: "memory" (LOAD_FACTOR x the float32 weights fit: loaded whole, as a user loads them), "stream"
    (transformers' model on the meta device, each module reading its weights as it runs: `smoke_stream`) or
    "offload" (accelerate's disk offload, for architectures not streamed). `float32_bytes`: the weights as
    loaded in float32 (block FP8 as bfloat16); `bf16_bytes`: in bfloat16; `largest`, `largest_bytes`: what
    costs most memory to bring in at once (streamed: the largest tensor but the vocabulary matrices, read by
    rows; offloaded: a tensor, or a layer's routed experts, which transformers 5 fuses), in bfloat16, and
    `stream_bytes` that cost at its peak; `resident_bytes`: what accelerate may keep in memory when
    offloading."""

    cap: int
    mode: str
    float32_bytes: int
    bf16_bytes: int
    largest: str
    largest_bytes: int
    stream_bytes: int
    fp8: bool

    @property
    def offload(self) -> bool:
        """True when the weights are read from disk as the model runs (streamed or offloaded)."""
        return self.mode != "memory"

    @property
    def resident_bytes(self) -> int:
        """Offloaded: the weights accelerate may keep in memory (the cap less bringing one module in)."""
        return max(0, self.cap - self.stream_bytes)

    def describe(self) -> str:
        """One line for the report: dtype and where the weights live."""
        if self.mode == "memory":
            return f"{'bfloat16' if self.fp8 else 'float32'}, all {_mb(self.float32_bytes)} in memory"
        if self.mode == "stream":
            return (f"bfloat16 streamed from disk within max_memory {_mb(self.cap)}: each of the "
                    f"{_mb(self.bf16_bytes)} of weights read as its module runs (largest {self.largest}, "
                    f"{_mb(self.largest_bytes)})")
        return (f"bfloat16 within max_memory {_mb(self.cap)}: up to {_mb(self.resident_bytes)} resident, the "
                f"rest of {_mb(self.bf16_bytes)} offloaded to disk by accelerate (largest module "
                f"{self.largest}, {_mb(self.largest_bytes)})")


def plan_load(folder: Path, cap: int, *, stream: bool = True) -> LoadPlan:
    """The LoadPlan of `folder` under `cap` bytes; raises Skipped when the model cannot run within the cap.

    Streamed (`stream` and an architecture `smoke_stream` runs), the peak is the largest tensor read at once
    (its stored bytes and the bfloat16 result: about 2x; the vocabulary matrices are read by rows, so they do
    not count) plus a slab of the head. Offloaded by accelerate, bringing a module in costs a multiple of its
    size at the peak of loading (measured with transformers 5.25 on bfloat16 checkpoints: a tensor about 3x,
    its read buffer, the tensor and a copy; a layer's routed experts about 2x, the experts read and the fused
    result), and what is left of the cap holds resident weights."""
    from ..architectures import ARCHITECTURES, classify
    from ..io.reader import Checkpoint
    from .smoke_stream import SLAB_BYTES, STREAMABLE

    with Checkpoint.open(folder, check_shapes=False) as ckpt:
        name = (ckpt.config.get("architectures") or [None])[0]
        arch = ARCHITECTURES.get(name)
        fp8 = ckpt.fp8_block is not None
        expected = expected_tensor_names(ckpt.config, ckpt.names())
        float32 = bf16 = 0
        units: dict[str, int] = {}  # offloaded: what accelerate brings in at once
        tensors: dict[str, int] = {}  # streamed: what a module reads at once
        fused: set[str] = set()
        head = 0
        for tensor in ckpt.names():
            if expected is not None and expected.extra_layer_of(tensor) is not None:
                continue  # extra (MTP) layers: transformers does not load them
            n = 1
            for d in ckpt.info(tensor).shape:
                n *= d
            float32 += n * (2 if fp8 else 4)
            bf16 += n * 2
            tid = classify(arch, tensor) if arch is not None else None
            key = tensor
            if tid is not None and tid.tensor_class == "routed_experts":
                key = f"layer {tid.layer}'s routed experts"
                fused.add(key)
            units[key] = units.get(key, 0) + n * 2
            if tid is None or tid.role not in ("embed", "lm_head"):
                tensors[tensor] = n * 2
            elif tid.role == "lm_head" or (tid.role == "embed" and not head):
                head = n * 2  # read in slabs of at most SLAB_BYTES
    mode = "stream" if stream and name in STREAMABLE else "offload"
    mode = "memory" if LOAD_FACTOR * float32 <= cap else mode
    if mode == "offload":
        cost = {k: v * (FUSED_STREAM_FACTOR if k in fused else STREAM_FACTOR) for k, v in units.items()}
        sizes = units
    else:
        cost = {k: 2 * v + min(SLAB_BYTES, head) for k, v in tensors.items()}
        sizes = tensors
    largest = max(cost, key=cost.get) if cost else ""
    plan = LoadPlan(cap, mode, float32, bf16, largest, sizes.get(largest, 0), cost.get(largest, 0), fp8)
    if plan.offload and plan.stream_bytes > cap:
        what = "tensor" if mode == "stream" else "module"
        raise Skipped(f"cannot run within max_memory {_mb(cap)}: its largest {what} ({largest}, "
                      f"{_mb(plan.largest_bytes)} in bfloat16) needs about {_mb(plan.stream_bytes)} to "
                      f"bring in; raise --max-memory to run it")
    return plan


def load_model(folder: Path, *, max_memory: int | None = None, plan: LoadPlan | None = None):
    """The model and tokenizer as a user loads them (AutoModelForCausalLM, no custom code), with transformers'
    own account of missing, unexpected and mis-shaped weights: `(model, tokenizer, info)`.

    Weights whose float32 size fits `max_memory` (default: half this machine's RAM) load on the CPU; a larger
    model runs streamed from disk (`smoke_stream`), or for an architecture not streamed, in bfloat16 with
    accelerate's offload to a temporary folder removed with the model, as `plan_load` decides (raising Skipped
    when it cannot run within the cap). With a GPU, accelerate places the weights itself. `model._zenith_load`
    is the LoadPlan used.
    """
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..forward.loading import (
        _checkpoints_read_not_mapped,
        _has_experts,
        _own_buffers,
        block_fp8_loaded_as_read,
        fix_mmap_threshold,
    )
    from ..system import physical_memory

    folder = Path(folder)
    cap = max_memory if max_memory is not None else (physical_memory() or 2**62) // 2
    plan = plan or plan_load(folder, cap)
    cuda = torch.cuda.is_available()
    if plan.mode == "stream" and not cuda:
        from .smoke_stream import stream_model

        model, tok, info = stream_model(folder)
        model._zenith_load = plan
        return model, tok, info
    # without a GPU, block FP8 is dequantised to bfloat16 (as our reader does it): the rest must match it
    kwargs: dict = {"dtype": torch.bfloat16 if plan.fp8 or plan.offload else torch.float32,
                    "output_loading_info": True}
    offload = None
    if cuda or plan.offload:
        offload = tempfile.TemporaryDirectory(prefix="zenith-smoke-offload-")
        host = plan.resident_bytes if plan.offload else plan.cap
        if cuda:  # the GPUs as accelerate finds them; the cap is on this machine's memory
            from accelerate.utils import get_max_memory

            budget = get_max_memory()
            budget["cpu"] = min(budget.get("cpu", host), host)
        kwargs.update(device_map="auto", offload_folder=offload.name,
                      max_memory=budget if cuda else {"cpu": host})
        if not cuda and _has_experts(folder):
            kwargs["experts_implementation"] = "eager"  # as calibration: grouped matmul wants aligned strides
        fix_mmap_threshold()  # freed weights go back to the system at once
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its table of unused weights: check_loading reports them
    try:
        with _checkpoints_read_not_mapped(), block_fp8_loaded_as_read(folder):
            model, info = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if offload is not None:
        _own_buffers(model)
        model._zenith_offload = offload  # the folder lives as long as the model
    model._zenith_load = plan
    return model.eval(), AutoTokenizer.from_pretrained(folder), info


def is_offloaded(model) -> bool:
    """True when some of the model's weights are read from disk on each forward pass (streamed, offloaded)."""
    plan = getattr(model, "_zenith_load", None)
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return (plan is not None and plan.offload) or "disk" in devices


def model_for(folder: Path, loaded: dict, max_memory: int | None = None):
    """The model of `folder`, loaded once per smoke test (`loaded` caches it, or why it could not load)."""
    if "model" not in loaded:
        if "error" in loaded:
            raise loaded["error"] if isinstance(loaded["error"], Skipped) else \
                ZenithError(f"the model did not load ({loaded['error']})")
        try:
            cap = max_memory if max_memory is not None else default_max_memory()
            loaded["model"] = load_model(folder, max_memory=cap)
        except Exception as err:
            loaded["error"] = err
            raise
    return loaded["model"]


def check_loading(folder: Path, loaded: dict, max_memory: int | None = None) -> str:
    """transformers builds the model the config describes and finds each of its weights, with its shape. The
    tensors of extra layers (DeepSeek-V3's MTP module, described by the architecture table) are expected in
    the folder and not loaded by transformers: they pass as such; any other unused or missing weight fails."""
    model, _, info = model_for(folder, loaded, max_memory)
    config = json.loads((folder / "config.json").read_text())
    from ..io.reader import Checkpoint

    with Checkpoint.open(folder, check_shapes=False) as ckpt:
        expected = expected_tensor_names(config, ckpt.names())
    unexpected = sorted(str(k) for k in info.get("unexpected_keys") or [])
    if expected is not None:
        unexpected = [k for k in unexpected if expected.extra_layer_of(k) is None]
    for what, bad in (("missing", sorted(str(k) for k in info.get("missing_keys") or [])),
                      ("not used by the model", unexpected),
                      ("of the wrong shape", sorted(str(k) for k in info.get("mismatched_keys") or []))):
        if bad:
            raise ZenithError(f"{len(bad)} weights {what}: {', '.join(bad[:3])}"
                              + (" ..." if len(bad) > 3 else ""))
    n = getattr(model, "_zenith_parameters", None) or sum(p.numel() for p in model.parameters())
    note = extra_layers_note(expected) if expected is not None else ""
    return (f"{type(model).__name__}, {n / 1e6:.1f}M parameters, every weight found"
            + (f"; {note}" if note else "") + f"; {model._zenith_load.describe()}")


def chat_prompt(tok, message: str) -> str | None:
    """`message` as one user turn through the tokenizer's chat template, ready for the reply (None: no
    template)."""
    if not tok.chat_template:
        return None
    return tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                   add_generation_prompt=True)


def _pad_id(tok) -> int:
    eos = tok.eos_token_id
    return tok.pad_token_id if tok.pad_token_id is not None else eos[0] if isinstance(eos, list) else eos


def greedy(model, tok, text: str, max_new_tokens: int, *, special: bool) -> list[int]:
    """The ids `model` generates greedily after `text` (its logits checked finite first)."""
    return greedy_batch(model, tok, [(text, special)], max_new_tokens)[0]


def greedy_batch(model, tok, prompts: list[tuple[str, bool]], max_new_tokens: int) -> list[list[int]]:
    """The ids `model` generates greedily after each (text, add special tokens) prompt, all in one left-padded
    batch: one forward pass per new token for all prompts (what an offloaded model reads its weights for).
    Every prompt position's logits are checked finite first."""
    import torch

    rows = [tok(text, add_special_tokens=special)["input_ids"] for text, special in prompts]
    width, pad = max(map(len, rows)), _pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, (text, _) in enumerate(prompts):
            if not bool(torch.isfinite(logits[i, width - len(rows[i]):]).all()):
                raise ZenithError(f"non-finite logits for prompt {text!r}")
        del logits
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    new = out[:, width:].tolist()
    stops: set[int] = set()
    for eos in (tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        stops |= set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if len(prompts) > 1:  # a finished row is padded to the batch's length: cut it at its first end token
        new = [r[:next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in new]
    return new


def check_generation(folder: Path, loaded: dict, prompts=DEFAULT_PROMPTS, max_new_tokens: int | None = None,
                     max_memory: int | None = None) -> tuple[str, dict[str, str]]:
    """The loaded model generates greedily with finite logits, on plain prompts (code, maths) and, through
    the chat template, on a /think and a /no_think prompt; no output is one token repeated. A model read from
    disk runs the prompts as one batch, STREAMED_NEW_TOKENS new tokens each (every token is a pass over the
    weights); one in memory, one prompt at a time, NEW_TOKENS each (`max_new_tokens` overrides both)."""
    model, tok, _ = model_for(folder, loaded, max_memory)
    runs = [(p, p, True) for p in prompts]
    runs += [(f"chat: {m}", text, False) for m in CHAT_PROMPTS if (text := chat_prompt(tok, m)) is not None]
    from_disk = is_offloaded(model)
    n = max_new_tokens or (STREAMED_NEW_TOKENS if from_disk else NEW_TOKENS)
    if from_disk:
        generated = greedy_batch(model, tok, [(text, special) for _, text, special in runs], n)
    else:
        generated = [greedy(model, tok, text, n, special=special) for _, text, special in runs]
    samples = {}
    for (label, _, _), new in zip(runs, generated):
        if not new:
            raise ZenithError(f"generated nothing for prompt {label!r}")
        if len(new) >= 4 and len(set(new)) == 1:
            raise ZenithError(f"degenerate output for prompt {label!r}: token {new[0]} "
                              f"({tok.decode(new[:1])!r}) {len(new)} times")
        samples[label] = tok.decode(new, skip_special_tokens=False)
        if label == f"chat: {CHAT_PROMPTS[0]}":
            loaded["think_reply"] = new
    mode = f" in one batch, {n} new tokens each" if from_disk else ""
    return f"{len(runs)} prompts{mode}, {sum(map(len, samples.values()))} characters generated", samples


def opens_thinking(model, tok, message: str = CHAT_PROMPTS[0], reply: list[int] | None = None) -> bool | None:
    """Whether a reply to `message` opens a <think> block: in the rendered prompt or as its first generated
    text (`reply`: ids already generated for it, else 8 are generated); None: no chat template."""
    text = chat_prompt(tok, message)
    if text is None:
        return None
    if text.rstrip().endswith("<think>"):
        return True
    reply = reply[:8] if reply is not None else greedy(model, tok, text, 8, special=False)
    return tok.decode(reply, skip_special_tokens=False).lstrip().startswith("<think>")


def small_sources(folder: Path) -> dict[str, Path]:
    """The plan's sources small enough to load beside the merge, by key (none without a plan)."""
    from ..plan.models import Plan

    if not is_zenith_output(folder):
        return {}
    out = {}
    for key, src in Plan.load(folder).sources.items():
        path = Path(src.path)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None
        size = SOURCE_LIMIT + 1 if size is None else size
        if size <= SOURCE_LIMIT:
            out[key] = path
    return out


def _each_source(folder: Path, max_memory: int | None, skipped: list[str]):
    """(key, model, tokenizer) of each small source that runs within the cap; the others' keys in `skipped`.
    """
    for key, path in small_sources(folder).items():
        try:
            cap = max_memory if max_memory is not None else default_max_memory()
            model, tok, _ = load_model(path, max_memory=cap)
        except Skipped:
            skipped.append(key)
            continue
        yield key, model, tok
        del model


def check_thinking(folder: Path, loaded: dict, max_memory: int | None = None) -> str:
    """Where a source opens <think> for a /think prompt, the merge does too (sources up to SOURCE_LIMIT)."""
    model, tok, _ = model_for(folder, loaded, max_memory)
    merged = opens_thinking(model, tok, reply=loaded.get("think_reply"))
    if merged is None:
        return "no chat template: nothing to check"
    seen: dict[str, bool | None] = {"merge": merged}
    skipped: list[str] = []
    for key, source_model, source_tok in _each_source(folder, max_memory, skipped):
        seen[key] = opens_thinking(source_model, source_tok)
    missing = [k for k, v in seen.items() if v and not merged]
    summary = ", ".join(f"{k} {'yes' if v else 'no' if v is not None else 'no template'}"
                        for k, v in seen.items())
    summary += f" ({', '.join(skipped)} not loaded: over max_memory)" if skipped else ""
    if missing:
        raise ZenithError(f"/think opens <think> in {', '.join(missing)} but not in the merge ({summary})")
    return f"/think opens <think>: {summary}"


def quality_texts(folder: Path, texts: dict[str, str] | None) -> dict[str, str]:
    """The texts quality is measured on: those given, else the demo's held-out code and maths when every
    source is a demo model (their held-out split: never trained or calibrated on)."""
    from ..plan.models import Plan

    if texts:
        return dict(texts)
    if not is_zenith_output(folder):
        return {}
    if not all(s.ref.startswith("demo://") for s in Plan.load(folder).sources.values()):
        return {}
    from ..demo import heldout_text

    return {"code (demo held-out)": heldout_text("code"), "maths (demo held-out)": heldout_text("maths")}


def _bits_per_byte(model, tok, text: str) -> float:
    """bits_per_byte with as many windows per batch as LOGITS_BUDGET allows (8 at most): a 129k vocabulary's
    float32 logits are 130 MB per 256-token window."""
    from ..demo import bits_per_byte

    per_window = 256 * model.config.vocab_size * 4 * 3  # the logits, in float32, and their log-softmax
    return bits_per_byte(model, tok, text, batch_size=max(1, min(8, LOGITS_BUDGET // per_window)))


def check_quality(folder: Path, loaded: dict, texts: dict[str, str] | None, quality: dict,
                  max_memory: int | None = None) -> str:
    """Bits per byte of the merge and of each source small enough to load, on each text (measured, not
    judged); the numbers go into `quality` (model -> text -> bits per byte)."""
    texts = quality_texts(folder, texts)
    if not texts:
        raise Skipped("no text to measure on (give --text NAME=FILE)")
    model, tok, _ = model_for(folder, loaded, max_memory)
    quality["merge"] = {name: _bits_per_byte(model, tok, t) for name, t in texts.items()}
    skipped: list[str] = []
    for key, source_model, source_tok in _each_source(folder, max_memory, skipped):
        quality[key] = {name: _bits_per_byte(source_model, source_tok, t) for name, t in texts.items()}
    return ("; ".join(f"{m}: " + ", ".join(f"{n.split(' ')[0]} {v:.3f}" for n, v in q.items())
                      for m, q in quality.items()) + " bits per byte"
            + (f" ({', '.join(skipped)} not loaded: over max_memory)" if skipped else ""))
