"""The demo's Python source: small modules drawn from seeded templates (functions, classes, tests), in
isort's import order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

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
