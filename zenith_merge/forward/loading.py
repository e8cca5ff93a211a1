"""Loading a source model for forward passes in bounded memory: transformers and accelerate place the weights
(`device_map`, `max_memory`, disk offload read back from the safetensors files), bitsandbytes may hold the
linear layers in 8 bits, block-FP8 checkpoints load as stored, and freed memory goes back to the system.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import CalibrationError, CheckpointError


def bnb_8bit_unavailable() -> str | None:
    """Why bitsandbytes 8-bit layers cannot run here, or None if they can.

    A real check, not a version sniff: it builds one `Linear8bitLt` on the device the
    calibration would use and runs a forward pass, because bitsandbytes imports fine on
    machines whose backend (CUDA or its CPU kernels) is missing.
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a backend that fails while importing
        return f"bitsandbytes cannot be imported: {exc}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        layer = bnb.nn.Linear8bitLt(8, 4, bias=False, has_fp16_weights=False).to(device)
        dtype = torch.float16 if device == "cuda" else torch.float32
        out = layer(torch.randn(2, 8, device=device, dtype=dtype))
        if out.shape != (2, 4) or not torch.isfinite(out).all():
            return f"bitsandbytes 8-bit matmul on {device} returned a bad result"
    except Exception as exc:
        return f"bitsandbytes has no working 8-bit matmul on {device}: {type(exc).__name__}: {exc}"
    return None


def load_for_calibration(
    path: str | Path,
    *,
    load_in_8bit: bool = False,
    max_memory: Mapping[str | int, int | str] | None = None,
    offload_dir: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a causal LM and its tokenizer for forward passes only, with accelerate's big-model placement.

    Why: calibration needs activations of models that may not fit in memory. Weights are placed by
    `device_map="auto"` within `max_memory` (e.g. `{0: "70GiB", "cpu": "100GiB"}`); what does not fit
    is offloaded to disk (`offload_dir`, a temporary folder removed with the model when not given)
    and streamed in layer by layer. Without CUDA and without `max_memory` everything goes to the CPU.
    `load_in_8bit` stores the linear layers as bitsandbytes int8 (CPU or CUDA); modules that accelerate
    offloads then stay in float32 (bitsandbytes cannot offload int8 weights). `dtype` defaults to
    float32 on CPU and the checkpoint's own dtype on CUDA. With `max_memory`, the process's large heap
    blocks also go back to the system when freed (`fix_mmap_threshold`). Returns `(model, tokenizer)`,
    model in eval mode; raises CalibrationError naming the folder when it cannot load.
    `dtype="stored"` keeps the checkpoint's own dtype (bfloat16 halves the memory of float32 and runs
    faster on most CPUs), except float16 on CPU, which becomes float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CalibrationError(f"{path}: not a model folder (no config.json)")
    cuda = torch.cuda.is_available()
    if dtype == "stored":
        dtype = stored_dtype(path, cuda=cuda)
    kwargs: dict = {
        "low_cpu_mem_usage": True,
        "dtype": dtype if dtype is not None else ("auto" if cuda else torch.float32),
        "device_map": "auto" if (cuda or max_memory is not None) else "cpu",
    }
    if max_memory is not None:
        kwargs["max_memory"] = dict(max_memory)
        fix_mmap_threshold()
    if not cuda and _has_experts(path):
        # the reference loop over experts: transformers' grouped matmul on CPU needs 16-byte strides,
        # which small bf16 experts (or odd sizes) do not have, and is no faster for a few prompts
        kwargs["experts_implementation"] = "eager"
    temp_dir = None
    if offload_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="zenith-offload-")
        offload_dir = temp_dir
    kwargs["offload_folder"] = str(offload_dir)
    if load_in_8bit:
        if not cuda and max_memory is not None:
            # accelerate's dispatch of a partly offloaded int8 model asks for an accelerator device
            _remove(temp_dir)
            raise CalibrationError(f"{path}: load_in_8bit=True with max_memory (offload) needs CUDA; on CPU use "
                                   f"either 8-bit or max_memory, not both")
        reason = bnb_8bit_unavailable()
        if reason is not None:
            _remove(temp_dir)
            raise CalibrationError(f"{path}: load_in_8bit=True but {reason}; load without 8-bit "
                                   f"(use max_memory to offload instead)")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=max_memory is not None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with _checkpoints_read_not_mapped(), block_fp8_loaded_as_read(path):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except CalibrationError:
        _remove(temp_dir)
        raise
    except Exception as exc:
        _remove(temp_dir)
        raise CalibrationError(f"{path}: cannot load for calibration: {type(exc).__name__}: {exc}") from exc
    if not tokenizer.is_fast:
        _remove(temp_dir)
        raise CalibrationError(f"{path}: the tokenizer is not a fast tokenizer; calibration needs character offsets")
    model.eval()
    _own_buffers(model)
    if load_in_8bit:
        _flatten_int8_inputs(model)
        _check_forward(model, path)
    if temp_dir is not None:
        # offloaded weights are read from this folder on every forward pass: keep it as long as the model
        weakref.finalize(model, _remove, temp_dir)
    return model, tokenizer


