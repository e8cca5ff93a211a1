"""The streaming writer: layout, atomic resumable shards, byte-identical output however it was reached."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from zenith_merge.errors import OutputError
from zenith_merge.io.writer import (
    MANIFEST_FILE,
    ShardSpec,
    TensorSpec,
    layout_shards,
    prepare_output_dir,
    write_checkpoint,
)

HERE = Path(__file__).resolve().parent


class SeededSource:
    """Deterministic tensors derived from their names; picklable, like the pipeline's source."""

    def produce(self, spec: TensorSpec):
        seed = int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
        t = torch.randn(spec.shape, generator=torch.Generator().manual_seed(seed))
        return t.to({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[spec.dtype])


SPECS = [TensorSpec(f"layer{i}.{k}", dt, shape) for i in range(6)
         for k, dt, shape in (("w", "BF16", (64, 32)), ("b", "F32", (64,)), ("h", "F16", (8, 8)))]


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(out, *, workers=1, resume=False, plan_id="p1", max_size=6000):
    return write_checkpoint(out, layout_shards(SPECS, max_size), SeededSource(), plan_id=plan_id, resume=resume,
                            workers=workers, progress=False)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40), limit=st.integers(1, 8000))
def test_layout_keeps_order_and_bounds_each_shard(sizes, limit):
    specs = [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    shards = layout_shards(specs, limit)
    assert [t for s in shards for t in s.tensors] == specs
    n = len(shards)
    for i, s in enumerate(shards):
        assert s.filename == f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        assert s.nbytes <= limit or len(s.tensors) == 1
    for a, b in zip(shards, shards[1:]):  # greedy: the next tensor did not fit
        assert a.nbytes + b.tensors[0].nbytes > limit


def test_written_files_are_valid_safetensors_with_index_and_manifest(tmp_path):
    result = _write(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {s.name for s in SPECS}
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in SPECS)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["plan_id"] == "p1" and len(result.written) == len(manifest["shards"]) >= 3
    for name, entry in manifest["shards"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == entry["sha256"] == result.sha256[name]
    src = SeededSource()
    for spec in SPECS:
        with safe_open(tmp_path / index["weight_map"][spec.name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(spec.name), src.produce(spec))
    assert not list(tmp_path.glob(".*.tmp"))


def test_parallel_workers_write_identical_bytes(tmp_path):
    _write(tmp_path / "one")
    _write(tmp_path / "two", workers=2)
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def test_produced_tensor_must_match_its_spec(tmp_path):
    class Wrong:
        def produce(self, spec):
            return torch.zeros(3)

    with pytest.raises(OutputError, match="tensor 'a': produced F32\\[3\\], planned F32\\[4\\]"):
        write_checkpoint(tmp_path, [ShardSpec("s.safetensors", (TensorSpec("a", "F32", (4,)),))], Wrong(),
                         plan_id="x", progress=False)


def test_resume_with_another_plan_is_refused(tmp_path):
    _write(tmp_path)
    with pytest.raises(OutputError, match="different plan"):
        _write(tmp_path, resume=True, plan_id="p2")


def test_resume_of_a_finished_run_skips_everything(tmp_path):
    first = _write(tmp_path)
    again = _write(tmp_path, resume=True)
    assert again.written == [] and again.skipped == sorted(first.written)


def test_resume_rewrites_a_corrupted_shard(tmp_path):
    _write(tmp_path)
    before = _digests(tmp_path)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    result = _write(tmp_path, resume=True)
    assert result.written == [victim.name]
    assert _digests(tmp_path) == before


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {here!r})
    import zenith_merge.io.writer as w
    from test_writer import SeededSource, SPECS
    point, k = sys.argv[1], int(sys.argv[2])
    calls = {{"produce": 0, "manifest": 0}}
    class Dying(SeededSource):
        def produce(self, spec):
            calls["produce"] += 1
            if point == "tensor" and calls["produce"] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().produce(spec)
    real_json = w._atomic_json
    def dying_json(path, data):
        if path.name == "manifest.json":
            calls["manifest"] += 1
            if point == "manifest" and calls["manifest"] == k:   # the shard is renamed, the manifest not yet updated
                os.kill(os.getpid(), signal.SIGKILL)
        if point == "index" and path.name == w.INDEX_FILE:
            os.kill(os.getpid(), signal.SIGKILL)
        real_json(path, data)
    w._atomic_json = dying_json
    w.write_checkpoint(sys.argv[3], w.layout_shards(SPECS, 6000), Dying(), plan_id="p1", progress=False)
""")


@pytest.mark.parametrize("point,k", [("tensor", 5), ("tensor", 11), ("manifest", 3), ("index", 0)])
def test_resume_after_sigkill_gives_identical_bytes(tmp_path, point, k):
    reference = tmp_path / "reference"
    _write(reference)
    out = tmp_path / "out"
    script = KILLER.format(here=str(HERE))
    res = subprocess.run([sys.executable, "-c", script, point, str(k), str(out)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    assert not (out / "model.safetensors.index.json").exists()
    result = _write(out, resume=True)
    assert result.skipped, "the killed run finished at least one shard"
    assert _digests(out) == _digests(reference)


def test_prepare_output_dir_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError, match="overlaps source model folder"):
        prepare_output_dir(src / "out", resume=False, overwrite=False, source_dirs=[src])
    with pytest.raises(OutputError, match="overlaps source model folder"):
        prepare_output_dir(tmp_path, resume=False, overwrite=False, source_dirs=[src])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="not empty: pass --resume .* or --overwrite"):
        prepare_output_dir(busy, resume=False, overwrite=False, source_dirs=[src])
    with pytest.raises(OutputError, match="not a zenith-merge output"):
        prepare_output_dir(busy, resume=False, overwrite=True, source_dirs=[src])
    assert (busy / "notes.txt").read_text() == "precious"


def test_overwrite_replaces_a_previous_output(tmp_path):
    _write(tmp_path / "out", plan_id="old")
    prepare_output_dir(tmp_path / "out", resume=False, overwrite=True, source_dirs=[])
    assert list((tmp_path / "out").iterdir()) == []


def test_ray_backend_without_ray_names_the_extra(tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(OutputError, match=r"zenith-merge\[distributed\]"):
            write_checkpoint(tmp_path, layout_shards(SPECS, 6000), SeededSource(), plan_id="r", workers=2,
                             backend="ray", progress=False)
    else:
        write_checkpoint(tmp_path / "ray", layout_shards(SPECS, 6000), SeededSource(), plan_id="r", workers=2,
                         backend="ray", progress=False)
        _write(tmp_path / "local", plan_id="r")
        assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")
