"""The smoke test's checks that read files, not a model: headers, hashes, names and values, streamed.

No check here holds more than one slab of one tensor: `check_finite` reads each weight in slabs of rows
into one reused buffer (block-FP8 weights dequantised slab by slab), so its peak is the interpreter plus
about two slabs, whatever the checkpoint's size; `check_manifest` hashes shards in 16 MiB reads. The names a
checkpoint must hold come from the architecture tables (`expected_tensor_names`): the layers transformers
runs, and the extra layers (DeepSeek-V3's multi-token-prediction module) that it carries but does not run.

A check raises `ZenithError` to fail and `Skipped` where it does not apply to the folder (a folder without a
zenith-merge plan has no planned tensors to compare with); `smoke.run_smoke_test` records either.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZenithError
from ..io.manifest import MANIFEST_FILE, STATE_COMPLETE, read_manifest

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PLAN_FILE = ".zenith/plan.json"  # as plan.PLAN_FILE, without importing the planner for a folder that has none
SLAB_BYTES = 32 * 2**20  # the finite check reads weights in slabs of about this many bytes
HASH_WORKERS = 2  # shards hashed at once (hashlib releases the GIL: one core each)


class Skipped(ZenithError):
    """A check that does not apply to the folder checked; its message is the note the report shows."""


def is_zenith_output(folder: Path) -> bool:
    """True for a folder zenith-merge wrote as a merge (it holds `.zenith/plan.json`): the only kind of folder
    the smoke test writes its reports into."""
    return (Path(folder) / PLAN_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def check_index(folder: Path) -> str:
    """The index names existing shards, and each shard holds exactly the tensors the index gives it (a folder
    with one `model.safetensors` and no index passes when that file's header reads)."""
    from ..io.safetensors_format import read_header

    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if (folder / SINGLE_FILE).is_file():
            return f"{len(read_header(folder / SINGLE_FILE).tensors)} tensors in {SINGLE_FILE} (no index)"
        raise ZenithError(f"{INDEX_FILE} is missing")
    weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    by_file: dict[str, set[str]] = {}
    for tensor, file in weight_map.items():
        by_file.setdefault(file, set()).add(tensor)
    for file, names in sorted(by_file.items()):
        if not (folder / file).is_file():
            raise ZenithError(f"shard {file} named in the index is missing")
        in_file = set(read_header(folder / file).tensors)
        if in_file != names:
            extra, missing = sorted(in_file - names), sorted(names - in_file)
            raise ZenithError(f"{file}: tensors not in the index {extra[:3]}, in the index but absent "
                              f"{missing[:3]}")
    stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in by_file)
    if stray:
        raise ZenithError(f"shards not named in the index: {stray}")
    return f"{len(weight_map)} tensors in {len(by_file)} shards"


