"""The streaming writer: layout, atomic resumable shards, byte-identical output however it was reached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from zenith_merge.errors import CheckpointError, OutputError
from zenith_merge.io.reader import Checkpoint
from zenith_merge.io.safetensors_format import read_header
from zenith_merge.io.writer import (
    INDEX_FILE,
    MANIFEST_FILE,
    ByteRange,
    ShardSpec,
    TensorSpec,
    layout_shards,
    prepare_output_dir,
    write_checkpoint,
)

HERE = Path(__file__).resolve().parent
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class SeededSource:
    """Deterministic tensors derived from their names; picklable, like the pipeline's source."""

    def produce(self, spec: TensorSpec):
        seed = int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        return torch.randn(spec.shape, generator=torch.Generator().manual_seed(seed)).to(TORCH[spec.dtype])


class KillOnce:
    """Wraps a source: SIGKILLs the process producing `victim` (a pool or Ray worker), the first time only. The marker
    file records that it happened, so a retry or a resume does not kill again."""

    def __init__(self, inner, victim: str, marker: Path):
        self.inner, self.victim, self.marker = inner, victim, marker

    def produce(self, spec):
        if spec.name == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.produce(spec)


class BytesSource(SeededSource):
    """The same tensors as raw bytes: the writer's fast path must give the same files."""

    def produce(self, spec: TensorSpec):
        return bytes(super().produce(spec).reshape(-1).view(torch.uint8).numpy())


SPECS = [TensorSpec(f"layer{i}.{k}", dt, shape) for i in range(6)
         for k, dt, shape in (("w", "BF16", (64, 32)), ("b", "F32", (64,)), ("h", "F16", (8, 8)))]


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(out, *, workers=1, resume=False, plan_id="p1", max_size=6000, source=None, **kw):
    return write_checkpoint(out, layout_shards(SPECS, max_size), source or SeededSource(), plan_id=plan_id,
                            resume=resume, workers=workers, progress=False, **kw)


# -- layout ---------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=40), limit=st.integers(1, 8000))
def test_layout_keeps_order_and_bounds_each_shard(sizes, limit):
    specs = [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    shards = layout_shards(specs, limit)
    assert [t for s in shards for t in s.tensors] == specs  # every tensor once, in order
    n = len(shards)
    for i, s in enumerate(shards):
        assert s.filename == f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        assert s.nbytes <= limit or len(s.tensors) == 1
        assert s.tensors
    for a, b in zip(shards, shards[1:]):  # greedy: a shard closes only when the next tensor does not fit
        assert a.nbytes + b.tensors[0].nbytes > limit
    assert layout_shards(specs, limit) == shards


def test_layout_edge_cases():
    big = TensorSpec("big", "F32", (100,))
    small = TensorSpec("small", "F32", (1,))
    assert [len(s.tensors) for s in layout_shards([small, big, small], 10)] == [1, 1, 1]
    assert layout_shards([], 10) == []
    assert layout_shards([small], 10, prefix="x")[0].filename == "x-00001-of-00001.safetensors"
    with pytest.raises(ValueError, match="max_shard_size"):
        layout_shards([small], 0)


# -- writing --------------------------------------------------------------------------------------

def test_written_files_are_valid_safetensors_with_index_and_manifest(tmp_path):
    result = _write(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert list(index) == ["metadata", "weight_map"]
    assert index["weight_map"] == {t.name: s.filename for s in layout_shards(SPECS, 6000) for t in s.tensors}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in SPECS) == result.total_bytes
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["plan_id"] == "p1" and len(result.written) == len(manifest["shards"]) >= 3
    assert result.skipped == [] and result.written == sorted(result.written)
    for name, entry in manifest["shards"].items():
        data = (tmp_path / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == result.sha256[name]
        assert len(data) == entry["bytes"]
    src = SeededSource()
    for spec in SPECS:
        with safe_open(tmp_path / index["weight_map"][spec.name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(spec.name), src.produce(spec))
    header = read_header(tmp_path / result.written[0])
    assert header.data_start % 8 == 0  # padded like the safetensors library
    assert list(header.tensors) == [t.name for t in layout_shards(SPECS, 6000)[0].tensors]
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / ".zenith").glob(".*.tmp"))


def test_raw_bytes_and_tensors_give_the_same_files(tmp_path):
    _write(tmp_path / "tensors")
    _write(tmp_path / "bytes", source=BytesSource())
    assert _digests(tmp_path / "tensors") == _digests(tmp_path / "bytes")


def test_writeback_started_at_every_write_changes_no_byte(tmp_path, monkeypatch):
    """Writeback started (and written pages dropped from the page cache) after every write, not only
    every few MB: the same files, and the calls really ran."""
    import zenith_merge.io.manifest as manifest
    import zenith_merge.io.writer as writer

    _write(tmp_path / "default")
    calls = []
    real = manifest.stream_to_disk
    monkeypatch.setattr(writer, "stream_to_disk", lambda *a: (calls.append(a), real(*a)))
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 1)
    _write(tmp_path / "streamed")
    assert _digests(tmp_path / "default") == _digests(tmp_path / "streamed")
    assert len(calls) >= len(SPECS) and all(done <= start <= end for _, done, start, end in calls)


