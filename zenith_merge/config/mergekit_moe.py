"""mergekit-moe's and mergekit-yaml's command lines, as `zenith-merge moe|yaml CONFIG OUT_PATH [flags]`: every
flag of mergekit 0.1.5's two commands with its meaning here (honoured, without effect and said so once, or
refused with the reason), and the config checks mergekit-moe makes before it merges (`is_bad_config`), so a
command line that works there works here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError

Effect = Literal["honoured", "no effect", "refused"]


@dataclass(frozen=True)
class Flag:
    """One mergekit-moe flag: its names, whether it takes a value, and what it does here."""

    names: tuple[str, ...]
    effect: Effect
    why: str
    takes_value: bool = False
    moe_only: bool = False  # mergekit-moe's own flag; mergekit-yaml does not have it


# mergekit-moe 0.1.5's flags (`mergekit-moe --help`): its own three and those of `add_merge_options`, which
# mergekit-yaml has too.
FLAGS: tuple[Flag, ...] = (
    Flag(("--load-in-8bit",), "honoured", "the stages' forward passes load the base in bitsandbytes 8-bit "
         "(load_in_8bit: true)", moe_only=True),
    Flag(("--load-in-4bit",), "refused", "4-bit loading is not supported; use --load-in-8bit", moe_only=True),
    Flag(("--i-understand-this-is-not-useful-without-training",), "honoured",
         "allows experts that are all the same model (upcycling)", moe_only=True),
    Flag(("--random-seed",), "honoured", "seeds random router rows, noise_scale, and the random drops of dare and "
         "della (seed:)", takes_value=True),
    Flag(("--out-shard-size",), "honoured", "the largest output shard (max_shard_size). mergekit's help says "
         "parameters, but its writer compares tensor bytes with the number, so 5B means 5 GB of tensors here "
         "as there", takes_value=True),
    Flag(("--device",), "honoured", "cpu keeps the stages' forward passes off CUDA; other values leave the "
         "placement to transformers (CUDA when available)", takes_value=True),
    Flag(("--copy-tokenizer",), "no effect", "the output always carries the base's tokenizer files"),
    Flag(("--no-copy-tokenizer",), "refused", "the output always carries the base's tokenizer (the routing report "
         "and the smoke test read it)"),
    Flag(("--safe-serialization",), "no effect", "the output is always safetensors"),
    Flag(("--no-safe-serialization",), "refused", "zenith-merge writes safetensors only"),
    Flag(("--trust-remote-code", "--no-trust-remote-code"), "no effect",
         "zenith-merge runs no model's custom code; the architectures it reads load without it"),
    Flag(("--allow-crimes", "--no-allow-crimes"), "no effect", "mergekit's switch for mixing architectures in "
         "mergekit-yaml; the MoE merge checks its sources itself"),
    Flag(("--lazy-unpickle", "--no-lazy-unpickle"), "no effect", "safetensors are read lazily; pickles need "
         "allow_pickle: true in the config"),
    Flag(("--clone-tensors", "--no-clone-tensors"), "no effect", "tensors are written from their own buffers"),
    Flag(("--write-model-card", "--no-write-model-card"), "no effect", "the output's README.md records the merge"),
    Flag(("--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings"), "no effect",
         "embeddings are never truncated"),
    Flag(("--cuda", "--no-cuda", "--low-cpu-memory", "--no-low-cpu-memory", "--read-to-gpu", "--no-read-to-gpu",
          "--multi-gpu", "--no-multi-gpu", "--gpu-rich", "--async-write", "--no-async-write"), "no effect",
         "tensors are copied or computed one at a time on the CPU and written as they come"),
    Flag(("--num-threads", "-j", "--write-threads"), "no effect", "torch's own thread count is used",
         takes_value=True),
    Flag(("--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype"), "no effect",
         "nothing is downloaded and no LoRA is applied", takes_value=True),
    Flag(("--quiet", "--no-quiet"), "honoured", "--quiet: no progress bars"),
    Flag(("-v", "--verbose"), "honoured", "progress details on stderr"),
)



def flags_of(command: Literal["moe", "yaml"]) -> tuple[Flag, ...]:
    """The flags of mergekit-moe (`moe`) or mergekit-yaml (`yaml`)."""
    return tuple(f for f in FLAGS if command == "moe" or not f.moe_only)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*", flags=re.IGNORECASE)


def parse_flags(argv: list[str], command: Literal["moe", "yaml"] = "moe") -> tuple[dict[str, str | bool], list[str]]:
    """mergekit-moe (or mergekit-yaml) flags -> ({flag: value or True}, notes for flags without effect); unknown
    flags and refused ones are ConfigErrors naming the flag."""
    by_name = {name: flag for flag in flags_of(command) for name in flag.names}
    tool = f"mergekit-{command}"
    given: dict[str, str | bool] = {}
    notes = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        flag = by_name["-v"] if re.fullmatch(r"-v+", name) else by_name.get(name)
        if flag is None:
            raise ConfigError(f"{arg}: not a {tool} flag (zenith-merge {command} takes {tool} 0.1.5's flags; "
                              f"see zenith-merge {command} --help)")
        value: str | bool = True
        if flag.takes_value:
            if inline:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"{name}: needs a value")
        if flag.effect == "refused":
            raise ConfigError(f"{name}: refused: {flag.why}")
        if flag.effect == "no effect":
            notes.append(f"{name}: no effect here: {flag.why}")
        given[name] = value
        i += 1
    return given, notes


def parameters(text: str) -> int:
    """mergekit's size suffixes (K, M, B, T: thousands ... trillions of parameters)."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"--out-shard-size: {text!r} is not a number of parameters such as 5B or 500M")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def apply_flags(data: dict[str, Any], given: dict[str, str | bool]) -> dict[str, Any]:
    """The config mapping with the honoured flags applied (seed, 8-bit, shard size)."""
    data = dict(data)
    if "--random-seed" in given:
        try:
            data["seed"] = int(given["--random-seed"])
        except ValueError:
            raise ConfigError(f"--random-seed: {given['--random-seed']!r} is not an integer") from None
    if "--load-in-8bit" in given:
        data["load_in_8bit"] = True
    if "--out-shard-size" in given:  # mergekit's TensorWriter: numel * element_size against this number
        data["max_shard_size"] = parameters(str(given["--out-shard-size"]))
    return data


def mergekit_refusals(data: dict[str, Any], *, allow_all_same: bool) -> None:
    """The configs mergekit-moe's `is_bad_config` refuses, refused alike (a ConfigError naming the key):
    experts all identical in prompts, or all one model without --i-understand-this-is-not-useful-without-training."""
    experts = data.get("experts") or []
    if len(experts) < 2 or data.get("gate_mode", "hidden") == "random":
        return
    prompts = {(tuple(e.get("positive_prompts") or ()), tuple(e.get("negative_prompts") or ())) for e in experts}
    if len(prompts) == 1:
        raise ConfigError("experts: every expert has the same positive and negative prompts, so every router row "
                          "would be the same and no token could tell them apart (mergekit-moe refuses this too); "
                          "give each expert prompts of what it is good at")
    if not allow_all_same and len({str(e.get("source_model")) for e in experts}) == 1:
        raise ConfigError("experts: every expert is the same model, which gives a larger model with the same output; "
                          "to train it afterwards, pass --i-understand-this-is-not-useful-without-training (as in "
                          "mergekit-moe)")
