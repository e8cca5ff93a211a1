"""The token map of a union output: for every union id, its id in each source and how its rows are made.

Written by the tokenizer stage into `<output>/.zenith/`, read by the writer (embedding and
lm_head rows), router training (the teacher's ids), the plan summary, the model card and the
smoke test. It lives here, apart from the stage, so that the checks read the written files
without importing a stage.

Two files, compact at any vocabulary size (a 129K + 152K union is about 2 MB):

- `token_map.json`: what the union is (sizes, donors, row counts, the maps' fit, the norm
  statistics, the specials and added tokens it brought), human-readable;
- `token_map.safetensors`: `ids.<source>` (int32, one entry per union id: the token's id in
  that source, -1 where it has none) and `row` (int16 codes into the header's `row_rules`:
  `base` copied, `slerp:<donor>`, `<donor>` transferred).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import OutputError
from ..io.manifest import file_sha256, write_json_atomic

TOKEN_MAP = "token_map.json"
TOKEN_ARRAYS = "token_map.safetensors"
FORMAT_VERSION = 2


def row_rule_names(donors: tuple[str, ...] | list[str]) -> list[str]:
    """The row rules a union with these donors can have, in code order: base, then slerp:<d> and <d> per donor."""
    return ["base", *[r for d in donors for r in (f"slerp:{d}", d)]]


@dataclass
class TokenMap:
    """A loaded token map: its header and, per source, each union id's id there (-1: none)."""

    header: dict[str, Any]
    ids: dict[str, torch.Tensor]  # source key -> int32 (size,)
    row: torch.Tensor  # int16 (size,) codes into header["row_rules"]

    @property
    def size(self) -> int:
        """Tokens of the union tokenizer."""
        return int(self.header["size"])

    def rule_ids(self, rule: str) -> torch.Tensor:
        """Union ids whose rows follow `rule` (`base`, `slerp:<donor>`, `<donor>`), ascending."""
        rules = self.header["row_rules"]
        if rule not in rules:
            return torch.zeros(0, dtype=torch.long)
        return torch.nonzero(self.row == rules.index(rule)).flatten()

    def to_union(self, key: str) -> dict[int, int]:
        """A source's ids -> union ids."""
        have = torch.nonzero(self.ids[key] >= 0).flatten()
        return dict(zip(self.ids[key][have].tolist(), have.tolist()))

    def row_counts(self) -> dict[str, int]:
        """How many union tokens each row rule made."""
        return dict(self.header["rows"])

    def save(self, zdir: Path) -> None:
        """Write both files atomically (arrays first, the header last: a header names complete arrays)."""
        zdir = Path(zdir)
        tmp = zdir / f".{TOKEN_ARRAYS}.tmp"
        save_file({**{f"ids.{k}": v.contiguous() for k, v in self.ids.items()}, "row": self.row.contiguous()},
                  str(tmp))
        tmp.replace(zdir / TOKEN_ARRAYS)
        write_json_atomic(zdir / TOKEN_MAP, {**self.header, "arrays_sha256": file_sha256(zdir / TOKEN_ARRAYS)})

    @classmethod
    def load(cls, zdir: Path) -> TokenMap:
        """Read `<zdir>/token_map.json` and its arrays, with errors naming the file at fault."""
        zdir = Path(zdir)
        path, arrays = zdir / TOKEN_MAP, zdir / TOKEN_ARRAYS
        for p in (path, arrays):
            if not p.is_file():
                raise OutputError(f"{p}: missing; run the merge (or `zenith-merge tokenizer`) again without --resume")
        try:
            header = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OutputError(f"{path}: cannot read ({err})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise OutputError(f"{path}: token map format {header.get('format_version')!r}, this version reads "
                              f"{FORMAT_VERSION}; build the union again (`zenith-merge tokenizer`)")
        if header.get("arrays_sha256") != file_sha256(arrays):
            raise OutputError(f"{arrays}: does not match {path} (written by another run); build the union again")
        tensors = load_file(str(arrays))
        ids = {k.removeprefix("ids."): v for k, v in tensors.items() if k.startswith("ids.")}
        return cls(header, ids, tensors["row"])


def token_map_header(zdir: Path) -> dict[str, Any] | None:
    """The header of `<zdir>/token_map.json`, or None where there is none or it cannot be read (a resume check)."""
    path = Path(zdir) / TOKEN_MAP
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
