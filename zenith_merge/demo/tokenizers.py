"""The demo tokenizers: byte-level BPE trained with the `tokenizers` library, deterministically.

Zen's (shared by the zen parent and both children) follows DeepSeek-V3: numbers split into
runs of up to three digits, DeepSeek's special tokens, a BOS token added to every encoding
and an R1-style chat template. Qwen's follows Qwen3: another vocabulary (other data mix,
other size), digits split one by one, `<|im_start|>` / `<|im_end|>` chat turns, and
`<think>`, `</think>` as single added tokens, with a chat template that honours
`enable_thinking`. As in real Qwen3, `/think` and `/no_think` are plain text (soft switches
the model reads), not tokens. Both save as tokenizer.json + tokenizer_config.json +
special_tokens_map.json and load with `AutoTokenizer.from_pretrained` and no custom code.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .corpora import corpus

# DeepSeek-R1's template, trimmed to what the demo uses: system prompt, turns, reasoning of
# earlier assistant turns dropped, generation prompt that opens the think block.
ZEN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages if message['role'] == 'system' %}{{ message['content'] }}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{%- endif %}"
)

# Qwen3's template, trimmed (no tools): reasoning of earlier turns dropped; with
# enable_thinking=False the generation prompt carries an empty think block, as Qwen3's does.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

# pre-tokenizer patterns: DeepSeek-V3 groups up to three digits, Qwen3 (like Qwen2) one digit
_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
ZEN_PATTERNS = (r"\p{N}{1,3}", _WORDS)
QWEN_PATTERNS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",)


@dataclass(frozen=True)
class TokenizerRecipe:
    """What a demo tokenizer is trained on, its size, and which tokens it reserves."""

    name: str
    vocab_size: int  # total, special and added tokens included
    specials: tuple[str, ...]  # special tokens: special flag set, skipped by decode(skip_special_tokens=True)
    added: tuple[str, ...]  # ordinary added tokens: always one token, not special
    bos: str | None
    eos: str
    pad: str
    add_bos: bool  # prepend bos to every encoding (DeepSeek does, Qwen has no bos)
    patterns: tuple[str, ...]  # pre-tokenizer split regexes, applied in turn
    chat_template: str
    data: tuple[tuple[str, str, int], ...]  # (domain, style, characters) of training text
    min_frequency: int = 2

    def as_dict(self) -> dict:
        """The recipe as plain JSON-able data (for zenith_demo.json and the cache key)."""
        return asdict(self)


ZEN_TOKENIZER = TokenizerRecipe(
    name="zen",
    vocab_size=2048,
    specials=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"),
    added=("<think>", "</think>"),
    bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>", add_bos=True,
    patterns=ZEN_PATTERNS, chat_template=ZEN_CHAT_TEMPLATE,
    data=(("code", "plain", 300_000), ("maths", "plain", 250_000), ("maths", "r1_chat", 50_000)),
)

QWEN_TOKENIZER = TokenizerRecipe(
    name="qwen",
    vocab_size=1536,
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    added=("<think>", "</think>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
    patterns=QWEN_PATTERNS, chat_template=QWEN_CHAT_TEMPLATE,
    data=(("maths", "qwen_chat", 300_000), ("maths", "plain", 100_000), ("code", "plain", 100_000)),
)

TOKENIZER_RECIPES = {r.name: r for r in (ZEN_TOKENIZER, QWEN_TOKENIZER)}


def training_text(data: tuple[tuple[str, str, int], ...]) -> str:
    """The concatenated training text of a data mix `((domain, style, chars), ...)`."""
    return "".join(corpus(domain, "train", n, style=style) for domain, style, n in data)  # type: ignore[arg-type]


def _pieces(text: str, reserved: tuple[str, ...], size: int = 4096) -> list[str]:
    """Text cut at reserved tokens (which BPE must not learn merges across) and into bounded chunks."""
    parts = re.split("|".join(re.escape(t) for t in sorted(reserved, key=len, reverse=True)), text)
    return [p[i:i + size] for p in parts for i in range(0, len(p), size) if p[i:i + size]]


def train_tokenizer(recipe: TokenizerRecipe) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the recipe's data; same recipe, same tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in recipe.patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size - len(recipe.added), special_tokens=list(recipe.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=recipe.min_frequency,
        show_progress=False)
    pieces = _pieces(training_text(recipe.data), recipe.specials + recipe.added)
    tok.train_from_iterator(pieces, trainer, length=len(pieces))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in recipe.added])
    if recipe.add_bos:
        bos_id = tok.token_to_id(recipe.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{recipe.bos} $A", pair=f"{recipe.bos} $A {recipe.bos} $B", special_tokens=[(recipe.bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=recipe.bos, eos_token=recipe.eos, pad_token=recipe.pad,
        additional_special_tokens=[t for t in recipe.specials if t not in (recipe.bos, recipe.eos, recipe.pad)],
        model_max_length=4096, clean_up_tokenization_spaces=False, add_bos_token=recipe.add_bos,
        add_eos_token=False)
    fast.chat_template = recipe.chat_template
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save in the standard files, laid out as real checkpoints have them.

    transformers 5 writes the chat template to chat_template.jinja and names its own backend
    class; older readers look for the template in tokenizer_config.json and know the class as
    PreTrainedTokenizerFast, so both are written that way. special_tokens_map.json is written
    too, for tools that still read it.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tokenizer.chat_template
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name (transformers 4 and 5, vLLM, SGLang)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    specials = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                                  ("pad_token", tokenizer.pad_token)) if v is not None}
    extra = [t for t in tokenizer.all_special_tokens if t not in specials.values()]
    if extra:
        specials["additional_special_tokens"] = extra
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """Load a saved demo tokenizer exactly as users will: `AutoTokenizer.from_pretrained`."""
    return AutoTokenizer.from_pretrained(str(folder))


def build_tokenizer(name: str, folder: Path) -> Path:
    """Train the named tokenizer ("zen" or "qwen") and save it into `folder`."""
    save_tokenizer(train_tokenizer(TOKENIZER_RECIPES[name]), Path(folder))
    return Path(folder)
