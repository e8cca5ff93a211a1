"""Source fingerprints tell parents of one layout apart (their data, sampled), read a bounded number of bytes,
and `merge --resume` refuses a parent swapped for another of the same layout, naming it."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import write_config

from zenith_merge.cli import main
from zenith_merge.io.manifest import read_manifest
from zenith_merge.plan.sources import (
    SAMPLE_BYTES,
    SAMPLE_RANGES,
    _safetensors_header,
    fingerprint,
    sample_offsets,
)

MAX_SAMPLE = (SAMPLE_RANGES + 2) * SAMPLE_BYTES


def _big_safetensors(path: Path, data_bytes: int) -> int:
    """A sparse safetensors file holding one U8 tensor of `data_bytes` (all zeros); the data section's offset."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "config.json").write_text('{"architectures": ["X"]}')
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + data_bytes)
    return 8 + len(header)


def _poke(path: Path, offset: int, value: bytes = b"\x01") -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(value)


def test_sample_offsets_cover_a_short_section_and_bound_a_long_one():
    assert sample_offsets(100, 100) == []
    assert sample_offsets(8, 8 + 3 * SAMPLE_BYTES + 5) == [8 + i * SAMPLE_BYTES for i in range(4)]
    start, end = 1000, 1000 + 10**9
    offsets = sample_offsets(start, end)
    assert len(offsets) == SAMPLE_RANGES + 2 and offsets == sorted(offsets)
    assert offsets[0] == start and offsets[-1] == end - SAMPLE_BYTES  # the first and the last range
    gaps = {b - a for a, b in zip(offsets, offsets[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced


def test_same_headers_different_data_give_different_fingerprints(tmp_path, tiny_deepseek):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_deepseek, a)
    shutil.copytree(tiny_deepseek, b)
    assert fingerprint(a) == fingerprint(b)  # deterministic, and independent of the folder's name
    shard = sorted(b.glob("*.safetensors"))[1]
    _poke(shard, shard.stat().st_size - 1, bytes([shard.read_bytes()[-1] ^ 0xFF]))  # one byte of data
    assert _safetensors_header(shard) == _safetensors_header(a / shard.name)
    assert fingerprint(a) != fingerprint(b)


def test_a_large_shard_is_fingerprinted_from_a_bounded_sample(tmp_path, monkeypatch):
    folder, size = tmp_path / "big", 200 * 2**20
    data = _big_safetensors(folder / "model.safetensors", size)
    before = fingerprint(folder)
    reads: list[int] = []
    pread = os.pread

    def counting(fd, n, offset):
        out = pread(fd, n, offset)
        reads.append(len(out))
        return out

    monkeypatch.setattr(os, "pread", counting)
    io = Path("/proc/self/io")
    rchar = (lambda: int(dict(line.split(": ") for line in io.read_text().splitlines())["rchar"])) \
        if io.is_file() else (lambda: 0)
    start = rchar()
    assert fingerprint(folder) == before
    read_total = rchar() - start
    assert len(reads) == SAMPLE_RANGES + 2 and sum(reads) == MAX_SAMPLE
    assert read_total < MAX_SAMPLE + 2**20, read_total  # every read of the process: the sample, config, header
    # a byte in a sampled range (the middle one, the first, the last) changes the fingerprint
    for offset in (sample_offsets(data, data + size)[SAMPLE_RANGES // 2] + 7, data, data + size - 1):
        _poke(folder / "model.safetensors", offset)
        changed = fingerprint(folder)
        assert changed != before
        before = changed


@pytest.mark.demo
def test_v3_and_r1_of_one_layout_have_different_fingerprints():
    from zenith_merge.demo import ensure_demo

    v3, r1 = ensure_demo("zen-tiny"), ensure_demo("zen-r1-tiny")
    # what the fingerprint used to see is the same for both: config, index, headers and sizes
    for name in ("config.json", "model.safetensors.index.json"):
        assert (v3 / name).read_bytes() == (r1 / name).read_bytes()
    for shard in sorted(v3.glob("*.safetensors")):
        assert _safetensors_header(shard) == _safetensors_header(r1 / shard.name)
        assert shard.stat().st_size == (r1 / shard.name).stat().st_size
    assert fingerprint(v3) != fingerprint(r1)


@pytest.mark.demo
def test_resume_refuses_a_parent_swapped_for_another_of_the_same_layout(tmp_path, capsys):
    from zenith_merge.demo import ensure_demo

    v3, r1 = ensure_demo("zen-tiny"), ensure_demo("zen-r1-tiny")
    parent = tmp_path / "parent"
    shutil.copytree(v3, parent)
    cfg = write_config(tmp_path, base_model="demo://zen-tiny", merge_method="concat", gate_mode="random",
                       experts=[{"source_model": "demo://zen-tiny", "positive_prompts": ["def f():"]},
                                {"source_model": str(parent), "positive_prompts": ["Solve for x"]}],
                       max_shard_size="1MB")
    out = tmp_path / "out"
    argv = ["merge", str(cfg), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    # an interrupted run: the last shard and the index not written yet
    shards[-1].unlink()
    (out / "model.safetensors.index.json").unlink()
    kept = {s.name: s.read_bytes() for s in shards[:-1]}
    manifest = read_manifest(out)

    for shard in parent.glob("*.safetensors"):  # the parent swapped for R1: same config, index and headers
        shutil.copyfile(r1 / shard.name, shard)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "source 'donor1'" in err and str(parent) in err and "changed since the interrupted run" in err, err
    assert "--overwrite" in err
    # nothing was written: no mix of the two parents' shards
    assert not shards[-1].exists() and not (out / "model.safetensors.index.json").exists()
    assert {s.name: s.read_bytes() for s in shards[:-1]} == kept and read_manifest(out) == manifest

    for shard in parent.glob("*.safetensors"):  # the parent restored: the resume goes on
        shutil.copyfile(v3 / shard.name, shard)
    assert main([*argv, "--resume"]) == 0
    assert shards[-1].is_file() and (out / "model.safetensors.index.json").is_file()
