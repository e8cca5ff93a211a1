"""Deterministic text corpora for the demo models: Python source code and step-by-step maths.

Everything is generated from seeded templates (`random.Random`), so every machine makes
the same text and nothing is read from disk or downloaded. Each domain has three
disjoint splits: `train` (models learn from it), `calibration` (merges may look at it:
router statistics, alignment maps, lambda search) and `heldout` (only evaluation reads
it). The splits use different seeds and are filtered against each other (no held-out
document also appears in training text), see `corpus`.

Maths comes in three styles: `plain` (a question, a DeepSeek-R1-style `<think>` trace,
the answer), `r1_chat` (the same inside DeepSeek's `<｜User｜>` / `<｜Assistant｜>` turn)
and `qwen_chat` (a Qwen3 chat turn with the `/think` or `/no_think` soft switch).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Literal

Domain = Literal["code", "maths"]
Split = Literal["train", "calibration", "heldout"]
Style = Literal["plain", "r1_chat", "qwen_chat"]

DOMAINS: tuple[str, ...] = ("code", "maths")
SPLITS: tuple[str, ...] = ("train", "calibration", "heldout")
STYLES: tuple[str, ...] = ("plain", "r1_chat", "qwen_chat")

_SPLIT_SEEDS = {"train": 1_000, "calibration": 2_000, "heldout": 3_000}
_DOMAIN_SEEDS = {"code": 11, "maths": 23}
_STYLE_SEEDS = {"plain": 0, "r1_chat": 3, "qwen_chat": 5}

HELDOUT_CHARS = 32_000
CALIBRATION_CHARS = 32_000

# --------------------------------------------------------------------------- code

VERBS = ["get", "set", "load", "save", "parse", "build", "compute", "update", "find", "merge", "split", "filter",
         "count", "render", "validate", "convert", "normalize", "collect", "read", "write", "apply", "resolve",
         "check", "make", "process", "format", "extract", "sort", "group", "scale"]
NOUNS = ["config", "items", "user", "record", "path", "token", "value", "index", "cache", "buffer", "node", "graph",
         "matrix", "vector", "file", "line", "header", "result", "batch", "layer", "weight", "score", "name", "key",
         "data", "rows", "words", "text", "numbers", "prices", "events", "entries", "params", "labels"]
TYPES = ["int", "str", "float", "list", "dict", "bool"]
CLASS_NOUNS = ["Parser", "Cache", "Queue", "Stack", "Graph", "Router", "Tokenizer", "Buffer", "Writer", "Reader",
               "Registry", "Counter", "Matrix", "Session", "Scheduler", "Loader", "Inventory", "Account", "Timer"]
MODULES = ["os", "sys", "json", "math", "re", "random", "itertools", "collections", "functools", "pathlib", "time"]


def _ident(r: random.Random) -> str:
    return f"{r.choice(VERBS)}_{r.choice(NOUNS)}"


def _seq_name(r: random.Random) -> str:
    return r.choice(["items", "values", "numbers", "data", "xs", "rows", "scores", "prices", "words", "entries"])


def _maybe_doc(r: random.Random, indent: str, text: str) -> list[str]:
    return [f'{indent}"""{text}"""'] if r.random() < 0.7 else []


def _hint(r: random.Random, hinted: bool, kind: str) -> str:
    return f": {kind}" if hinted else ""


def _t_sum_squares(r: random.Random) -> list[str]:
    name, xs, h = r.choice(["sum_of_squares", "square_sum", "total_squared"]), _seq_name(r), r.random() < 0.5
    acc = r.choice(["total", "acc", "result", "s"])
    return [f"def {name}({xs}{_hint(r, h, 'list[int]')}){' -> int' if h else ''}:",
            *_maybe_doc(r, "    ", f"Return the sum of the squares of {xs}."),
            f"    {acc} = 0", f"    for x in {xs}:", f"        {acc} += x * x", f"    return {acc}"]


def _t_filter(r: random.Random) -> list[str]:
    xs, op, k = _seq_name(r), r.choice(["%", ">", "<"]), r.randint(2, 9)
    cond = {"%": f"x % {k} == 0", ">": f"x > {k}", "<": f"x < {k}"}[op]
    name = {"%": f"multiples_of_{k}", ">": f"greater_than_{k}", "<": f"below_{k}"}[op]
    if r.random() < 0.5:
        return [f"def {name}({xs}):", *_maybe_doc(r, "    ", f"Keep the elements of {xs} where {cond}."),
                f"    return [x for x in {xs} if {cond}]"]
    out = r.choice(["out", "kept", "result"])
    return [f"def {name}({xs}):", f"    {out} = []", f"    for x in {xs}:", f"        if {cond}:",
            f"            {out}.append(x)", f"    return {out}"]


def _t_word_count(r: random.Random) -> list[str]:
    text, counts = r.choice(["text", "line", "sentence", "doc"]), r.choice(["counts", "freq", "tally"])
    if r.random() < 0.5:
        return ["from collections import Counter", "", "",
                f"def word_counts({text}: str) -> dict[str, int]:",
                *_maybe_doc(r, "    ", "Count how often each word occurs, ignoring case."),
                f"    return dict(Counter({text}.lower().split()))"]
    return [f"def word_counts({text}):", *_maybe_doc(r, "    ", "Count how often each word occurs."),
            f"    {counts} = {{}}", f"    for word in {text}.split():", "        word = word.strip('.,!?').lower()",
            f"        {counts}[word] = {counts}.get(word, 0) + 1", f"    return {counts}"]


def _t_fib(r: random.Random) -> list[str]:
    n = r.choice(["n", "count", "k"])
    if r.random() < 0.5:
        return [f"def fibonacci({n}: int) -> int:", *_maybe_doc(r, "    ", f"Return the {n}-th Fibonacci number."),
                "    a, b = 0, 1", f"    for _ in range({n}):", "        a, b = b, a + b", "    return a"]
    return ["from functools import lru_cache", "", "", "@lru_cache(maxsize=None)", f"def fib({n}):",
            f"    if {n} < 2:", f"        return {n}", f"    return fib({n} - 1) + fib({n} - 2)"]


def _t_factorial(r: random.Random) -> list[str]:
    n = r.choice(["n", "k", "m"])
    if r.random() < 0.5:
        return [f"def factorial({n}):", f"    if {n} <= 1:", "        return 1", f"    return {n} * factorial({n} - 1)"]
    return [f"def factorial({n}: int) -> int:", *_maybe_doc(r, "    ", f"Compute {n}! iteratively."),
            "    result = 1", f"    for i in range(2, {n} + 1):", "        result *= i", "    return result"]


def _t_is_prime(r: random.Random) -> list[str]:
    n = r.choice(["n", "num", "value"])
    return [f"def is_prime({n}: int) -> bool:", *_maybe_doc(r, "    ", f"True if {n} is a prime number."),
            f"    if {n} < 2:", "        return False", "    i = 2", f"    while i * i <= {n}:",
            f"        if {n} % i == 0:", "            return False", "        i += 1", "    return True"]


def _t_binary_search(r: random.Random) -> list[str]:
    xs, t = _seq_name(r), r.choice(["target", "key", "value"])
    lo, hi = r.choice([("lo", "hi"), ("left", "right"), ("low", "high")])
    return [f"def binary_search({xs}, {t}):", *_maybe_doc(r, "    ", f"Index of {t} in the sorted list {xs}, or -1."),
            f"    {lo}, {hi} = 0, len({xs}) - 1", f"    while {lo} <= {hi}:", f"        mid = ({lo} + {hi}) // 2",
            f"        if {xs}[mid] == {t}:", "            return mid", f"        if {xs}[mid] < {t}:",
            f"            {lo} = mid + 1", "        else:", f"            {hi} = mid - 1", "    return -1"]


def _t_chunks(r: random.Random) -> list[str]:
    xs, size = _seq_name(r), r.choice(["size", "n", "batch_size", "chunk_size"])
    return [f"def chunks({xs}, {size}={r.choice([2, 4, 8, 16, 32])}):",
            *_maybe_doc(r, "    ", f"Yield successive pieces of {xs} of length {size}."),
            f"    for i in range(0, len({xs}), {size}):", f"        yield {xs}[i:i + {size}]"]


def _t_flatten(r: random.Random) -> list[str]:
    xs = r.choice(["nested", "lists", "rows", "groups"])
    if r.random() < 0.5:
        return [f"def flatten({xs}):", f"    return [x for row in {xs} for x in row]"]
    return [f"def flatten({xs}):", *_maybe_doc(r, "    ", "Flatten arbitrarily nested lists."), "    out = []",
            f"    for item in {xs}:", "        if isinstance(item, list):", "            out.extend(flatten(item))",
            "        else:", "            out.append(item)", "    return out"]


def _t_moving_average(r: random.Random) -> list[str]:
    xs, w = _seq_name(r), r.choice(["window", "k", "width"])
    return [f"def moving_average({xs}: list[float], {w}: int = {r.randint(2, 7)}) -> list[float]:",
            *_maybe_doc(r, "    ", f"Average of each run of {w} consecutive values."), "    out = []",
            f"    for i in range(len({xs}) - {w} + 1):", f"        out.append(sum({xs}[i:i + {w}]) / {w})", "    return out"]


def _t_clamp(r: random.Random) -> list[str]:
    x = r.choice(["x", "value", "v"])
    lo, hi = r.randint(-10, 0), r.randint(1, 255)
    return [f"def clamp({x}, lo={lo}, hi={hi}):", *_maybe_doc(r, "    ", f"Limit {x} to the range [lo, hi]."),
            f"    return max(lo, min(hi, {x}))"]


def _t_dot(r: random.Random) -> list[str]:
    a, b = r.choice([("a", "b"), ("u", "v"), ("x", "y")])
    if r.random() < 0.5:
        return [f"def dot({a}, {b}):", f"    return sum(p * q for p, q in zip({a}, {b}))"]
    return ["import math", "", "", f"def norm({a}):", *_maybe_doc(r, "    ", "Euclidean length of a vector."),
            f"    return math.sqrt(sum(x * x for x in {a}))", "", "", f"def normalize({a}):",
            f"    length = norm({a})", "    if length == 0:", f"        return list({a})",
            f"    return [x / length for x in {a}]"]


def _t_transpose(r: random.Random) -> list[str]:
    m = r.choice(["matrix", "grid", "m", "rows"])
    if r.random() < 0.5:
        return [f"def transpose({m}):", f"    return [list(col) for col in zip(*{m})]"]
    return [f"def transpose({m}):", *_maybe_doc(r, "    ", "Swap rows and columns."),
            f"    n_rows, n_cols = len({m}), len({m}[0])",
            f"    return [[{m}[i][j] for i in range(n_rows)] for j in range(n_cols)]"]


def _t_group_by(r: random.Random) -> list[str]:
    xs, key = r.choice(["records", "items", "events", "users"]), r.choice(["name", "kind", "city", "year", "status"])
    return ["from collections import defaultdict", "", "", f"def group_by_{key}({xs}):",
            *_maybe_doc(r, "    ", f"Map each {key} to the list of {xs} that have it."), "    groups = defaultdict(list)",
            f"    for item in {xs}:", f"        groups[item[\"{key}\"]].append(item)", "    return dict(groups)"]


def _t_dedupe(r: random.Random) -> list[str]:
    xs = _seq_name(r)
    return [f"def unique({xs}):", *_maybe_doc(r, "    ", "Drop duplicates, keeping the first occurrence."),
            "    seen = set()", "    out = []", f"    for x in {xs}:", "        if x not in seen:",
            "            seen.add(x)", "            out.append(x)", "    return out"]


def _t_gcd(r: random.Random) -> list[str]:
    a, b = r.choice([("a", "b"), ("m", "n"), ("x", "y")])
    return [f"def gcd({a}: int, {b}: int) -> int:", *_maybe_doc(r, "    ", "Greatest common divisor (Euclid)."),
            f"    while {b}:", f"        {a}, {b} = {b}, {a} % {b}", f"    return {a}", "", "",
            f"def lcm({a}: int, {b}: int) -> int:", f"    return {a} * {b} // gcd({a}, {b})"]


def _t_snake_case(r: random.Random) -> list[str]:
    s = r.choice(["name", "text", "s"])
    return ["import re", "", "", f"def to_snake_case({s}: str) -> str:",
            *_maybe_doc(r, "    ", "Convert CamelCase to snake_case."),
            f"    {s} = re.sub(r\"(.)([A-Z][a-z]+)\", r\"\\1_\\2\", {s})",
            f"    return re.sub(r\"([a-z0-9])([A-Z])\", r\"\\1_\\2\", {s}).lower()"]


def _t_read_config(r: random.Random) -> list[str]:
    path, sep = r.choice(["path", "filename", "config_path"]), r.choice(["=", ":"])
    return [f"def read_config({path}):", *_maybe_doc(r, "    ", f"Parse `key {sep} value` lines into a dict."),
            "    config = {}", f"    with open({path}) as f:", "        for line in f:", "            line = line.strip()",
            "            if not line or line.startswith(\"#\"):", "                continue",
            f"            key, value = line.split(\"{sep}\", 1)", "            config[key.strip()] = value.strip()",
            "    return config"]


def _t_json_io(r: random.Random) -> list[str]:
    obj, path = r.choice(["data", "obj", "payload", "state"]), r.choice(["path", "filename", "out_file"])
    return ["import json", "", "", f"def save_json({obj}, {path}):", f"    with open({path}, \"w\") as f:",
            f"        json.dump({obj}, f, indent={r.choice([2, 4])})", "", "", f"def load_json({path}):",
            f"    with open({path}) as f:", "        return json.load(f)"]


def _t_max_index(r: random.Random) -> list[str]:
    xs, best = _seq_name(r), r.choice(["best", "top", "largest"])
    return [f"def argmax({xs}):", *_maybe_doc(r, "    ", f"Index of the largest element of {xs}."),
            f"    {best} = 0", f"    for i, x in enumerate({xs}):", f"        if x > {xs}[{best}]:",
            f"            {best} = i", f"    return {best}"]


def _t_dict_merge(r: random.Random) -> list[str]:
    a, b = r.choice([("defaults", "overrides"), ("base", "extra"), ("left", "right")])
    return [f"def merge_dicts({a}: dict, {b}: dict) -> dict:",
            *_maybe_doc(r, "    ", f"A new dict with the keys of {a}, updated by {b}."),
            f"    result = dict({a})", f"    for key, value in {b}.items():",
            "        if isinstance(value, dict) and isinstance(result.get(key), dict):",
            "            result[key] = merge_dicts(result[key], value)", "        else:",
            "            result[key] = value", "    return result"]


def _t_stack_class(r: random.Random) -> list[str]:
    cls, store = r.choice(["Stack", "LifoQueue", "History"]), r.choice(["_items", "items", "_data"])
    return [f"class {cls}:", *_maybe_doc(r, "    ", "A last-in, first-out stack."), "",
            "    def __init__(self):", f"        self.{store} = []", "", "    def push(self, item):",
            f"        self.{store}.append(item)", "", "    def pop(self):", f"        if not self.{store}:",
            f"            raise IndexError(\"pop from empty {cls.lower()}\")", f"        return self.{store}.pop()", "",
            "    def __len__(self):", f"        return len(self.{store})"]


def _t_counter_class(r: random.Random) -> list[str]:
    cls = r.choice(["Counter", "Tally", "Meter"])
    return [f"class {cls}:", *_maybe_doc(r, "    ", "Count events by name."), "",
            f"    def __init__(self, start: int = {r.choice([0, 1])}):", "        self.start = start",
            "        self.counts = {}", "", "    def add(self, name: str, n: int = 1) -> None:",
            "        self.counts[name] = self.counts.get(name, self.start) + n", "",
            "    def most_common(self, k: int = 3):",
            "        return sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)[:k]"]


def _t_dataclass(r: random.Random) -> list[str]:
    cls = r.choice(["Point", "Vector", "Item", "Order", "Employee", "Task"])
    fields = r.sample([("x", "float"), ("y", "float"), ("name", "str"), ("price", "float"), ("count", "int"),
                       ("priority", "int"), ("done", "bool")], r.randint(2, 4))
    first = fields[0][0]
    return ["from dataclasses import dataclass", "", "", "@dataclass", f"class {cls}:",
            *[f"    {n}: {t}" for n, t in fields], "",
            "    def describe(self) -> str:", f"        return f\"{cls}({first}={{self.{first}}})\""]


def _t_account_class(r: random.Random) -> list[str]:
    cls, bal = r.choice(["Account", "Wallet", "Budget"]), r.choice(["balance", "total", "amount"])
    return [f"class {cls}:", f"    def __init__(self, owner, {bal}=0):", "        self.owner = owner",
            f"        self.{bal} = {bal}", "", "    def deposit(self, value):", "        if value <= 0:",
            "            raise ValueError(\"deposit must be positive\")", f"        self.{bal} += value",
            f"        return self.{bal}", "", "    def withdraw(self, value):", f"        if value > self.{bal}:",
            "            raise ValueError(\"insufficient funds\")", f"        self.{bal} -= value",
            f"        return self.{bal}", "", "    def __repr__(self):",
            f"        return f\"{cls}({{self.owner!r}}, {{self.{bal}}})\""]


def _t_lru_class(r: random.Random) -> list[str]:
    cap = r.choice([8, 16, 32, 64, 128])
    return ["from collections import OrderedDict", "", "", "class LRUCache:",
            *_maybe_doc(r, "    ", "A fixed-size cache that evicts the least recently used key."), "",
            f"    def __init__(self, capacity={cap}):", "        self.capacity = capacity",
            "        self.data = OrderedDict()", "", "    def get(self, key, default=None):",
            "        if key not in self.data:", "            return default", "        self.data.move_to_end(key)",
            "        return self.data[key]", "", "    def put(self, key, value):", "        self.data[key] = value",
            "        self.data.move_to_end(key)", "        if len(self.data) > self.capacity:",
            "            self.data.popitem(last=False)"]


def _t_tests(r: random.Random) -> list[str]:
    a, b = r.randint(1, 50), r.randint(1, 50)
    fn = r.choice(["add", "total", "combine"])
    return [f"def {fn}(a, b):", "    return a + b", "", "", f"def test_{fn}():", f"    assert {fn}({a}, {b}) == {a + b}",
            f"    assert {fn}(0, {b}) == {b}", f"    assert {fn}(-{a}, {a}) == 0"]


def _t_main(r: random.Random) -> list[str]:
    fn, arg = _ident(r), r.choice(["path", "args", "name"])
    return ["import sys", "", "", "def main(argv):", "    if len(argv) < 2:",
            f"        print(\"usage: {fn.replace('_', '-')} {arg.upper()}\")", "        return 1",
            f"    {arg} = argv[1]", f"    print({fn}({arg}))", "    return 0", "", "",
            "if __name__ == \"__main__\":", "    sys.exit(main(sys.argv))"]


def _expr(r: random.Random, names: list[str]) -> str:
    a, b = r.choice(names), r.choice(names + [str(r.randint(1, 9))])
    return r.choice([f"{a} + {b}", f"{a} * {b}", f"{a} - {b}", f"len({a})", f"{a}[{r.randint(0, 3)}]",
                     f"max({a}, {b})", f"{a} // {r.randint(2, 9)}", f"{a} % {r.randint(2, 9)}", f"abs({a})"])


def _statement(r: random.Random, names: list[str], indent: str, depth: int = 0) -> list[str]:
    kinds = ["assign", "assign", "if", "for", "append", "call", "comp"] if depth < 2 else ["assign", "append", "call"]
    kind, var = r.choice(kinds), r.choice(NOUNS)
    if kind == "assign":
        names.append(var)
        return [f"{indent}{var} = {_expr(r, names)}"]
    if kind == "append":
        return [f"{indent}{r.choice(names)}.append({_expr(r, names)})"]
    if kind == "call":
        return [f"{indent}{var} = {_ident(r)}({r.choice(names)})"]
    if kind == "comp":
        names.append(var)
        return [f"{indent}{var} = [x {r.choice(['*', '+', '-'])} {r.randint(1, 9)} for x in {r.choice(names)} "
                f"if x {r.choice(['>', '<', '!='])} {r.randint(0, 9)}]"]
    if kind == "if":
        cond = f"{r.choice(names)} {r.choice(['>', '<', '==', '>=', 'is not'])} {r.choice(['0', 'None', str(r.randint(1, 99))])}"
        out = [f"{indent}if {cond}:", *_statement(r, names, indent + "    ", depth + 1)]
        if r.random() < 0.4:
            out += [f"{indent}else:", *_statement(r, names, indent + "    ", depth + 1)]
        return out
    loop_var = r.choice(["i", "item", "row", "x", "key"])
    it = r.choice([f"range({r.choice(names)})", r.choice(names), f"enumerate({r.choice(names)})"])
    return [f"{indent}for {loop_var} in {it}:", *_statement(r, names + [loop_var], indent + "    ", depth + 1)]


def _t_random_function(r: random.Random, indent: str = "", method: bool = False) -> list[str]:
    """A function composed from random statements: the long tail that templates do not cover."""
    args = r.sample(NOUNS, r.randint(1, 3))
    params = ", ".join((["self"] if method else []) + [f"{a}: {r.choice(TYPES)}" if r.random() < 0.5 else a for a in args])
    name = _ident(r)
    lines = [f"{indent}def {name}({params}):",
             *_maybe_doc(r, indent + "    ", f"{name.replace('_', ' ').capitalize()} from the given {args[0]}.")]
    names = list(args)
    for _ in range(r.randint(2, 5)):
        lines += _statement(r, names, indent + "    ")
    lines.append(f"{indent}    return {r.choice(names)}")
    return lines


def _t_random_class(r: random.Random) -> list[str]:
    cls = r.choice(CLASS_NOUNS)
    return [f"class {cls}:", *_maybe_doc(r, "    ", f"A {cls.lower()} of {r.choice(NOUNS)}."), "",
            f"    def __init__(self, capacity={r.choice([8, 16, 32, 100])}):", "        self.capacity = capacity",
            f"        self.{r.choice(NOUNS)} = []", "", *_t_random_function(r, "    ", method=True)]


CODE_TEMPLATES: tuple[Callable[[random.Random], list[str]], ...] = (
    _t_sum_squares, _t_filter, _t_word_count, _t_fib, _t_factorial, _t_is_prime, _t_binary_search, _t_chunks,
    _t_flatten, _t_moving_average, _t_clamp, _t_dot, _t_transpose, _t_group_by, _t_dedupe, _t_gcd, _t_snake_case,
    _t_read_config, _t_json_io, _t_max_index, _t_dict_merge, _t_stack_class, _t_counter_class, _t_dataclass,
    _t_account_class, _t_lru_class, _t_tests, _t_main, _t_random_function, _t_random_function, _t_random_class,
)


def code_sample(r: random.Random) -> str:
    """One small Python module: maybe a docstring, its imports, then one to three top-level definitions."""
    imports = {f"import {m}" for m in r.sample(MODULES, r.randint(1, 2))} if r.random() < 0.3 else set()
    blocks = []
    for _ in range(r.randint(1, 3)):
        lines = r.choice(CODE_TEMPLATES)(r)
        imports.update(line for line in lines if line.startswith(("import ", "from ")))
        body = [line for line in lines if not line.startswith(("import ", "from "))]
        while body and not body[0]:
            body.pop(0)
        blocks.append("\n".join(body))
    head = []
    if r.random() < 0.3:
        head.append(f'"""{r.choice(["Helpers", "Utilities", "Tools", "Routines"])} for {r.choice(NOUNS)} '
                    f'{r.choice(["processing", "handling", "storage", "analysis"])}."""')
    if imports:  # isort's order: plain imports, then from-imports
        head.append("\n".join(sorted(i for i in imports if i.startswith("import ")) +
                              sorted(i for i in imports if i.startswith("from "))))
    return "\n\n".join(head) + ("\n\n\n" if head else "") + "\n\n\n".join(blocks) + "\n"


