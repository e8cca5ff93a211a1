"""JSON from files zenith-merge did not write (safetensors headers, config.json, indexes, tokenizer.json),
parsed within bounds so that a hostile or corrupt file is an error naming it, never a crash or a hang.

Python's parser fails on such input with exceptions that are not `JSONDecodeError` (deep nesting:
RecursionError; an integer of more than 4,300 digits: ValueError) or accepts it at a cost. The bounds
are checked on the raw text before any Python structure is built: nesting depth (counted on the
brackets outside strings), and the length of every number (the parser hands each one over as text).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ZenithError

MAX_DEPTH = 64  # real files: a safetensors header 3 levels, a tokenizer.json about 6
MAX_NUMBER_CHARS = 64  # the longest float repr is 24 characters; no real id or size comes close

# a string, its closing quote optional: an unterminated one is consumed to the end, so every byte is looked at
# once (with the quote required, each quote of an unterminated string restarts a scan: quadratic, found by
# fuzzing: 83 s on a 124 KB header). Unrolled and possessive: a repeated alternation kept a backtracking
# state per character (480 MB for a 4 MB string, also found by fuzzing)
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings not counted), in
    time linear in its length: strings removed by one regex pass, then depth = max of the running sum of
    +1 per opening and -1 per closing bracket."""
    import numpy as np

    if sum(raw.count(b) for b in (b"[", b"{")) == 0:
        return 0
    codes = np.frombuffer(_STRING.sub(b"", raw), dtype=np.uint8)
    step = np.zeros(256, dtype=np.int32)
    step[list(_OPEN)], step[list(_CLOSE)] = 1, -1
    return int(np.cumsum(step[codes], dtype=np.int32).max(initial=0))


def loads_bounded(raw: bytes | str, *, where: str, error: type[ZenithError], finite: bool = False,
                  max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON `raw` within the module's bounds; `error(...)` naming `where` for anything wrong.

    With `finite`, the constants NaN and Infinity (which Python's parser accepts) are refused too.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)

    def number(kind):
        def parse(text: str):
            if len(text) > MAX_NUMBER_CHARS:
                raise error(f"{where}: a number of {len(text)} characters ({text[:20]}...): corrupt or hostile JSON")
            return kind(text)
        return parse

    def constant(name: str):
        if finite:
            raise error(f"{where}: {name} is not a finite number")
        return float(name.replace("Infinity", "inf"))

    depth = nesting_depth(data)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep (at most {max_depth}): corrupt or hostile file")
    try:
        return json.loads(data, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except UnicodeDecodeError:
        raise error(f"{where}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err})") from None
    except RecursionError:  # a bound above the interpreter's: refused all the same
        raise error(f"{where}: JSON nested too deep") from None


def read_json_file(path: Path, *, error: type[ZenithError], mapping: bool = True) -> Any:
    """A JSON file's data, parsed within bounds; `error` names the file when it is unreadable, is not
    JSON, or (with `mapping`) is not a JSON object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    data = loads_bounded(raw, where=str(path), error=error)
    if mapping and not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data
