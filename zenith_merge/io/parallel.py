"""Writing shards concurrently: a local process pool, or tasks on a Ray cluster.

Shards are independent units of work (the writer's `write_shard`, passed in as `write`), so
a backend only has to run them and hand each finished shard's record back to the parent,
which alone updates the manifest. Workers report bytes written through a queue so the parent's progress
bar moves within a shard, not only between shards.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from ..errors import OutputError
from .layout import ShardSpec

Record = Callable[[str, str, int], None]  # (filename, sha256, size) -> None, called in the parent
# (out_dir, shard, source, on_bytes=...) -> (filename, sha256, size): the writer's write_shard, run in a worker
WriteShard = Callable[..., tuple[str, str, int]]
_progress_queue = None  # set in each pool worker by _init_worker


def check_picklable(source) -> None:
    """Refuse up front a source that cannot be sent to a worker, instead of failing inside the pool."""
    try:
        pickle.dumps(source)
    except Exception as err:
        raise OutputError(f"the tensor source {type(source).__name__} must be picklable to be sent to worker "
                          f"processes ({err}); use workers: 1, or make it carry only what it needs to reopen its "
                          f"inputs") from None


def _init_worker(progress_queue, threads: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them


def _pool_task(write: WriteShard, out_dir: Path, shard: ShardSpec, source) -> tuple[str, str, int]:
    return write(out_dir, shard, source, on_bytes=_progress_queue.put if _progress_queue else None)


def _drain(progress_queue, on_bytes: Callable[[int], None]) -> None:
    while True:
        try:
            on_bytes(progress_queue.get_nowait())
        except queue_module.Empty:
            return


def write_with_pool(write: WriteShard, out_dir: Path, todo: Sequence[ShardSpec], source, workers: int,
                    record: Record, on_bytes: Callable[[int], None]) -> None:
    """Write `todo` with `write` in a pool of `workers` spawned processes; the source is pickled to each one."""
    check_picklable(source)
    ctx = get_context("spawn")  # fork would copy the parent's torch thread pools and locks
    progress_queue = ctx.Queue()
    n = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // n)
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue, threads)) as pool:
        pending = {pool.submit(_pool_task, write, out_dir, shard, source) for shard in todo}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, on_bytes)
                for fut in finished:
                    record(*fut.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # shards already finished stay recorded
            raise
    _drain(progress_queue, on_bytes)


def import_ray():
    """The ray module, or an OutputError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise OutputError("backend: ray needs Ray, which is not installed: pip install 'zenith-merge[distributed]'") \
            from None
    return ray


def write_with_ray(write: WriteShard, out_dir: Path, todo: Sequence[ShardSpec], source, workers: int,
                   record: Record, on_bytes: Callable[[int], None]) -> None:
    """Write `todo` with `write` as Ray tasks, at most `workers` at a time; `out_dir` must be on a filesystem
    they all share.

    Connects to the cluster named by RAY_ADDRESS (or one already initialised), else starts a local one.
    """
    ray = import_ray()
    check_picklable(source)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(write)
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < max(1, workers):
            shard = waiting.pop(0)
            running[task.remote(out_dir, shard, source)] = shard
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            shard = running.pop(ref)
            record(*ray.get(ref))
            on_bytes(shard.nbytes)
