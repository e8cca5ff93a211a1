"""Writing shards concurrently: a local process pool, or tasks on a Ray cluster.

Shards are independent units of work (the writer's `write_shard`, passed in as `write`), so
a backend only has to run them and hand each finished shard's record back to the parent,
which alone updates the manifest. Workers report bytes written (through a queue in the pool; as items
of a streaming Ray task) so the parent's progress bar moves within a shard, not only between shards.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue as queue_module
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from ..errors import OutputError, ZenithError
from .layout import ShardSpec
from .manifest import TMP_SUFFIX

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
        pending = {pool.submit(_pool_task, write, out_dir, shard, source): shard for shard in todo}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, on_bytes)
                for fut in finished:
                    shard = pending.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:  # every unfinished shard fails with it: which one died is unknown
                        unfinished = sorted([shard.filename, *(s.filename for s in pending.values())])
                        raise OutputError(f"a worker process died (killed, or out of memory) with {len(unfinished)} "
                                          f"shard(s) unwritten ({', '.join(unfinished[:3])}"
                                          f"{', ...' if len(unfinished) > 3 else ''}); finished shards are kept: "
                                          f"run again with --resume") from None
                    record(*result)
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


RAY_TASK_RETRIES = 3  # times a shard's task is run again when its worker or node dies (Ray's own default)
PROGRESS_STEPS = 64  # progress reports per shard from a Ray task, at most


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def connect_ray(ray, workers: int) -> None:
    """Use the Ray runtime this process already has, else do what `ray.init()` does: connect to RAY_ADDRESS,
    or to the cluster this node joined with `ray start`, or start a local one with `workers` CPUs."""
    if ray.is_initialized():
        return
    quiet = dict(include_dashboard=False, log_to_driver=False)
    try:
        try:
            ray.init(num_cpus=max(1, workers), **quiet)
        except ValueError:  # it found a cluster, which refuses resources from a client: they are its own
            if ray.is_initialized():
                raise
            ray.init(**quiet)
    except Exception as err:
        address = os.environ.get("RAY_ADDRESS")
        where = f"RAY_ADDRESS={address}" if address else "a Ray runtime"
        raise OutputError(f"backend: ray could not reach or start {where}: {_first_line(err)}") from None


def _ray_task(write: WriteShard, out_dir: Path, shard: ShardSpec, source):
    """A Ray task (a generator): write one shard in a thread, yielding the bytes written, then its record.

    The yields are a fixed sequence for a shard (every PROGRESS_STEPS-th of its bytes, as tensors finish), so
    that when Ray reruns the task after its worker died, it can skip the reports it already returned.
    """
    reports: queue_module.SimpleQueue = queue_module.SimpleQueue()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["record"] = write(out_dir, shard, source, on_bytes=reports.put)
        except BaseException as err:  # re-raised in the task's own thread, where Ray catches it
            outcome["error"] = err
        finally:
            reports.put(None)

    thread = threading.Thread(target=run, name="zenith-shard-writer", daemon=True)
    thread.start()
    step, pending = max(1, shard.nbytes // PROGRESS_STEPS), 0
    while (n := reports.get()) is not None:
        pending += n
        if pending >= step:
            yield pending
            pending = 0
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["record"]


def _task_error(ray, shard: ShardSpec, err: BaseException) -> BaseException:
    """What the caller sees of a failed task: the zenith-merge error it raised (as the local backend would),
    else an OutputError naming the shard, in one line."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    if isinstance(cause, ZenithError):
        return cause
    died = tuple(getattr(ray.exceptions, name) for name in ("WorkerCrashedError", "NodeDiedError")
                 if hasattr(ray.exceptions, name))
    if isinstance(cause, died):
        tries = RAY_TASK_RETRIES + 1
        why = f"its worker died, on each of {tries} tries ({_first_line(cause)})" if tries > 1 else \
            f"its worker died ({_first_line(cause)})"
    else:
        why = f"the Ray task failed ({_first_line(cause)})"
    return OutputError(f"shard {shard.filename}: {why}; the shards that finished are kept: run again with "
                       f"--resume to write the rest")


def _remove_stale(out_dir: Path, shard: ShardSpec) -> None:
    """Remove the temporary files of `shard` (named `.<shard>.<pid>.tmp`) that workers which died left."""
    prefix = f".{shard.filename}."
    for path in out_dir.iterdir():
        if path.name.startswith(prefix) and path.name.endswith(TMP_SUFFIX):
            path.unlink(missing_ok=True)


def write_with_ray(write: WriteShard, out_dir: Path, todo: Sequence[ShardSpec], source, workers: int,
                   record: Record, on_bytes: Callable[[int], None]) -> None:
    """Write `todo` with `write` as Ray tasks, at most `workers` at a time; `out_dir` and the sources must be
    on a filesystem every node shares, at the same path.

    Connects as `connect_ray` says. Each task writes one whole shard and returns its record (reporting its
    bytes as it goes); a task whose worker or node dies is run again, up to RAY_TASK_RETRIES times. When a
    task fails for good, no new shard is started, the running ones finish and are recorded, and the error is
    raised: the task's own zenith-merge error, else an OutputError naming the shard. Temporary files that
    dead workers left behind are removed once the shards they were writing are in place.
    """
    ray = import_ray()
    check_picklable(source)
    if not todo:  # a resume with every shard kept: no runtime to start
        return
    connect_ray(ray, workers)
    out_dir = Path(out_dir)
    task = ray.remote(_ray_task).options(num_cpus=1, max_retries=RAY_TASK_RETRIES, num_returns="streaming")
    source_ref = ray.put(source)  # sent to the object store once, not with every task
    waiting, running = list(todo), {}  # running: the task's generator -> (shard, bytes reported)
    failure = None
    try:
        while running or (waiting and failure is None):
            while waiting and failure is None and len(running) < max(1, workers):
                shard = waiting.pop(0)
                running[task.remote(write, out_dir, shard, source_ref)] = (shard, 0)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for gen in ready:
                shard, reported = running[gen]
                try:
                    item = ray.get(next(gen))
                except StopIteration:  # cannot happen: the record is the last item, and ends the task here
                    item = RuntimeError("the task ended without a record")
                except ray.exceptions.RayError as err:
                    item = err
                if isinstance(item, int):
                    running[gen] = (shard, reported + item)
                    on_bytes(item)
                    continue
                del running[gen]
                if isinstance(item, BaseException):
                    failure = failure or _task_error(ray, shard, item)
                    continue
                record(*item)
                on_bytes(max(0, shard.nbytes - reported))
                _remove_stale(out_dir, shard)
    except BaseException as err:
        for gen in running:  # interrupted, or the cluster lost: stop the tasks (a resume removes their files)
            with contextlib.suppress(Exception):  # gone with the cluster
                ray.cancel(gen, force=True)
        if isinstance(err, ray.exceptions.RayError):
            names = ", ".join(shard.filename for shard, _ in running.values())
            raise OutputError(f"shards {names}: Ray failed while writing them ({_first_line(err)}); the "
                              f"shards that finished are kept: run again with --resume to write the rest") \
                from None
        raise
    if failure is not None:
        raise failure