def check_manifest(folder: Path) -> str:
    """The folder is complete (its manifest's last write said so: an interrupted merge or cast fails here,
    whatever else it holds), and every file the manifest records, shards and side files, has the sha256
    recorded when it was written (hashed two at a time). A folder zenith-merge did not write (no `.zenith/`)
    has no record: skipped; a merge without its manifest fails."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        if is_zenith_output(folder):
            raise ZenithError(f"{MANIFEST_FILE} is missing")
        raise Skipped(f"no {MANIFEST_FILE}: not written by zenith-merge, no sha256s recorded")
    manifest = read_manifest(folder)
    if manifest.get("state") != STATE_COMPLETE:
        raise ZenithError(f"{MANIFEST_FILE}: state {manifest.get('state')!r}, not complete: the merge was "
                          f"interrupted (or failed) before its last step; rerun it with --resume")
    files = {**manifest["shards"], **manifest.get("files", {})}
    names = sorted(files)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ZenithError(f"{missing[0]}: recorded in the manifest, missing from the folder")
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        digests = dict(zip(names, pool.map(lambda n: _sha256(folder / n), names)))
    for name in names:
        if digests[name] != files[name]["sha256"]:
            raise ZenithError(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    return f"complete; {len(manifest['shards'])} shards and {len(names) - len(manifest['shards'])} other files verified"


def check_planned_tensors(folder: Path) -> str:
    """Every tensor of the plan is present with the planned shape and dtype, and nothing else (skipped without
    a plan: an `fp8-cast` output or a plain Hugging Face folder)."""
    from ..io.reader import Checkpoint
    from ..plan.models import Plan

    if not is_zenith_output(folder):
        raise Skipped(f"no {PLAN_FILE}: not a zenith-merge merge, nothing planned to compare with")
    plan = Plan.load(folder)
    with Checkpoint.open(folder) as ckpt:
        names = set(ckpt.names())
        names |= {f"{n}_scale_inv" for n in names if ckpt.is_fp8(n)}  # block-FP8 scales, as written
        planned = {t.name: t for t in plan.tensors}
        if names != set(planned):
            raise ZenithError(f"missing {sorted(set(planned) - names)[:3]}, "
                              f"unplanned {sorted(names - set(planned))[:3]}")
        for name, t in planned.items():
            info = ckpt.stored_info(name)
            if (info.dtype, tuple(info.shape)) != (t.dtype, tuple(t.shape)):
                raise ZenithError(f"{name}: {info.dtype}{list(info.shape)}, planned {t.dtype}{list(t.shape)}")
    return f"{len(planned)} tensors as planned"


@dataclass
class ExpectedNames:
    """A checkpoint's tensor names sorted by what the architecture table says of them.

    `model`: what transformers' model must find (the embeddings, head, final norm and every tensor of the
    config's `num_hidden_layers` layers); `extra`: extra layer -> its tensors (DeepSeek-V3's MTP modules past
    num_hidden_layers: in the release, not run by transformers); `undescribed`: names no role of the table
    matches; `misplaced`: (name, why) for names the table knows in a place the config does not have (a layer
    past the extra ones, an expert past n_routed_experts, an MTP tensor in a decoder layer); `incomplete`:
    extra layer -> the roles of its own it lacks."""

    architecture: str
    depth: int
    model: set[str] = field(default_factory=set)
    extra: dict[int, set[str]] = field(default_factory=dict)
    undescribed: list[str] = field(default_factory=list)
    misplaced: list[tuple[str, str]] = field(default_factory=list)
    incomplete: dict[int, list[str]] = field(default_factory=dict)
    layer_prefix: str = "model.layers.{layer}."

    def extra_layer_of(self, key: str) -> int | None:
        """The extra layer a key (a checkpoint name, or transformers' name for it, such as fused experts'
        `model.layers.61.mlp.experts.gate_up_proj`) belongs to; None for any other key."""
        return next((i for i in self.extra if key.startswith(self.layer_prefix.format(layer=i))), None)


def expected_tensor_names(config: dict, names: list[str]) -> ExpectedNames | None:
    """Sort `names` (a checkpoint's tensors; block-FP8 `_scale_inv` names go with their weight) by the
    architecture table of `config` (see `ExpectedNames`); None for an architecture the tables do not have.

    Why: transformers' DeepSeek-V3 ignores only a hard-coded layer 61 when loading, so the MTP layer of any
    other depth shows up as "unused weights"; the table knows the extra layers by the config's count and the
    checkpoint's names, whatever the depth."""
    from ..architectures import ARCHITECTURES, classify, dim, extra_layer_indices, tensor_name

    arch = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    if arch is None:
        return None
    depth = dim(config, arch, "layers") or 0
    n_experts = dim(config, arch, "n_experts")
    extra_roles = set(arch.extra_layers.roles) if arch.extra_layers is not None else set()
    out = ExpectedNames(arch.name, depth, layer_prefix=arch.layer_module + ".")
    out.extra = {i: set() for i in extra_layer_indices(arch, config, names)}
    for name in names:
        tid = classify(arch, name.removesuffix("_scale_inv"))
        if tid is None:
            out.undescribed.append(name)
        elif tid.expert is not None and n_experts is not None and tid.expert >= n_experts:
            out.misplaced.append((name, f"expert {tid.expert} of {n_experts}"))
        elif tid.layer is None:
            out.model.add(name)
        elif tid.layer < depth:
            if tid.role in extra_roles:
                out.misplaced.append((name, f"{arch.extra_layers.kind} tensor in decoder layer {tid.layer}"))
            else:
                out.model.add(name)
        elif tid.layer in out.extra:
            out.extra[tid.layer].add(name)
        else:
            out.misplaced.append((name, f"layer {tid.layer} past the config's {depth} layers"
                                  + (f" and {len(out.extra)} extra" if out.extra else "")))
    for layer in out.extra:
        lacking = [r for r in sorted(extra_roles) if tensor_name(arch, r, layer) not in out.extra[layer]]
        if lacking:
            out.incomplete[layer] = lacking
    return out


def _names_and_config(folder: Path) -> tuple[dict, list[str]]:
    from ..io.reader import Checkpoint

    with Checkpoint.open(folder, check_shapes=False) as ckpt:
        return dict(ckpt.config), ckpt.names()


def extra_layers_note(expected: ExpectedNames) -> str:
    """'22 tensors of extra layer 61 (not run by transformers)', or '' without extra layers."""
    if not expected.extra:
        return ""
    n = sum(map(len, expected.extra.values()))
    layers = ", ".join(map(str, sorted(expected.extra)))
    plural = "s" if len(expected.extra) > 1 else ""
    return f"{n} tensors of extra layer{plural} {layers} (not run by transformers)"


def check_tensor_names(folder: Path) -> str:
    """Every tensor is one the architecture table describes, in a layer the config has: a decoder layer, or an
    extra (MTP) layer that carries all of its own tensors. Headers only; works without a plan."""
    config, names = _names_and_config(folder)
    expected = expected_tensor_names(config, names)
    if expected is None:
        raise Skipped(f"architecture {(config.get('architectures') or ['?'])[0]!r} is not in the tables")
    problems = [f"{n} (not described by the {expected.architecture} table)" for n in expected.undescribed]
    problems += [f"{n} ({why})" for n, why in expected.misplaced]
    problems += [f"extra layer {layer} lacks {', '.join(roles)}"
                 for layer, roles in expected.incomplete.items()]
    if problems:
        raise ZenithError(f"{len(problems)} unexpected tensors: {'; '.join(problems[:3])}"
                          + (" ..." if len(problems) > 3 else ""))
    note = extra_layers_note(expected)
    return (f"{len(names)} tensors as the table describes: {len(expected.model)} of the model's "
            f"{expected.depth} layers and its ends" + (f"; {note}" if note else ""))


def _slabs(rows: int, row_bytes: int, slab_bytes: int, multiple: int = 1):
    """(start, stop) row ranges of about `slab_bytes` each, in whole multiples of `multiple` rows."""
    step = max(multiple, slab_bytes // max(row_bytes, 1) // multiple * multiple)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _count_nonfinite(t) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating tensor; a sum first, which is finite exactly when no element is
    NaN or Inf unless it overflows (then the elements are counted): 30x faster than isfinite on bfloat16."""
    import torch

    if bool(torch.isfinite(t.sum())):  # reduced precision is summed in float32, without a float32 copy
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def check_finite(folder: Path, *, slab_bytes: int = SLAB_BYTES) -> str:
    """No NaN or Inf in any tensor; each offender named with its counts. Streamed: each weight is read in
    slabs of rows into one reused buffer (block-FP8 weights dequantised slab by slab into a second one), so
    memory stays at about two slabs whatever the size of the checkpoint or of its largest tensor."""
    import torch

    from ..io.reader import Checkpoint
    from ..kernels.fp8 import dequantize

    bad: list[str] = []
    with Checkpoint.open(folder, check_shapes=False) as ckpt:
        stored_buf = bytearray(0)
        out_buf = None
        for name in ckpt.names():
            info = ckpt.stored_info(name)
            shape = tuple(info.shape)
            if not info.dtype.startswith(("F", "BF")) or info.nbytes == 0:
                continue
            fp8 = ckpt.is_fp8(name)
            rows = shape[0] if shape else 1
            row_bytes = info.nbytes // rows
            block = ckpt.fp8_block[0] if fp8 else 1
            scale = ckpt.read_scale(name) if fp8 else None
            nan = inf = 0
            for start, stop in _slabs(rows, row_bytes * (2 if fp8 else 1), slab_bytes, block):
                need = (stop - start) * row_bytes
                if len(stored_buf) < need:
                    stored_buf = bytearray(0)  # free the smaller buffer before allocating the larger one
                    stored_buf = bytearray(need)
                t = ckpt.read_stored_into(name, stored_buf, rows=(start, stop) if shape else None)
                if fp8:
                    n = (stop - start) * shape[1]
                    if out_buf is None or out_buf.numel() < n:
                        out_buf = None
                        out_buf = torch.empty(n, dtype=torch.bfloat16)
                    t = dequantize(t, scale[start // block:-(-stop // block)], ckpt.fp8_block,
                                   out=out_buf[:n].view(stop - start, shape[1]))
                a, b = _count_nonfinite(t)
                nan, inf = nan + a, inf + b
            if nan or inf:
                counts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
                bad.append(f"{name} ({', '.join(counts)})")
        count = len(ckpt)
    if bad:
        raise ZenithError(f"{len(bad)} tensor{'s' if len(bad) > 1 else ''} with NaN or Inf values: "
                          + ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return f"{count} tensors finite (read in slabs of {slab_bytes // 2**20} MiB)"


def check_config_tokenizer(folder: Path) -> str:
    """config.json, the tokenizer and generation_config.json agree on vocabulary size and special ids."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    if len(tok) > config.vocab_size:
        raise ZenithError(f"tokenizer has {len(tok)} tokens but config.json vocab_size is "
                          f"{config.vocab_size}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cid, tid = getattr(config, key, None), getattr(tok, key, None)
        if tid is not None and cid is not None and cid != tid and not (isinstance(cid, list) and tid in cid):
            raise ZenithError(f"config.json {key}={cid} but the tokenizer's is {tid}")
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        bad = [e for e in eos if not 0 <= e < config.vocab_size]
        if bad:
            raise ZenithError(f"generation_config.json eos_token_id {bad} outside the vocabulary")
    return f"vocab {config.vocab_size}, tokenizer {len(tok)}"


def check_special_tokens(folder: Path) -> str:
    """Every special token the tokenizer files name (bos, eos, pad, unk, extra) is in tokenizer.json."""
    files = [f for f in ("tokenizer_config.json", "special_tokens_map.json") if (folder / f).is_file()]
    if not (folder / "tokenizer.json").is_file():
        raise ZenithError("tokenizer.json is missing")
    data = json.loads((folder / "tokenizer.json").read_text())
    known = set((data.get("model") or {}).get("vocab") or {})
    known |= {a["content"] for a in data.get("added_tokens", [])}
    named: dict[str, str] = {}
    for f in files:
        config = json.loads((folder / f).read_text())
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                    "mask_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                named[value] = f"{f} {key}"
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for value in config.get(key) or []:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    named[value] = f"{f} {key}"
    missing = [f"{tok!r} ({where})" for tok, where in named.items() if tok not in known]
    if missing:
        raise ZenithError(f"special token {missing[0]} is not in tokenizer.json"
                          + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    return f"{len(named)} special tokens present"
