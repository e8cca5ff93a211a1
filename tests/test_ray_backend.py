"""`backend: ray`: shards written as Ray tasks on a local Ray runtime, byte-identical to the local backend,
and what happens when a task's worker is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_config
from test_writer import SPECS, CopySource, KillOnce, SeededSource, _copy_plan, _digests, _write

import zenith_merge.io.parallel as parallel
from zenith_merge.cli import main
from zenith_merge.errors import OutputError
from zenith_merge.io.writer import MANIFEST_FILE, layout_shards, write_checkpoint, write_shard

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for the module. The test sources reach its workers pickled by value, so that a
    worker imports neither this folder's modules nor, through them, transformers (seconds a worker)."""
    ray = pytest.importorskip("ray")
    modules = [sys.modules[SeededSource.__module__], sys.modules[__name__]]  # test_writer's sources, and Failing
    for module in modules:
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
    for module in modules:
        ray.cloudpickle.unregister_pickle_by_value(module)


uses_ray = pytest.mark.usefixtures("ray_runtime")


class Failing(SeededSource):
    """Raises `error` for one tensor."""

    def __init__(self, victim: str, error: Exception):
        self.victim, self.error = victim, error

    def produce(self, spec):
        if spec.name == self.victim:
            raise self.error
        return super().produce(spec)


def _victim() -> tuple[str, str]:
    """The third shard of SPECS at 6000 bytes, and its second tensor: killed there, it is half written."""
    shard = layout_shards(SPECS, 6000)[2]
    return shard.filename, shard.tensors[1].name


