"""Fuzzing the parsers that take hostile bytes (issue 22): every bad input must end as a `ZenithError`
naming the file, never another exception, a hang or a memory blow-up.

Targets (`TARGETS`, shared with bench/fuzz.py, which runs the same strategies for as long as asked):
- header: `read_header` on safetensors files built from valid headers (names, DTYPES codes and bogus ones,
  shapes, offsets) then mutated: JSON values of the wrong type, huge or negative numbers, deep nesting,
  duplicate keys, NaN/Infinity, lying length fields, truncation, non-UTF-8 bytes; plus random bytes.
- config: `read_yaml` and `load_config` on the example configs (merge/config.yml, merge/examples/*.yml)
  mutated line by line (random scalars, anchors and aliases, tags, deep nesting, long numbers, tabs,
  duplicate keys) and byte by byte, and on YAML generated from recursive strategies, then perturbed.
- json: `read_json_file` on config.json / index / tokenizer.json texts and generated JSON, mutated.

Each parser call runs under a time limit (SIGALRM) and a memory limit (the peak of what it allocates, by
tracemalloc, and the growth of the process's peak RSS). Hard failures (the tests fail): an exception that
is not a `ZenithError`, a hang, a memory blow-up, a refusal whose message does not name the file, or an
accepted input that breaks what the parser promises (a header entry outside the file, a non-finite number
in a loaded config). Soft concerns (multi-line or very long messages, lone surrogates or non-string
metadata accepted) are only counted by the bench.

Hangs and memory blow-ups are BaseExceptions, so hypothesis stops at the first one without shrinking
it (each shrink step would cost the whole time limit); the failure names the input file it left.
`ZENITH_FUZZ_SCALE=10` runs ten times the examples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import signal
import struct
import threading
import tracemalloc
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from zenith_merge.config.load import load_config, read_yaml
from zenith_merge.config.schema import MergeConfig
from zenith_merge.errors import CheckpointError, ZenithError
from zenith_merge.io.json_files import read_json_file
from zenith_merge.io.safetensors_format import (
    DTYPES,
    MAX_HEADER_BYTES,
    UNSUPPORTED_CODES,
    build_header,
    read_header,
)

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 5.0  # per parser call: longer is a hang
MEMORY_LIMIT_MB = 256  # what one parser call may allocate at its peak (inputs are 4 MiB at most): more is a blow-up

# ---------------------------------------------------------------------------------------------------------
# The harness: run a parser on a file, classify what happened.


class Hang(BaseException):  # noqa: N818 - BaseException: no `except Exception` in a parser can swallow it
    """A parser call ran past its time limit."""


class MemoryBlowup(BaseException):  # noqa: N818
    """A parser call raised the process's peak RSS by more than the limit."""


class Violation(AssertionError):
    """A refusal or an acceptance that breaks the parser's promise (not a crash, but a bug all the same)."""


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise `Hang` in the main thread after `seconds` (a no-op where SIGALRM is unavailable)."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Limits:
    time_s: float | None = TIME_LIMIT_S
    memory_mb: float = MEMORY_LIMIT_MB


def _call(fn: Callable[[Path], object], path: Path, limits: Limits, concerns: list[str], trace: bool = True):
    """(result, None) or (None, the ZenithError); anything else propagates. Checks the message names the file.

    Memory: the growth of the process's peak RSS (which shows only a new peak) and, with `trace` while
    tracemalloc is on, the peak of what the call allocates (Python objects, the regex engine's stacks, numpy
    arrays). Tracing is started once per test or fuzzing worker, not per call: CPython 3.11-3.13 can crash
    on a tracemalloc.start() soon after a stop() (cpython#128679; SIGSEGV seen here after ~30,000 calls)."""
    before = peak_rss_mb()
    measure = trace and tracemalloc.is_tracing()
    if measure:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    try:
        with time_limit(limits.time_s):
            return fn(path), None
    except Hang as err:
        raise Hang(f"{fn.__name__}: {err}").with_traceback(err.__traceback__) from None
    except ZenithError as err:
        msg = str(err)
        if str(path) not in msg:
            raise Violation(f"{type(err).__name__} does not name the file: {msg[:300]!r}") from None
        if "\n" in msg.strip():
            concerns.append("multi-line message")
        if len(msg) > 2000:
            concerns.append("message over 2000 characters")
        return None, err
    finally:
        allocated = (tracemalloc.get_traced_memory()[1] - base) / 2**20 if measure else 0.0
        grown = peak_rss_mb() - before
        if max(allocated, grown) > limits.memory_mb:
            raise MemoryBlowup(f"{fn.__name__}: allocated {allocated:.0f} MiB at its peak, peak RSS grew by "
                               f"{grown:.0f} MiB, on a file of {path.stat().st_size / 2**20:.1f} MiB")