def test_odd_tensors(tmp_path):
    specs = [TensorSpec("scalar", "F32", ()), TensorSpec("empty", "BF16", (0, 3)), TensorSpec("mask", "BOOL", (5,)),
             TensorSpec("fp8", "F8_E4M3", (2, 2)), TensorSpec("ids", "I64", (3,))]
    values = {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
              "mask": torch.tensor([True, False, True, True, False]), "fp8": torch.eye(2).to(torch.float8_e4m3fn),
              "ids": torch.tensor([1, -2, 3])}

    class Fixed:
        def produce(self, spec):
            return values[spec.name].t() if spec.name == "fp8" else values[spec.name]  # a non-contiguous one

    write_checkpoint(tmp_path, layout_shards(specs, 1000), Fixed(), plan_id="x", progress=False)
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", "pt") as f:
        for name, t in values.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("produced,message", [
    (torch.zeros(3), r"tensor 'a': produced F32\[3\], planned F32\[4\]"),
    (torch.zeros(4, dtype=torch.float16), r"tensor 'a': produced F16\[4\], planned F32\[4\]"),
    (torch.zeros(4, dtype=torch.complex128), r"tensor 'a': produced torch.complex128\[4\], planned F32\[4\]"),
    (b"\0" * 15, r"tensor 'a': produced 15 bytes, planned 16 \(F32\[4\]\)"),
    ([0.0] * 4, r"tensor 'a': produced a list, not a tensor or contiguous bytes"),
])
def test_produced_tensor_must_match_its_spec(tmp_path, produced, message):
    class Wrong:
        def produce(self, spec):
            return produced

    with pytest.raises(OutputError, match=message):
        write_checkpoint(tmp_path, [ShardSpec("s.safetensors", (TensorSpec("a", "F32", (4,)),))], Wrong(),
                         plan_id="x", progress=False)
    assert not (tmp_path / "s.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["shards"] == {}


def test_bad_layouts_are_refused(tmp_path):
    a = TensorSpec("a", "F32", (1,))
    for shards in ([ShardSpec("x.safetensors", (a,)), ShardSpec("y.safetensors", (a,))],
                   [ShardSpec("../x.safetensors", (a,))], [ShardSpec("x.safetensors", (a,))] * 2):
        with pytest.raises(ValueError):
            write_checkpoint(tmp_path, shards, SeededSource(), plan_id="x", progress=False)


def test_progress_bar_counts_bytes_on_stderr(tmp_path, capfd):
    write_checkpoint(tmp_path, layout_shards(SPECS, 6000), SeededSource(), plan_id="p", progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "writing shards" in err and "100%" in err


class CopySource:
    """Copies a checkpoint, taking turns through the writer's three paths: tensor, raw bytes, byte range."""

    def __init__(self, folder: Path):
        self.ckpt = Checkpoint.open(folder)

    def produce(self, spec):
        path = len(spec.name) % 3
        if path == 0:
            return self.ckpt.read(spec.name)
        return self.ckpt.read_bytes(spec.name) if path == 1 else self.ckpt.byte_range(spec.name)


def _copy_plan(ckpt: Checkpoint, max_size: int) -> list[ShardSpec]:
    return layout_shards([TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.names()], max_size)


def test_copied_model_loads_in_transformers_with_identical_logits(tmp_path, tiny_deepseek):
    source = CopySource(tiny_deepseek)
    out = tmp_path / "out"
    result = write_checkpoint(out, _copy_plan(source.ckpt, 30_000), source, plan_id="copy", progress=False)
    assert len(result.written) > 3
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_deepseek / name, out / name)
    with Checkpoint.open(out) as copy:
        for name in source.ckpt.names():
            assert torch.equal(copy.read(name), source.ckpt.read(name))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    logits = []
    for folder in (tiny_deepseek, out):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_byte_ranges_are_copied_in_chunks(tmp_path, tiny_deepseek, monkeypatch):
    import zenith_merge.io.writer as writer

    class RangeSource(CopySource):
        def produce(self, spec):
            return self.ckpt.byte_range(spec.name)

    source = RangeSource(tiny_deepseek)
    shards = _copy_plan(source.ckpt, 30_000)
    write_checkpoint(tmp_path / "big", shards, source, plan_id="c", progress=False)
    monkeypatch.setattr(writer, "COPY_CHUNK_BYTES", 7)  # many chunks, and a remainder in most tensors
    write_checkpoint(tmp_path / "small", shards, source, plan_id="c", progress=False)
    write_checkpoint(tmp_path / "mixed", shards, CopySource(tiny_deepseek), plan_id="c", progress=False)
    assert _digests(tmp_path / "big") == _digests(tmp_path / "small") == _digests(tmp_path / "mixed")


def test_byte_range_must_match_its_spec(tmp_path):
    (tmp_path / "src.bin").write_bytes(bytes(range(16)))

    class Ranges:
        def produce(self, spec):
            return ByteRange(tmp_path / "src.bin", 4, 12 if spec.name == "a" else 16)

    shards = [ShardSpec("s.safetensors", (TensorSpec("a", "F32", (3,)), TensorSpec("b", "F32", (4,))))]
    with pytest.raises(CheckpointError, match=r"src.bin: truncated file while reading tensor 'b'"):
        write_checkpoint(tmp_path / "o", shards, Ranges(), plan_id="x", progress=False)
    shards = [ShardSpec("s.safetensors", (TensorSpec("a", "F32", (2,)),))]
    with pytest.raises(OutputError, match=r"tensor 'a': produced a range of 12 bytes, planned 8 \(F32\[2\]\)"):
        write_checkpoint(tmp_path / "o", shards, Ranges(), plan_id="x", progress=False)


def test_parallel_workers_need_a_picklable_source(tmp_path):
    class Local(SeededSource):  # defined in a function: cannot be pickled
        pass

    with pytest.raises(OutputError, match="must be picklable"):
        _write(tmp_path, workers=2, source=Local())


def test_a_killed_pool_worker_fails_naming_the_shard_and_resume_completes(tmp_path):
    shard = layout_shards(SPECS, 6000)[2]
    source, out = KillOnce(SeededSource(), shard.tensors[1].name, tmp_path / "killed"), tmp_path / "pool"
    with pytest.raises(OutputError, match=f"a worker process died .*shard.* unwritten .*{shard.filename}.*--resume"):
        _write(out, workers=2, source=source)
    _write(out, workers=2, source=source, resume=True)
    _write(tmp_path / "one")
    assert _digests(out) == _digests(tmp_path / "one")


def test_parallel_workers_write_identical_bytes(tmp_path, tiny_deepseek):
    source = CopySource(tiny_deepseek)  # carries an open Checkpoint, which reopens its files in each worker
    shards = _copy_plan(source.ckpt, 30_000)
    one = write_checkpoint(tmp_path / "one", shards, source, plan_id="c", progress=False)
    two = write_checkpoint(tmp_path / "two", shards, source, plan_id="c", progress=False, workers=2)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    assert one == two and len(two.written) > 2


# -- resume ---------------------------------------------------------------------------------------

def test_resume_with_another_plan_is_refused(tmp_path):
    _write(tmp_path)
    with pytest.raises(OutputError, match="the output folder was written from a different plan.*use overwrite"):
        _write(tmp_path, resume=True, plan_id="p2")


def test_resume_with_an_unreadable_manifest_is_refused(tmp_path):
    _write(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{")
    with pytest.raises(OutputError, match="unreadable manifest"):
        _write(tmp_path, resume=True)


def test_resume_of_a_finished_run_skips_everything(tmp_path):
    first = _write(tmp_path)
    before = _digests(tmp_path)
    again = _write(tmp_path, resume=True)
    assert again.written == [] and again.skipped == first.written and again.sha256 == first.sha256
    assert _digests(tmp_path) == before


def test_resume_rewrites_a_corrupted_shard(tmp_path):
    _write(tmp_path)
    before = _digests(tmp_path)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert _write(tmp_path, resume=True, verify_on_resume=False).written == []  # same size: trusted unverified
    result = _write(tmp_path, resume=True)
    assert result.written == [victim.name]
    assert _digests(tmp_path) == before


def test_resume_rewrites_a_missing_or_truncated_shard(tmp_path):
    _write(tmp_path)
    before = _digests(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[0].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:-1])
    result = _write(tmp_path, resume=True, verify_on_resume=False)
    assert result.written == [shards[0].name, shards[2].name]
    assert _digests(tmp_path) == before


# Runs a write in a child process and SIGKILLs it at one point. os.replace is the hook: every
# file reaches its final name through it, so "after the k-th shard rename" and "before the index"
# are exact points that do not depend on the writer's internal function names.
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {here!r})
    from test_writer import SPECS, SeededSource
    from zenith_merge.io.writer import layout_shards, write_checkpoint
    point, k, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = {{"produce": 0, "shard": 0, "manifest": 0}}
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    class Dying(SeededSource):
        def produce(self, spec):
            calls["produce"] += 1
            if point == "tensor" and calls["produce"] == k:  # mid-shard: a temp file is half written
                die()
            return super().produce(spec)

    real_replace = os.replace
    def replace(src, dst):
        name = os.path.basename(dst)
        if point == "index" and name == "model.safetensors.index.json":  # every shard done, index not
            die()
        if name == "manifest.json":
            calls["manifest"] += 1
            if point == "manifest" and calls["manifest"] == k:  # new manifest written, not yet renamed
                die()
        real_replace(src, dst)
        if name.startswith("model-"):
            calls["shard"] += 1
            if point == "renamed" and calls["shard"] == k:  # shard in place, manifest not updated
                die()
    os.replace = replace
    write_checkpoint(out, layout_shards(SPECS, 6000), Dying(), plan_id="p1", progress=False)
""")


@pytest.mark.parametrize("point,k,kept", [("tensor", 5, 1), ("tensor", 11, 3), ("renamed", 2, 1), ("manifest", 3, 1),
                                          ("index", 0, None)])
def test_resume_after_sigkill_gives_identical_bytes(tmp_path, point, k, kept):
    reference = tmp_path / "reference"
    _write(reference)
    out = tmp_path / "out"
    script = KILLER.format(here=str(HERE))
    res = subprocess.run([sys.executable, "-c", script, point, str(k), str(out)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    assert not (out / INDEX_FILE).exists()
    if point == "tensor":
        assert list(out.glob(".model-*.tmp")), "killed mid-shard"
    result = _write(out, resume=True)
    n = len(layout_shards(SPECS, 6000))
    assert len(result.skipped) == (n if kept is None else kept)
    assert _digests(out) == _digests(reference)
    assert not list(out.rglob("*.tmp"))


# -- the output folder ----------------------------------------------------------------------------

def test_prepare_output_dir_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for out in (src, src / "out", tmp_path):
        with pytest.raises(OutputError, match="overlaps source model folder"):
            prepare_output_dir(out, resume=False, overwrite=False, source_dirs=[src])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="is not empty: pass --resume .* or --overwrite"):
        prepare_output_dir(busy, resume=False, overwrite=False, source_dirs=[src])
    for flags in ({"resume": False, "overwrite": True}, {"resume": True, "overwrite": False}):
        with pytest.raises(OutputError, match="not a zenith-merge output"):
            prepare_output_dir(busy, source_dirs=[src], **flags)
    assert (busy / "notes.txt").read_text() == "precious"
    with pytest.raises(OutputError, match="exclude each other"):
        prepare_output_dir(tmp_path / "new", resume=True, overwrite=True, source_dirs=[])
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        prepare_output_dir(tmp_path / "file", resume=False, overwrite=False, source_dirs=[])


def test_prepare_output_dir_allows(tmp_path):
    prepare_output_dir(tmp_path / "fresh" / "deep", resume=False, overwrite=False, source_dirs=[tmp_path / "src"])
    assert (tmp_path / "fresh" / "deep").is_dir()
    _write(tmp_path / "out", plan_id="old")
    prepare_output_dir(tmp_path / "out", resume=True, overwrite=False, source_dirs=[])
    assert (tmp_path / "out" / INDEX_FILE).is_file()  # resume keeps everything
    prepare_output_dir(tmp_path / "out", resume=False, overwrite=True, source_dirs=[])
    assert list((tmp_path / "out").iterdir()) == []