def test_without_a_runtime_the_writer_starts_a_local_one(tmp_path):
    """The CLI's case: no Ray in the process and no RAY_ADDRESS; Ray gets `workers` CPUs. (First in the file:
    it runs before the module's runtime starts, so the two do not compete for the cores.)"""
    pytest.importorskip("ray")
    script = textwrap.dedent("""
        import sys, ray, torch
        from zenith_merge.io.writer import TensorSpec, layout_shards, write_checkpoint

        class Counting:  # defined in __main__: workers get it by value, and import nothing of the tests
            def produce(self, spec):
                return torch.arange(spec.shape[0], dtype=torch.float32) * len(spec.name)

        shards = layout_shards([TensorSpec(f"t{i}", "F32", (100 * i,)) for i in range(1, 8)], 1000)
        for backend, workers, out in (("ray", 2, sys.argv[1]), ("local", 1, sys.argv[2])):
            write_checkpoint(out, shards, Counting(), plan_id="p", workers=workers, backend=backend,
                             progress=False)
        print("cpus", ray.cluster_resources()["CPU"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ray"), str(tmp_path / "local")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-2:] == ["cpus", "2.0"]
    assert len(list((tmp_path / "ray").glob("model-*"))) >= 3
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")


@uses_ray
def test_ray_writes_the_same_bytes_as_the_local_backend(tmp_path, tiny_deepseek):
    source = CopySource(tiny_deepseek)  # the writer's three paths: tensors, raw bytes, byte ranges
    shards = _copy_plan(source.ckpt, 30_000)
    local = write_checkpoint(tmp_path / "local", shards, source, plan_id="c", progress=False)
    remote = write_checkpoint(tmp_path / "ray", shards, source, plan_id="c", progress=False, workers=2,
                              backend="ray")
    assert len(remote.written) >= 3 and remote == local
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")


@uses_ray
def test_ray_tasks_report_progress_within_a_shard(tmp_path):
    shards = layout_shards(SPECS, 6000)
    records, counted = [], []
    parallel.write_with_ray(write_shard, tmp_path, shards, SeededSource(), 2, lambda *r: records.append(r),
                            counted.append)
    assert sorted(r[0] for r in records) == [s.filename for s in shards]
    assert sum(counted) == sum(s.nbytes for s in shards) and len(counted) > len(shards)


@uses_ray
@pytest.mark.demo
def test_a_merge_with_backend_ray_writes_the_same_folder_as_local(tmp_path):
    outs = {}
    for backend in ("local", "ray"):
        folder = tmp_path / backend
        folder.mkdir()
        cfg = write_config(folder, base_model="demo://zen-tiny", max_shard_size="600KB", backend=backend,
                           workers=2, routing_report=False)
        assert main(["merge", str(cfg), "--output", str(folder / "out"), "--no-progress"]) == 0
        outs[backend] = folder / "out"
    ray_files, local_files = _digests(outs["ray"]), _digests(outs["local"])
    assert ray_files.keys() == local_files.keys()
    assert len([n for n in ray_files if n.startswith("model-")]) >= 4
    # The plan, the model card and the manifest's plan id record the config, `backend` included; nothing else
    # differs, and they differ only there.
    recorded = {".zenith/plan.json", "README.md", MANIFEST_FILE}
    assert {n for n in ray_files if ray_files[n] != local_files[n]} <= recorded
    manifests = [json.loads((outs[b] / MANIFEST_FILE).read_text()) for b in ("ray", "local")]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    ids = [m["plan_id"] for m in manifests]
    for name in ("README.md", ".zenith/plan.json"):
        text = (outs["ray"] / name).read_text().replace(ids[0][:12], ids[1][:12])
        text = text.replace(str(outs["ray"]), str(outs["local"])).replace("backend: ray", "backend: local")
        assert text.replace('"backend": "ray"', '"backend": "local"') == (outs["local"] / name).read_text()


@uses_ray
def test_a_killed_task_is_run_again_and_the_write_completes(tmp_path):
    filename, victim = _victim()
    marker = tmp_path / "killed"
    source = KillOnce(SeededSource(), victim, marker)
    result = _write(tmp_path / "ray", workers=2, backend="ray", source=source)
    assert marker.exists(), "the victim's worker was killed"
    assert filename in result.written and result.skipped == []
    _write(tmp_path / "local")
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")  # the dead worker's temporary file too


@uses_ray
def test_a_task_killed_past_its_retries_fails_naming_the_shard_and_resume_completes(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "RAY_TASK_RETRIES", 0)
    filename, victim = _victim()
    source, out = KillOnce(SeededSource(), victim, tmp_path / "killed"), tmp_path / "ray"
    with pytest.raises(OutputError) as caught:
        _write(out, workers=2, backend="ray", source=source)
    message = str(caught.value)
    assert type(caught.value) is OutputError and "\n" not in message
    assert message.startswith(f"shard {filename}: its worker died") and "--resume" in message
    assert [p.name.split(".")[1] for p in out.glob(".*.tmp")] == [filename.split(".")[0]]  # the dead worker's
    finished = json.loads((out / MANIFEST_FILE).read_text())["shards"]
    assert finished and filename not in finished  # the shards that finished are kept
    result = _write(out, workers=2, backend="ray", source=source, resume=True)
    assert result.written[0] == filename and set(result.skipped) == set(finished)
    _write(tmp_path / "local")
    assert _digests(out) == _digests(tmp_path / "local")
    assert not list(out.rglob("*.tmp"))


@uses_ray
def test_task_errors_reach_the_caller_in_one_line(tmp_path):
    filename, victim = _victim()
    ours = OutputError(f"tensor {victim!r}: produced F16[8], planned BF16[8]")
    with pytest.raises(OutputError) as caught:  # a zenith-merge error is raised as it is, as locally
        _write(tmp_path / "a", workers=2, backend="ray", source=Failing(victim, ours))
    assert type(caught.value) is OutputError and str(caught.value) == str(ours)
    with pytest.raises(OutputError) as caught:  # anything else: an OutputError naming the shard, no traceback
        _write(tmp_path / "b", workers=2, backend="ray", source=Failing(victim, RuntimeError("boom\nline 2")))
    assert str(caught.value).startswith(f"shard {filename}: the Ray task failed (RuntimeError: boom);")
    assert "\n" not in str(caught.value) and caught.value.__cause__ is None


class FakeRay:
    """ray.init as Ray answers: a cluster found (RAY_ADDRESS, `ray start` on this node) refuses num_cpus."""

    def __init__(self, cluster: str | None):
        self.cluster, self.calls, self.up = cluster, [], False

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.cluster == "unreachable":
            raise ConnectionError("Could not find any running Ray instance.\nPlease specify one")
        if self.cluster and "num_cpus" in kwargs:
            raise ValueError("When connecting to an existing cluster, num_cpus must not be provided.")
        self.up = True


def test_connect_starts_a_local_runtime_or_joins_a_cluster(monkeypatch):
    alone = FakeRay(None)
    parallel.connect_ray(alone, 3)
    assert [c.get("num_cpus") for c in alone.calls] == [3] and alone.calls[0]["include_dashboard"] is False
    joined = FakeRay("found")
    parallel.connect_ray(joined, 3)
    assert [c.get("num_cpus") for c in joined.calls] == [3, None] and joined.up
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    expected = (r"^backend: ray could not reach or start RAY_ADDRESS=10\.0\.0\.1:6379: "
                r"ConnectionError: Could not find any running Ray instance\.$")
    with pytest.raises(OutputError, match=expected):
        parallel.connect_ray(FakeRay("unreachable"), 3)
    parallel.connect_ray(alone, 5)  # already initialised: used as it is
    assert len(alone.calls) == 1


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    with pytest.raises(OutputError, match=r"pip install 'zenith-merge\[distributed\]'"):
        _write(tmp_path / "ray", workers=2, backend="ray")
    assert not (tmp_path / "ray").exists()


def test_a_ray_merge_resumes_with_the_local_backend(tmp_path):
    """`backend` and `workers` say how the bytes are written, not what they are: not part of the plan id."""
    from zenith_merge.config import parse_config
    from zenith_merge.plan.build import build_plan

    base = {"base_model": "demo://zen-tiny", "experts": [{"source_model": "demo://zen-tiny", "positive_prompts": ["def main():"]}],
            "routing_report": False, "max_shard_size": "600KB"}
    plans = [build_plan(parse_config({**base, **extra}), output_dir=tmp_path / "o")
             for extra in ({}, {"backend": "ray", "workers": 2}, {"workers": 3})]
    assert len({p.plan_id for p in plans}) == 1