def _walk(value: object) -> Iterator[object]:
    """Every value in a JSON/YAML structure, each container once (YAML aliases can make cycles)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (dict, list)):
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.extend(v.values() if isinstance(v, dict) else v)
            if isinstance(v, dict):
                stack.extend(v.keys())
        yield v


def _not_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_header(path: Path, limits: Limits | None = None) -> list[str]:
    """read_header on `path`; returns soft concerns, raises on a crash or a broken promise."""
    concerns: list[str] = []
    header, err = _call(read_header, path, limits or Limits(), concerns)
    if err is not None:
        return concerns
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if header.data_start != 8 + n or header.file_size != len(raw):
        raise Violation(f"data_start {header.data_start} / file_size {header.file_size} for a header of {n} "
                        f"bytes in a file of {len(raw)}")
    spans = []
    for name, e in header.tensors.items():
        if e.dtype not in DTYPES:
            raise Violation(f"tensor {name!r}: accepted dtype {e.dtype!r}")
        if e.end - e.begin != math.prod(e.shape) * DTYPES[e.dtype].itemsize or not 0 <= e.begin <= e.end:
            raise Violation(f"tensor {name!r}: span {e.begin}..{e.end} for {e.dtype}{list(e.shape)}")
        if header.data_start + e.end > len(raw):
            raise Violation(f"tensor {name!r} ends past the end of the file")
        if _not_utf8(name):
            concerns.append("lone surrogate in a tensor name accepted")
        if e.end > e.begin:
            spans.append((e.begin, e.end, name))
    spans.sort()
    for (_, a_end, a), (b_begin, _, b) in zip(spans, spans[1:]):
        if b_begin < a_end:
            raise Violation(f"tensors {a!r} and {b!r} overlap")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items()):
        concerns.append("__metadata__ with a non-string value accepted")
    elif any(_not_utf8(k) or _not_utf8(v) for k, v in header.metadata.items()):
        concerns.append("lone surrogate in __metadata__ accepted")
    return concerns


def check_config(path: Path, limits: Limits | None = None) -> list[str]:
    """read_yaml, then load_config, on `path`; returns soft concerns, raises on a crash or a broken promise."""
    limits = limits or Limits()
    concerns: list[str] = []
    data, err = _call(read_yaml, path, limits, concerns, trace=False)
    if err is None:
        for v in _walk(data):
            if isinstance(v, float) and not math.isfinite(v):
                raise Violation(f"read_yaml accepted the non-finite number {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**63 - 1:
                raise Violation(f"read_yaml accepted the integer {v} (past 64 bits)")
    config, err2 = _call(load_config, path, limits, concerns, trace=False)
    if err2 is None:
        if err is not None:
            raise Violation(f"load_config accepted what read_yaml refused: {err}")
        for v in _walk(config.model_dump()):
            if isinstance(v, float) and not math.isfinite(v):
                raise Violation(f"load_config accepted a non-finite number ({v}, given as a string?)")
            if isinstance(v, str) and _not_utf8(v):
                concerns.append("lone surrogate in a config string accepted")
    return concerns


def _read_json_file(path: Path) -> object:
    return read_json_file(path, error=CheckpointError)


def check_json(path: Path, limits: Limits | None = None) -> list[str]:
    """read_json_file on `path`; returns soft concerns, raises on a crash or a broken promise."""
    concerns: list[str] = []
    data, err = _call(_read_json_file, path, limits or Limits(), concerns)
    if err is None and not isinstance(data, dict):
        raise Violation(f"read_json_file(mapping=True) returned a {type(data).__name__}")
    return concerns


# ---------------------------------------------------------------------------------------------------------
# Byte-level mutation, shared by all three formats.

NON_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80", b"\xc3", b"\xe2\x82"]
MAX_INPUT_BYTES = 4 * 2**20  # generated JSON is cut here, mutations grow no further (the config bound)
REPEATS = st.one_of(st.sampled_from([2, 3, 31, 32, 33, 64, 65, 1000, 4300, 4301, 20_000, 60_000]),
                    st.integers(0, 60_000))


@st.composite
def mutated_bytes(draw, seed: bytes, tokens: list[bytes], max_ops: int = 4) -> bytes:
    """`seed` after up to `max_ops` byte-level edits: insert a format token, random or non-UTF-8 bytes or a
    string of megabytes, delete, overwrite, duplicate a span, repeat a token or span many times, truncate,
    or re-encode (UTF-16/32, BOM). Inputs grow to MAX_INPUT_BYTES at most."""
    buf = bytearray(seed)
    token = st.sampled_from(tokens)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(["token", "token", "bytes", "non_utf8", "delete", "overwrite", "duplicate",
                                   "repeat", "repeat_span", "long_string", "truncate", "reencode"]))
        pos = draw(st.integers(0, len(buf)))
        span = draw(st.integers(1, 64))
        if op == "token":
            buf[pos:pos] = draw(token)
        elif op == "bytes":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "non_utf8":
            buf[pos:pos] = draw(st.sampled_from(NON_UTF8))
        elif op == "delete":
            del buf[pos:pos + span]
        elif op == "overwrite":
            buf[pos:pos + 1] = bytes([draw(st.integers(0, 255))])
        elif op == "duplicate":
            buf[pos:pos] = buf[draw(st.integers(0, len(buf))):][:span]
        elif op in ("repeat", "repeat_span"):
            chunk = draw(token) if op == "repeat" else bytes(buf[pos:pos + draw(st.integers(1, 8))])
            buf[pos:pos] = chunk * min(draw(REPEATS), max(0, MAX_INPUT_BYTES - len(buf)) // max(1, len(chunk)))
        elif op == "long_string":  # one string of megabytes (JSON and YAML alike)
            n = min(draw(st.sampled_from([100_000, 1_000_000, 3_000_000])), max(0, MAX_INPUT_BYTES - len(buf) - 2))
            buf[pos:pos] = b'"' + b"x" * n + b'"'
        elif op == "truncate":
            del buf[pos:]
        elif op == "reencode":
            codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-8-sig"]))
            text = bytes(buf).decode("utf-8", "replace")
            if len(text) * 4 + 4 <= MAX_INPUT_BYTES:
                buf = bytearray(text.encode(codec))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------------
# JSON values, written by hand so that objects may repeat keys and any token may appear verbatim.


class Obj(list):
    """A JSON object as a list of [key, value] pairs (duplicates allowed)."""


@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim (NaN, a 5,000-digit number, an unterminated string, deep brackets)."""

    text: str