# -------------------------------------------------------------------------- maths

PEOPLE = ["Alice", "Bob", "Carla", "Deepak", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nadia", "Omar", "Priya"]
THINGS = ["apples", "books", "marbles", "coins", "pencils", "tickets", "cookies", "stamps", "shells", "cards",
          "stickers", "oranges", "bottles", "eggs"]


def _add_steps(a: int, b: int) -> str:
    steps, carry, x, y = [], 0, a, b
    while x or y or carry:
        da, db = x % 10, y % 10
        s = da + db + carry
        steps.append(f"{da} + {db}{f' + {carry}' if carry else ''} = {s}, write {s % 10}"
                     f"{', carry 1' if s >= 10 else ''}")
        carry, x, y = s // 10, x // 10, y // 10
    return "; ".join(steps)


def _p_add(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(10, 999), r.randint(10, 999)
    return (f"What is {a} + {b}?", f"Add digit by digit from the right: {_add_steps(a, b)}. So {a} + {b} = {a + b}.",
            str(a + b))


def _p_sub(r: random.Random) -> tuple[str, str, str]:
    a, b = sorted((r.randint(10, 999), r.randint(10, 999)), reverse=True)
    t = b // 10 * 10
    return (f"What is {a} - {b}?", f"{a} - {b}: first take away {t} to get {a - t}, then take away {b % 10} "
            f"to get {a - b}.", str(a - b))


def _p_mul(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(11, 99), r.randint(11, 99)
    t, u = b // 10 * 10, b % 10
    return (f"What is {a} * {b}?", f"Split {b} = {t} + {u}. {a} * {t} = {a * t}. {a} * {u} = {a * u}. "
            f"Then {a * t} + {a * u} = {a * b}.", str(a * b))


def _p_div(r: random.Random) -> tuple[str, str, str]:
    b, q, rem = r.randint(3, 12), r.randint(4, 60), 0
    rem = r.randint(0, b - 1) if r.random() < 0.5 else 0
    a = b * q + rem
    steps = f"{b} * {q} = {b * q}, which is the largest multiple of {b} not above {a}. {a} - {b * q} = {rem}."
    ans = f"{q} remainder {rem}" if rem else str(q)
    return f"What is {a} divided by {b}?", steps + f" So {a} / {b} = {ans}.", ans


def _p_linear(r: random.Random) -> tuple[str, str, str]:
    x, a, b = r.randint(-9, 20), r.randint(2, 9), r.randint(1, 30)
    c = a * x + b
    return (f"Solve for x: {a}x + {b} = {c}.", f"Subtract {b} from both sides: {a}x = {c - b}. Divide both sides "
            f"by {a}: x = {x}. Check: {a} * {x} + {b} = {c}.", f"x = {x}")


def _p_two_sided(r: random.Random) -> tuple[str, str, str]:
    x, a, c = r.randint(-9, 15), r.randint(4, 9), r.randint(1, 3)
    b = r.randint(1, 20)
    d = a * x + b - c * x
    rhs = f"{c}x + {d}" if d >= 0 else f"{c}x - {-d}"
    return (f"Solve for x: {a}x + {b} = {rhs}.", f"Subtract {c}x from both sides: {a - c}x + {b} = {d}. "
            f"Subtract {b}: {a - c}x = {d - b}. Divide by {a - c}: x = {x}.", f"x = {x}")


def _p_speed(r: random.Random) -> tuple[str, str, str]:
    v, t = r.randint(20, 120), r.choice([1, 2, 3, 4, 1.5, 2.5])
    d = f"{v * t:g}"
    return (f"A train travels {d} km in {t:g} hours. What is its average speed?",
            f"Average speed = distance / time = {d} / {t:g} = {v} km/h.", f"{v} km/h")


def _p_percent(r: random.Random) -> tuple[str, str, str]:
    p, n = r.choice([10, 20, 25, 50, 75, 5, 15]), r.randint(2, 40) * 20
    return (f"What is {p}% of {n}?", f"{p}% means {p}/100. {n} * {p} / 100 = {n * p} / 100 = {n * p // 100}.",
            str(n * p // 100))


def _p_shopping(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    n, price, paid = r.randint(2, 9), r.randint(2, 15), 0
    cost = n * price
    paid = r.choice([x for x in (20, 50, 100, 200) if x >= cost])
    return (f"{who} buys {n} {thing} at {price} dollars each and pays with {paid} dollars. How much change "
            f"does {who} get?", f"Cost: {n} * {price} = {cost} dollars. Change: {paid} - {cost} = {paid - cost} dollars.",
            f"{paid - cost} dollars")


def _p_word(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    a, b, c = r.randint(5, 60), r.randint(2, 30), r.randint(1, 20)
    return (f"{who} has {a} {thing}, buys {b} more and gives away {c}. How many {thing} does {who} have now?",
            f"Start with {a}. After buying: {a} + {b} = {a + b}. After giving away: {a + b} - {c} = {a + b - c}.",
            str(a + b - c))


def _p_share(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    k, each = r.randint(2, 8), r.randint(2, 12)
    return (f"{who} shares {k * each} {thing} equally among {k} friends. How many does each friend get?",
            f"Each friend gets {k * each} / {k}. {k} * {each} = {k * each}, so {k * each} / {k} = {each}.", str(each))


def _p_area(r: random.Random) -> tuple[str, str, str]:
    w, h = r.randint(2, 30), r.randint(2, 30)
    if r.random() < 0.5:
        return (f"A rectangle is {w} cm wide and {h} cm long. What is its area?",
                f"Area = width * length = {w} * {h} = {w * h} square cm.", f"{w * h} square cm")
    return (f"A rectangle is {w} cm wide and {h} cm long. What is its perimeter?",
            f"Perimeter = 2 * (width + length) = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} cm.", f"{2 * (w + h)} cm")


def _p_average(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(3, 5)
    mean = r.randint(5, 60)
    xs = [mean + r.randint(-9, 9) for _ in range(n - 1)]
    xs.append(mean * n - sum(xs))
    s = " + ".join(map(str, xs))
    return (f"What is the average of {', '.join(map(str, xs))}?",
            f"Sum: {s} = {mean * n}. There are {n} numbers. {mean * n} / {n} = {mean}.", str(mean))


def _p_order_ops(r: random.Random) -> tuple[str, str, str]:
    a, b, c = r.randint(2, 20), r.randint(2, 9), r.randint(2, 9)
    return (f"Evaluate {a} + {b} * {c}.", f"Multiplication comes first: {b} * {c} = {b * c}. Then {a} + {b * c} = "
            f"{a + b * c}.", str(a + b * c))


def _p_square(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(11, 40)
    t, u = n // 10 * 10, n % 10
    return (f"What is {n} squared?", f"{n}^2 = ({t} + {u})^2 = {t}^2 + 2 * {t} * {u} + {u}^2 = {t * t} + "
            f"{2 * t * u} + {u * u} = {n * n}.", str(n * n))


def _p_fraction(r: random.Random) -> tuple[str, str, str]:
    from math import gcd

    b, d = r.choice([2, 3, 4, 5, 6, 8]), r.choice([2, 3, 4, 5, 6, 8])
    a, c = r.randint(1, b - 1) if b > 1 else 1, r.randint(1, d - 1) if d > 1 else 1
    num, den = a * d + c * b, b * d
    g = gcd(num, den)
    simp = f" Simplify by {g}: {num // g}/{den // g}." if g > 1 else ""
    ans = f"{num // g}/{den // g}"
    return (f"What is {a}/{b} + {c}/{d}?", f"Common denominator {b} * {d} = {den}. {a}/{b} = {a * d}/{den} and "
            f"{c}/{d} = {c * b}/{den}. Sum: {a * d + c * b}/{den}.{simp}", ans)


MATHS_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _p_add, _p_sub, _p_mul, _p_div, _p_linear, _p_two_sided, _p_speed, _p_percent, _p_shopping, _p_word, _p_share,
    _p_area, _p_average, _p_order_ops, _p_square, _p_fraction,
)


def maths_problem(r: random.Random) -> tuple[str, str, str]:
    """(question, step-by-step reasoning, answer) for one arithmetic or algebra problem."""
    return r.choice(MATHS_TEMPLATES)(r)


def format_problem(q: str, steps: str, answer: str, style: Style = "plain", *, think: bool = True) -> str:
    """One worked problem as text in a style (see the module docstring); `think=False` is Qwen3's `/no_think`."""
    if style == "plain":
        return f"Question: {q}\n<think>\n{steps}\n</think>\nThe answer is {answer}.\n\n"
    if style == "r1_chat":
        return (f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜><think>\n{steps}\n</think>\n\n"
                f"The answer is {answer}.<｜end▁of▁sentence｜>")
    if style != "qwen_chat":
        raise ValueError(f"unknown maths style {style!r}; styles: {', '.join(STYLES)}")
    if think:
        return (f"<|im_start|>user\n{q} /think<|im_end|>\n<|im_start|>assistant\n<think>\n{steps}\n</think>\n\n"
                f"The answer is {answer}.<|im_end|>\n")
    return (f"<|im_start|>user\n{q} /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            f"The answer is {answer}.<|im_end|>\n")


def maths_sample(r: random.Random, style: Style = "plain") -> str:
    """One worked problem in a style; a quarter of Qwen chat turns use `/no_think` (an empty think block)."""
    return _maths_doc(r, style)[1]


def _maths_doc(r: random.Random, style: str) -> tuple[str, str]:
    q, steps, answer = maths_problem(r)
    think = r.random() < 0.75 if style == "qwen_chat" else True
    return q, format_problem(q, steps, answer, style, think=think)


# ------------------------------------------------------------------------- splits

def _iter_docs(domain: str, split: str, style: str) -> Iterator[tuple[bytes, str]]:
    """Endless seeded documents of one split, each with its identity key (code: the text; maths: the question)."""
    r = random.Random(_SPLIT_SEEDS[split] * 7919 + _DOMAIN_SEEDS[domain] * 31 + _STYLE_SEEDS[style])
    while True:
        if domain == "code":
            doc = code_sample(r) + "\n\n"
            key = doc
        else:
            key, doc = _maths_doc(r, style)
        yield hashlib.blake2b(key.encode(), digest_size=8).digest(), doc


def _take(docs: Iterator[tuple[bytes, str]], n_chars: int, exclude: frozenset[bytes] = frozenset()) -> list[tuple[bytes, str]]:
    out, size = [], 0
    for key, doc in docs:
        if size >= n_chars:
            break
        if key not in exclude:
            out.append((key, doc))
            size += len(doc)
    return out


@lru_cache(maxsize=4)
def _reserved(domain: str) -> frozenset[bytes]:
    """Keys of every held-out and calibration document of a domain (all styles): training never emits them."""
    styles = STYLES if domain == "maths" else ("plain",)
    return frozenset(key for split, n in (("heldout", HELDOUT_CHARS), ("calibration", CALIBRATION_CHARS))
                     for style in styles for key, _ in _take(_iter_docs(domain, split, style), n))


def corpus(domain: Domain, split: Split, n_chars: int, *, style: Style = "plain") -> str:
    """At least `n_chars` characters of one domain and split; same arguments, same text on every machine.

    `style` only applies to maths. Training text skips every document (for maths: every
    question) that the held-out or calibration text of any style contains, so evaluation
    measures generalisation rather than recall.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    exclude = _reserved(domain) if split == "train" else frozenset()
    docs = _iter_docs(domain, split, style if domain == "maths" else "plain")
    return "".join(doc for _, doc in _take(docs, n_chars, exclude))


def heldout_text(domain: Domain, *, style: Style = "plain") -> str:
    """Held-out evaluation text of a domain (about 32 KB; never trained on, never used to calibrate)."""
    return corpus(domain, "heldout", HELDOUT_CHARS, style=style)


def calibration_text(domain: Domain, *, style: Style = "plain") -> str:
    """Calibration text of a domain (about 32 KB), disjoint from the training and held-out text."""
    return corpus(domain, "calibration", CALIBRATION_CHARS, style=style)