@contextlib.contextmanager
def block_fp8_loaded_as_read(path: Path) -> Iterator[None]:
    """While loading a block-FP8 checkpoint, have transformers dequantise each weight as our reader does.

    Why: where transformers dequantises (on CPU), it derives the block from the scale grid
    (rows // scale_rows). A weight whose size is not a multiple of the block then gets its scales
    on the wrong rows: the demos' kv_b_proj (192 rows in 2 blocks of 128) loads 12% off. DeepSeek-V3's
    kv_a_proj_with_mqa (576 rows in 5 blocks) is refused outright. Here each weight is
    dequantised with the config's block (`kernels.fp8.dequantize`: ragged edges cut, rounded once to
    BF16). The forward passes then read the values the merge reads, and an FP8 parent calibrates
    exactly as its BF16 cast does. Where transformers keeps the weights in FP8 (CUDA), nothing
    changes.
    """
    from ..io.reader import block_fp8_scheme
    from ..kernels.fp8 import dequantize, scale_shape

    try:
        block = block_fp8_scheme(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    except (ImportError, OSError, ValueError, CheckpointError):  # no FP8 dequantiser here, or not our FP8 scheme
        block = None
    if block is None or not hasattr(Fp8Dequantize, "_dequantize_one"):
        yield
        return
    theirs = Fp8Dequantize._dequantize_one

    def as_read(self, quantized, scales, output_dtype=None):
        if (quantized.dtype != torch.float8_e4m3fn or quantized.dim() != 2
                or tuple(scales.shape) != scale_shape(tuple(quantized.shape), block)):
            return theirs(self, quantized, scales, output_dtype)
        weight = dequantize(quantized, scales, block)
        return weight if output_dtype is None else weight.to(output_dtype)

    Fp8Dequantize._dequantize_one = as_read
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = theirs


@contextlib.contextmanager
def _checkpoints_read_not_mapped() -> Iterator[None]:
    """While loading, have transformers read the safetensors shards with `pread` instead of mapping them.

    Why: transformers maps every shard and reads each tensor through the mapping; every page it reads
    (the whole checkpoint, as the weights are offloaded or copied) stays in the process's RSS until
    loading ends, so the peak of an offloaded load grew with the model (measured: +267 MiB of mapped
    shard pages from a 2-layer to an 8-layer synthetic base, all other memory flat). Read with `pread`,
    a tensor's bytes are the tensor's own memory, freed once it is placed or offloaded. safetensors'
    `backend="pread"` is the loader transformers itself uses on Windows and MPS.
    """
    import transformers.modeling_utils as modeling_utils

    mapped_open = getattr(modeling_utils, "safe_open", None)
    if mapped_open is None:  # another transformers layout: leave its loader alone
        yield
        return

    def pread_open(*args, **kwargs):
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return mapped_open(*args, **kwargs)

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = mapped_open


def _has_experts(path: Path) -> bool:
    import json

    from ..architectures import ARCHITECTURES

    config = json.loads((Path(path) / "config.json").read_text())
    arch = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    return arch is not None and arch.moe_layer_rule != "none"


def _own_buffers(model) -> None:
    """Give every CPU buffer memory of its own.

    Why: transformers may load a small buffer (DeepSeek's `e_score_correction_bias`) as a view of
    the memory-mapped checkpoint, and accelerate does not offload buffers, so the whole shard's
    mapping stays open while the model lives, with every page read while loading counted in RSS
    (measured: 334 MiB more on an 8-layer synthetic base than on a 2-layer one).
    """
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type == "cpu":
                module._buffers[name] = buf.clone()


def release_memory() -> None:
    """Hand freed memory back to the system between calibration passes (glibc keeps freed heap otherwise)."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (it has `malloc_trim` and `mallopt`), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


MMAP_THRESHOLD = 128 * 1024  # glibc's own starting threshold, here kept fixed
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, <malloc.h>


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every heap block of at least `threshold` bytes by its own mapping, for the rest of
    the process, so that it goes back to the system as soon as it is freed. Returns False where there is
    no glibc (nothing changed).

    Why: glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after which
    the forward passes' activations, of a different size for each passage, come from the heap and
    leave holes there. The holes grew with every pass over the text, so the calibration's peak grew
    with the number of layer groups, that is, with the depth of the model (measured on the 2- and
    8-layer synthetic models of bench/calibration_memory.py: free heap 37 -> 115 MiB over 7 groups,
    in-use heap flat). A fixed threshold turns the dynamic rule off; it is what
    `MALLOC_MMAP_THRESHOLD_=131072` in the environment does, set here only when the caller asked for
    bounded memory.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def stored_dtype(path: Path, *, cuda: bool) -> torch.dtype:
    """The dtype a checkpoint's config says its weights have (float16 on CPU: float32)."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
    return torch.float32 if dtype == torch.float16 and not cuda else dtype


def _flatten_int8_inputs(model) -> None:
    """Let bitsandbytes int8 layers take inputs of any rank.

    Why: bitsandbytes' int8 matmul flattens 3-D inputs only, and its CPU quantiser takes row
    statistics over dim 1, so a 4-D input (DeepSeek-V3's `kv_b_proj` sees (batch, 1, seq, rank))
    fails, or with a length-1 axis broadcasts into a wrong shape. A linear layer is token-wise, so
    running it on the (tokens, features) view and restoring the shape is exactly the same map.
    """
    import bitsandbytes as bnb

    def flatten(module, args):
        x = args[0]
        if x.dim() <= 2:
            return None
        module._zenith_lead_shape = x.shape[:-1]
        return (x.reshape(-1, x.shape[-1]), *args[1:])

    def restore(module, args, output):
        lead = module.__dict__.pop("_zenith_lead_shape", None)
        return output if lead is None else output.reshape(*lead, output.shape[-1])

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.register_forward_pre_hook(flatten)
            module.register_forward_hook(restore)


def _check_forward(model, path: Path) -> None:
    """Run three tokens through a freshly quantised model, so a backend that cannot run fails at load time."""
    ids = torch.tensor([[1, 2, 3]], dtype=torch.long, device=input_device(model)) % model.config.vocab_size
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    except Exception as exc:
        raise CalibrationError(f"{path}: loaded in 8-bit but a forward pass fails here: "
                               f"{type(exc).__name__}: {exc}; load without 8-bit") from exc
    if logits.shape[:2] != (1, 3) or not torch.isfinite(logits).all():
        raise CalibrationError(f"{path}: loaded in 8-bit but a forward pass gives non-finite or misshapen logits "
                               f"{tuple(logits.shape)}; load without 8-bit")


def _remove(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def input_device(model) -> torch.device:
    """Where the token ids go: the embedding's device (accelerate moves everything after it)."""
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