def dump_json(v: object, ensure_ascii: bool = True) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, (Obj, dict)):
        pairs = v if isinstance(v, Obj) else list(v.items())
        return "{" + ",".join(f"{dump_json(str(k), ensure_ascii)}:{dump_json(x, ensure_ascii)}" for k, x in pairs) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump_json(x, ensure_ascii) for x in v) + "]"
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return json.dumps(v, ensure_ascii=ensure_ascii)
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # floats, NaN and Infinity included


BOUNDARY_INTS = [0, 1, -1, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
                 2**64, -(2**63), -(2**64), 10**63, 10**64, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1]
RAW_JSON = st.one_of(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-0", "0.0e-99999", "1E+2",
                     '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "01", "+1", ".5", "0x10", "tru", "nul"]),
    st.builds(lambda d, n: d * n, st.sampled_from(["1", "9", "0"]), st.sampled_from([64, 65, 100, 4300, 4301, 10_000])),
    st.builds(lambda k: "[" * k + "]" * k, st.sampled_from([4, 5, 64, 65, 1000, 100_000])),
    st.builds(lambda k: '{"a":' * k + "1" + "}" * k, st.sampled_from([4, 5, 64, 65, 1000])),
    st.builds(lambda k, close: '"' + '\\"' * k + ('"' if close else ""), REPEATS, st.booleans()),
    st.builds(lambda n: '"' + "x" * n + '"', st.sampled_from([1000, 100_000])),  # longer: mutated_bytes
).map(Raw)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(BOUNDARY_INTS),
                         st.floats(), st.text(max_size=12), st.sampled_from(sorted(DTYPES) + sorted(UNSUPPORTED_CODES)))
HOSTILE_JSON = st.recursive(st.one_of(JSON_SCALARS, RAW_JSON),
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=8)
JSON_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"1" * 65, b"9" * 4301, b'"\\ud800"', b"\\u0000",
               b'"', b'\\"', b"\\", b"[", b"]", b"{", b"}", b":", b",", b'"a":', b"true", b"null", b"\xef\xbb\xbf",
               b"\x00", b"/*", b" ", b"\t", b"\n", b'"data_offsets"', b'"dtype"', b'"shape"', b'"__metadata__"',
               b'"F32"', b"[0,0]", b"-1", b"18446744073709551616"]


def mutate_json_tree(draw, root: Obj, rounds: int) -> None:
    """Edit `root` in place: replace, delete or add values anywhere, repeat keys."""
    for _ in range(rounds):
        containers: list[list] = []
        stack: list = [root]
        while stack:  # every object and array in the tree
            c = stack.pop()
            containers.append(c)
            for x in (p[1] for p in c) if isinstance(c, Obj) else c:
                if isinstance(x, list):
                    stack.append(x)
        c = draw(st.sampled_from(containers))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
        if not c and op != "add":
            op = "add"
        if op == "add":
            value = draw(HOSTILE_JSON)
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "x", "\ud800"]) | st.text(max_size=6))
            c.insert(draw(st.integers(0, len(c))), [key, value] if isinstance(c, Obj) else value)
            continue
        i = draw(st.integers(0, len(c) - 1))
        if op == "replace":
            if isinstance(c, Obj):
                c[i] = [c[i][0], draw(HOSTILE_JSON)]
            else:
                c[i] = draw(HOSTILE_JSON)
        elif op == "delete":
            del c[i]
        elif isinstance(c, Obj):  # duplicate: the same key again, its value perhaps changed
            c.insert(draw(st.integers(0, len(c))), [c[i][0], draw(st.just(c[i][1]) | HOSTILE_JSON)])
        else:
            c.insert(i, c[i])


# ---------------------------------------------------------------------------------------------------------
# (a) safetensors files.

CODES = sorted(DTYPES)
BOGUS_CODES = sorted(UNSUPPORTED_CODES) + ["F8", "f32", "FP32", "float32", "", "F32 ", "I128", "Q4_0", "__metadata__"]
NAMES = st.one_of(st.text(max_size=12), st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "x\udc80"])).filter(
    lambda s: s != "__metadata__")
SHAPES = st.lists(st.integers(0, 5), max_size=4)
METADATA = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
LENGTH_LIES = st.sampled_from([0, 1, 2, 7, 8, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**32, 2**63, 2**64 - 1])


@st.composite
def header_files(draw) -> bytes:
    """A safetensors file from a valid layout, with its JSON values, text, length field and data mutated."""
    specs = draw(st.lists(st.tuples(NAMES, st.sampled_from(CODES) | st.sampled_from(BOGUS_CODES), SHAPES),
                          max_size=5, unique_by=lambda s: s[0]))
    root, offset = Obj(), 0
    metadata = draw(METADATA)
    if metadata is not None:
        root.append(["__metadata__", metadata])
    for name, code, shape in specs:
        size = math.prod(shape) * (DTYPES[code].itemsize if code in DTYPES else draw(st.integers(0, 8)))
        root.append([name, Obj([["dtype", code], ["shape", list(shape)], ["data_offsets", [offset, offset + size]]])])
        offset += size
    root[:] = draw(st.permutations(root))
    mutate_json_tree(draw, root, draw(st.sampled_from([0, 0, 1, 1, 2, 3])))
    if draw(st.integers(0, 7)) == 0:  # one value of megabytes (a name, metadata, a dtype)
        big = Raw('"' + "x" * draw(st.sampled_from([1_000_000, 3_000_000])) + '"')
        root.insert(draw(st.integers(0, len(root))), draw(st.sampled_from([["__metadata__", {"k": big}], ["x", big]])))
    text = dump_json(root, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")[:MAX_INPUT_BYTES]
    text += b" " * draw(st.sampled_from([0, -len(text) % 8, 3]))
    if draw(st.integers(0, 3)) == 0:
        text = draw(mutated_bytes(text, JSON_TOKENS, max_ops=3))
    data_len = max(0, offset + draw(st.sampled_from([0, 0, 0, -1, 1, 8]) | st.integers(-offset, 64)))
    length = draw(st.sampled_from(["true"] * 6 + ["near", "lie"]))
    n = {"true": len(text), "near": len(text) + draw(st.integers(-9, 9)), "lie": draw(LENGTH_LIES)}[length]
    blob = struct.pack("<Q", max(0, min(n, 2**64 - 1))) + text + bytes([draw(st.integers(0, 255))]) * data_len
    if draw(st.integers(0, 5)) == 0:
        blob = blob[:draw(st.integers(0, len(blob)))]
    return blob


@st.composite
def random_safetensors(draw) -> bytes:
    """Random bytes, with a length field that is sometimes true."""
    payload = draw(st.binary(max_size=256))
    if draw(st.booleans()):
        return payload
    return struct.pack("<Q", draw(st.sampled_from([len(payload), len(payload) + 1]) | st.integers(0, 2**64 - 1))) + payload


HEADER_INPUTS = st.one_of(header_files(), header_files(), header_files(), random_safetensors())

# ---------------------------------------------------------------------------------------------------------
# (b) YAML configs.

EXAMPLE_CONFIGS = [ROOT / "merge" / "config.yml", *sorted((ROOT / "merge" / "examples").glob("*.yml"))]
SEED_CONFIGS = [p.read_text(encoding="utf-8") for p in EXAMPLE_CONFIGS if p.is_file()] or ["base_model: demo://zen-tiny\n"]


def _schema_keys() -> list[str]:
    keys: set[str] = set()
    models, seen = [MergeConfig], {MergeConfig}
    while models:
        for name, field in models.pop().model_fields.items():
            keys.add(name)
            stack = [field.annotation]
            while stack:
                a = stack.pop()
                if isinstance(a, type) and issubclass(a, BaseModel) and a not in seen:
                    seen.add(a)
                    models.append(a)
                stack.extend(typing.get_args(a))
    return sorted(keys)


def _seed_scalars() -> list[str]:
    out: set[str] = set()
    for text in SEED_CONFIGS:
        with contextlib.suppress(yaml.YAMLError):
            out |= {str(v) for v in _walk(yaml.safe_load(text)) if isinstance(v, (str, int, float))}
    return sorted(out)


CONFIG_KEYS = _schema_keys()
CONFIG_VALUES = _seed_scalars()
YAML_SCALARS = [
    "~", "null", "", "true", "yes", "No", "on", "OFF", "y", "0", "-0", "007", "0o17", "0x1F", "0b1010", "1_000",
    "190:20:30", "190:20:30.15", "1e400", "-1e400", ".inf", "-.Inf", ".nan", ".NaN", '"nan"', "'inf'",
    '"-Infinity"', "'1e999'", "3.14", "-2", "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "2001-12-14", "2020-99-99", "2001-02-30", "0000-00-00", "2001-12-14t21:59:43.10-05:00", "2001-12-14t25:61:61",
    "2001-12-14 21:59:43.10 -99:00", "=", "<<", "demo://zen-tiny", "demo://nope", "demo://", "http://x", "/",
    "5GB", "0MB", "-1GB", "1e30GB", "99999999999999999999TB", "1.5GiB", "all", "[]", "{}", "[1, 2]", "{a: 1}",
    "[demo:code]", "[[demo:code], [demo:maths]]", '"\\ud800"', '"\\x00"', '"\\uDFFF\\uD800"', "'", '"', "[", "{",
    "]", "}", "*", "&", "!", "? a", ": b", "- x", "|", ">", "@", "`", "%", "#x", "&a [*a]", "&a {x: *a}",
    "*undefined", "{<<: {a: 1}}", "[&x 1, *x]", "!!int 3", "!!str x", "!!float 1", "!!bool yes", "!!null ''",
    "!!binary aGVsbG8=", "!!timestamp 2001-12-14", "!!set {a, b}", "!!omap [a: 1]",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!custom x", "!<tag:yaml.org,2002:int> 1",
    "! x", "!!merge <<", "nan", "NaN", "inf", "-Infinity", "[nan, 0.5]", "[0.5, 'inf']", "[.nan, 1]",
]
YAML_TAGS = ["!!int", "!!str", "!!float", "!!bool", "!!null", "!!binary", "!!timestamp", "!!set", "!!map", "!!seq",
             "!!python/object:os.system", "!!python/object/apply:os.system", "!custom", "!", "!<tag:x>"]
YAML_TOKENS = [b"\t", b"&a ", b"*a", b"!!int ", b"!!python/object:os.system ", b"<<: ", b"? ", b": ", b"- ",
               b"---\n", b"...\n", b"%YAML 1.1\n", b"%TAG ! tag:x,2000:\n", b"[", b"]", b"{", b"}", b'"', b"'", b"#",
               b"|", b">", b"\r\n", b"\r", b"\xc2\x85", "\u2028".encode(), b"\xef\xbb\xbf", b"\x00", b"\x1b", b"\\",
               b"\\ud800", b"\n  ", b"\n", b"1" * 65, b"9" * 4301, b".nan", b"2020-99-99"]
LONG_NUMBERS = st.builds(lambda pre, d, n: pre + d * n, st.sampled_from(["", "-", "+", "0x", "0b", "0o", ".", "1e", "1_"]),
                         st.sampled_from(["1", "9", "0", "1_", "1:"]), st.sampled_from([63, 64, 65, 100, 4300, 4301, 20_000]))
TIMESTAMPS = st.builds(  # YAML 1.1 implicit timestamps, fields in and out of range
    lambda y, mo, d, time, tz: f"{y:04d}-{mo:02d}-{d:02d}" + time + tz,
    st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99),
    st.sampled_from(["", "t", " "]).flatmap(lambda sep: st.just("") if not sep else st.builds(
        lambda h, m, sec: f"{sep}{h}:{m:02d}:{sec:02d}.10", st.integers(0, 99), st.integers(0, 99), st.integers(0, 99))),
    st.sampled_from(["", "Z", "-05:00", "+23:59", "-24:00", "+99:00", " -99"]))
YAML_TREES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(BOUNDARY_INTS), st.floats(), st.text(max_size=20),
              st.sampled_from(CONFIG_VALUES), st.sampled_from(["nan", "-inf", "Infinity", "1e999"]), st.dates()),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6), c, max_size=6),
    max_leaves=25)


def _flow(value: object) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=2**31)[1:-2]


YAML_VALUES = st.one_of(st.sampled_from(YAML_SCALARS), st.sampled_from(YAML_SCALARS), st.sampled_from(CONFIG_VALUES), TIMESTAMPS,
                        LONG_NUMBERS, YAML_TREES.map(_flow), st.text(max_size=20), st.text(max_size=20).map(json.dumps))
_VALUE_LINE = re.compile(r"^(\s*(?:- +)?[A-Za-z_][\w.-]*:|\s*-)( +)(\S.*)$")


@st.composite
def mutated_yaml_text(draw, text: str, max_ops: int = 4) -> str:
    """`text` after up to `max_ops` line-level edits: values (scalars, timestamps, flow collections, long
    numbers), anchors and aliases (recursive, undefined, chained, billion laughs), tags, deep nesting, tabs,
    duplicate keys and blocks, deleted, swapped or re-indented lines, document markers and directives."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, max_ops))):
        values = [i for i, line in enumerate(lines) if _VALUE_LINE.match(line)]
        op = draw(st.sampled_from(["value", "value", "value", "alias", "recursive", "tag", "deep_flow", "deep_block",
                                   "tab", "duplicate_line", "duplicate_block", "delete", "swap", "indent", "laughs",
                                   "chain", "big_list", "document"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if values and op in ("value", "alias", "recursive", "tag", "deep_flow", "deep_block", "big_list"):
            i = draw(st.sampled_from(values))
            head, _, value = _VALUE_LINE.match(lines[i]).groups()
            if op == "value":
                value = draw(YAML_VALUES)
            elif op == "alias":  # an anchor here, an alias to it on another value line (before it: undefined)
                j = draw(st.sampled_from(values))
                lines[i] = f"{head} &a{i} {value}"
                lines[j] = f"{_VALUE_LINE.match(lines[j]).group(1)} *a{i}"
                continue
            elif op == "recursive":
                value = draw(st.sampled_from(["&r [*r]", "&r {k: *r}", "&r [1, [2, *r]]", "&r {<<: *r}"]))
            elif op == "tag":
                value = f"{draw(st.sampled_from(YAML_TAGS))} {value}"
            elif op == "deep_flow":
                k = draw(st.sampled_from([31, 32, 33, 100, 1000, 20_000]))
                value = draw(st.sampled_from(["[" * k + "1" + "]" * k, "{a: " * k + "1" + "}" * k, "[" * k]))
            elif op == "deep_block":
                k = draw(st.sampled_from([30, 31, 32, 33, 200]))
                indent = len(head) - len(head.lstrip())
                value = "\n" + "\n".join(" " * (indent + 2 * (d + 1)) + ("- " if d % 2 else "k:") for d in range(k)) + " 1"
            else:  # big_list: many values, within the node bound or past it
                value = "[" + ",".join(["1"] * draw(REPEATS)) + "]"
            lines[i] = f"{head} {value}"
        elif op == "tab" and lines:
            lines[i] = re.sub(r"^ +", "\t", lines[i]) if draw(st.booleans()) else lines[i].replace(": ", ":\t", 1)
        elif op == "duplicate_line" and lines:
            lines.insert(i + 1, lines[i])
        elif op == "duplicate_block":
            tops = [k for k, line in enumerate(lines) if re.match(r"[A-Za-z_]", line)]
            if tops:
                start = draw(st.sampled_from(tops))
                end = next((k for k in tops if k > start), len(lines))
                lines.extend(lines[start:end])
        elif op == "delete" and lines:
            del lines[i]
        elif op == "swap" and lines:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent" and lines:
            lines[i] = " " * draw(st.integers(1, 3)) + lines[i] if draw(st.booleans()) else lines[i][1:]
        elif op == "laughs":  # the billion laughs, `depth` levels of `width` aliases each
            depth, width = draw(st.integers(1, 9)), draw(st.integers(2, 10))
            lines += [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
            lines += [f"l{d}: &l{d} [{', '.join([f'*l{d - 1}'] * width)}]" for d in range(1, depth)]
        elif op == "chain":  # acyclic aliases, each inside `depth` brackets: shallow text, a deep value
            depth, n = draw(st.sampled_from([1, 10, 31])), draw(st.sampled_from([2, 10, 40, 100, 1000]))
            lines += [f"c0: &c0 {'[' * depth}1{']' * depth}"]
            lines += [f"c{k}: &c{k} {'[' * depth}*c{k - 1}{']' * depth}" for k in range(1, n)]
        elif op == "document":
            lines.insert(i, draw(st.sampled_from(["---", "...", "--- !!map", "%YAML 1.1", "%YAML 2.0\n---", "%TAG ! x"])))
    return "\n".join(lines)


@st.composite
def example_config_inputs(draw) -> bytes:
    """A real example config, mutated line by line and (sometimes) byte by byte."""
    text = draw(mutated_yaml_text(draw(st.sampled_from(SEED_CONFIGS))))
    raw = text.encode("utf-8", "surrogatepass")
    return draw(mutated_bytes(raw, YAML_TOKENS, max_ops=2)) if draw(st.integers(0, 2)) == 0 else raw


@st.composite
def generated_config_inputs(draw) -> bytes:
    """YAML dumped from a generated config-shaped (or arbitrary) structure, then perturbed as text and bytes."""
    doc: dict = {}
    if draw(st.integers(0, 3)):
        doc["base_model"] = draw(st.sampled_from(["demo://zen-tiny", "demo://zen-r1-tiny", "./model", "demo://x"]))
    if draw(st.booleans()):
        doc["experts"] = draw(st.lists(st.fixed_dictionaries(
            {"source_model": st.sampled_from(["demo://zen-tiny", "demo://qwen3-moe-tiny", "m"]) | YAML_TREES},
            optional={"positive_prompts": st.lists(st.text(max_size=20), max_size=3), "keep": YAML_TREES,
                      "layers": YAML_TREES, "noise_scale": YAML_TREES}), max_size=3))
    doc.update(draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), YAML_TREES, max_size=5)))
    top = doc if draw(st.integers(0, 4)) else draw(YAML_TREES)
    text = yaml.safe_dump(top, default_flow_style=draw(st.sampled_from([False, True, None])), width=draw(st.sampled_from([80, 2**31])),
                          allow_unicode=draw(st.booleans()), sort_keys=draw(st.booleans()), indent=draw(st.sampled_from([2, 4])))
    if draw(st.booleans()):
        text = draw(mutated_yaml_text(text, max_ops=2))
    raw = text.encode("utf-8", "surrogatepass")
    return draw(mutated_bytes(raw, YAML_TOKENS, max_ops=2)) if draw(st.integers(0, 2)) == 0 else raw


CONFIG_INPUTS = st.one_of(example_config_inputs(), example_config_inputs(), generated_config_inputs(),
                          st.binary(max_size=256))

# ---------------------------------------------------------------------------------------------------------
# (c) JSON files of sources: config.json, index files, tokenizer.json.

SEED_JSON = [
    json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 128,
                "rms_norm_eps": 1e-06, "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 2240,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, indent=2),
    json.dumps({"metadata": {"total_size": 3633296}, "weight_map": {
        "lm_head.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}}, indent=2),
    json.dumps({"version": "1.0", "truncation": None, "added_tokens": [
        {"id": 0, "content": "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "special": True}],
        "model": {"type": "BPE", "vocab": {"a": 3, "b": 4, "ab": 5}, "merges": [["a", "b"]]}}, ensure_ascii=False),
]
JSON_DOCS = st.recursive(st.one_of(JSON_SCALARS, RAW_JSON),
                         lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
                         max_leaves=20)


@st.composite
def json_inputs(draw) -> bytes:
    """A realistic JSON file or a generated document (objects with repeated keys too), mutated."""
    if draw(st.booleans()):
        text = draw(st.sampled_from(SEED_JSON))
    else:
        doc = Obj([[k, v] for k, v in draw(st.lists(st.tuples(st.text(max_size=8), JSON_DOCS), max_size=6))])
        text = dump_json(doc if draw(st.integers(0, 3)) else draw(JSON_DOCS), ensure_ascii=draw(st.booleans()))
    return draw(mutated_bytes(text.encode("utf-8", "surrogatepass")[:MAX_INPUT_BYTES], JSON_TOKENS))


JSON_INPUTS = st.one_of(json_inputs(), json_inputs(), json_inputs(), st.binary(max_size=256))


@dataclass(frozen=True)
class Target:
    name: str
    suffix: str
    inputs: st.SearchStrategy[bytes]
    check: Callable[..., list[str]]
    trace: bool  # run under tracemalloc (the YAML parser is pure Python: tracing would slow it several times)


TARGETS = {
    "header": Target("header", ".safetensors", HEADER_INPUTS, check_header, trace=True),
    "config": Target("config", ".yml", CONFIG_INPUTS, check_config, trace=False),
    "json": Target("json", ".json", JSON_INPUTS, check_json, trace=True),
}

# ---------------------------------------------------------------------------------------------------------
# The tests: one file per example in tmp_path, overwritten (so the function-scoped fixture is fine).

# No explain phase: on a failure it reruns the failing input with its parts varied, over a thousand times
# (minutes, when each run ends in a RecursionError); the shrunk input is reported all the same.
settings.register_profile("zenith-fuzz", deadline=None, derandomize=True, database=None, print_blob=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("zenith-fuzz")
SCALE = float(os.environ.get("ZENITH_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on for the whole test (all its examples), so that each call's allocations are measured."""
    if tracemalloc.is_tracing():
        yield
        return
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _run(target: Target, blob: bytes, tmp_path: Path) -> None:
    path = tmp_path / f"input{target.suffix}"
    path.write_bytes(blob)
    try:
        target.check(path)
    except (Hang, MemoryBlowup) as err:  # no shrinking: name the input instead
        raise type(err)(f"{err} on {len(blob)} bytes left in {path}; starting {blob[:200]!r}") from None


@settings(FUZZ, max_examples=examples(150))
@given(blob=HEADER_INPUTS)
def test_read_header_fuzz(blob: bytes, tmp_path: Path, traced: None) -> None:
    _run(TARGETS["header"], blob, tmp_path)


@settings(FUZZ, max_examples=examples(450))
@given(blob=example_config_inputs())
def test_config_example_mutations_fuzz(blob: bytes, tmp_path: Path) -> None:
    _run(TARGETS["config"], blob, tmp_path)


@settings(FUZZ, max_examples=examples(450))
@given(blob=st.one_of(generated_config_inputs(), st.binary(max_size=256)))
def test_config_generated_yaml_fuzz(blob: bytes, tmp_path: Path) -> None:
    _run(TARGETS["config"], blob, tmp_path)


@settings(FUZZ, max_examples=examples(225))
@given(blob=JSON_INPUTS)
def test_read_json_file_fuzz(blob: bytes, tmp_path: Path, traced: None) -> None:
    _run(TARGETS["json"], blob, tmp_path)


@st.composite
def tensor_sets(draw) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    specs = draw(st.lists(st.tuples(NAMES.filter(lambda s: s and not _not_utf8(s)), st.sampled_from(CODES), SHAPES), max_size=5,
                          unique_by=lambda s: s[0]))
    tensors = {}
    for name, code, shape in specs:
        dtype = DTYPES[code]
        n = math.prod(shape) * dtype.itemsize
        raw = draw(st.binary(min_size=n, max_size=n))
        if dtype == torch.bool:
            raw = bytes(b & 1 for b in raw)
        tensors[name] = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n
                         else torch.empty(shape, dtype=dtype))
    return tensors, draw(METADATA)


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@settings(FUZZ, max_examples=examples(300))
@given(case=tensor_sets(), writer=st.sampled_from(["safetensors", "build_header"]))
def test_valid_files_round_trip(case, writer: str, tmp_path: Path) -> None:
    """A valid file is accepted with exactly the tensors written: names, dtypes, shapes, bytes, metadata."""
    tensors, metadata = case
    path = tmp_path / "valid.safetensors"
    if writer == "safetensors":
        from safetensors.torch import save_file

        if not tensors and metadata == {}:
            metadata = None  # safetensors 0.8.0 writes the invalid header '{},"__metadata__":{}}' for this

        save_file(tensors, str(path), metadata=metadata)
    else:
        specs = [(name, next(c for c, d in DTYPES.items() if d == t.dtype), list(t.shape)) for name, t in tensors.items()]
        path.write_bytes(build_header(specs, metadata) + b"".join(_bytes_of(t) for t in tensors.values()))
    check_header(path)  # crash-free and consistent first, then exactly the content written
    header = read_header(path)
    raw = path.read_bytes()
    assert set(header.tensors) == set(tensors)
    for name, t in tensors.items():
        e = header.tensors[name]
        assert DTYPES[e.dtype] == t.dtype and list(e.shape) == list(t.shape), name
        assert raw[header.data_start + e.begin:header.data_start + e.end] == _bytes_of(t), name
    expected = dict(metadata or {}) if writer == "safetensors" else dict({"format": "pt"} if metadata is None else metadata)
    assert header.metadata == expected
