"""Where the demo models live, and building them once, safely, on first use.

Models live in `cache_root()/demo-<key>/<name>`, where the key hashes every recipe and the
code that turns recipes into bytes (its syntax tree: comments and docstrings do not count),
so a changed recipe or generator builds afresh instead of reusing stale models. Each target is built into a temporary folder beside
it and renamed when complete, so a killed build never leaves a folder that looks finished;
an `fcntl` lock per target keeps two processes (parallel test workers, say) from building
the same one at once, and the second simply waits and reuses the first's result.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ZenithError
from . import DEMO_NAMES, FP8_DEMO_NAMES

log = logging.getLogger(__name__)

KEY_VERSION = 1  # bump to rebuild every cache without a recipe change
# the code that decides the bytes
_SOURCES = ("corpora.py", "corpus_code.py", "corpus_maths.py", "tokenizers.py", "models.py", "build.py")


def cache_root() -> Path:
    """`$ZENITH_CACHE` if set, else `~/.cache/zenith-merge`."""
    env = os.environ.get("ZENITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zenith-merge"


def _code_fingerprint(source: str) -> str:
    """The syntax tree of a module without docstrings: comments, layout and prose do not change it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def recipe_key() -> str:
    """A short hash of every demo recipe and of the code that turns recipes into bytes (computed once)."""
    from .models import RECIPES
    from .tokenizers import TOKENIZER_RECIPES

    h = hashlib.sha256(json.dumps({
        "version": KEY_VERSION,
        "models": {n: r.as_dict() for n, r in RECIPES.items()},
        "tokenizers": {n: r.as_dict() for n, r in TOKENIZER_RECIPES.items()},
    }, sort_keys=True).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update(_code_fingerprint((here / name).read_text()).encode())
    return h.hexdigest()[:12]


def demo_dir() -> Path:
    """The folder that holds this recipe's demo models and tokenizers."""
    return cache_root() / f"demo-{recipe_key()}"


def _targets() -> dict[str, tuple[str, ...]]:
    """Every buildable target and what it needs first: tokenizers, the parent, the demo models, their FP8 forms."""
    from .models import RECIPES

    deps: dict[str, tuple[str, ...]] = {"tokenizer-zen": (), "tokenizer-qwen": ()}
    for name, recipe in RECIPES.items():
        deps[name] = (f"tokenizer-{recipe.tokenizer}",) + ((recipe.train.init_from,) if recipe.train.init_from else ())
    for name in FP8_DEMO_NAMES:
        deps[name] = (name.removesuffix("-fp8"),)
    return deps


def _fp8_fingerprint() -> str:
    """The code that makes the FP8 forms (they are cast, not trained: a change to it rebuilds only them)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in ("kernels/fp8.py", "fp8_cast.py"):
        h.update(_code_fingerprint((root / rel).read_text()).encode())
    return h.hexdigest()[:12]


def valid_names() -> tuple[str, ...]:
    """Names `ensure_demo` accepts: the demo models and their shared parent."""
    from .models import PARENT_NAME

    return (*DEMO_NAMES, *FP8_DEMO_NAMES, PARENT_NAME)


def demo_path(name: str) -> Path:
    """Where demo model `name` lives (or will live) in the cache; builds nothing."""
    _check_name(name)
    return demo_dir() / name


def _check_name(name: str) -> None:
    if name not in valid_names():
        raise ZenithError(f"unknown demo model {name!r}; demo models: {', '.join(DEMO_NAMES)} "
                          f"(and their parent, {valid_names()[-1]})")


FP8_STAMP = "zenith_fp8.txt"


def _complete(folder: Path) -> bool:
    """A finished target: renamed into place only when complete, so its last-written file is present
    (for an FP8 form, a stamp of the code that cast it)."""
    if folder.name in FP8_DEMO_NAMES:
        stamp = folder / FP8_STAMP
        return stamp.is_file() and stamp.read_text() == _fp8_fingerprint()
    last = "tokenizer.json" if folder.name.startswith("tokenizer-") else "zenith_demo.json"
    return (folder / last).is_file()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive `fcntl` lock on `path`, held for the block; says so when it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s", path.stem.lstrip("."))
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(target: str, progress: bool) -> Path:
    """Build `target` (after what it needs) unless a finished copy exists; return its folder."""
    root = demo_dir()
    final = root / target
    if _complete(final):
        return final
    needs = {dep: _ensure(dep, progress) for dep in _targets()[target]}
    with _lock(root / f".{target}.lock"):
        if _complete(final):  # another process built it while we waited
            return final
        for stale in root.glob(f".{target}.tmp-*"):  # left by a killed build: we hold the lock, nobody owns it
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{target}.tmp-{os.getpid()}"
        log.info("building %s", target)
        try:
            if target.startswith("tokenizer-"):
                from .tokenizers import build_tokenizer

                build_tokenizer(target.removeprefix("tokenizer-"), tmp)
            elif target in FP8_DEMO_NAMES:
                from ..fp8_cast import fp8_cast

                fp8_cast(needs[target.removesuffix("-fp8")], tmp, to="fp8", progress=False)
                (tmp / FP8_STAMP).write_text(_fp8_fingerprint())
            else:
                from .build import build_model

                tok = next(p for d, p in needs.items() if d.startswith("tokenizer-"))
                parent = next((p for d, p in needs.items() if not d.startswith("tokenizer-")), None)
                build_model(target, tmp, parent_dir=parent, tokenizer_dir=tok, progress=progress)
            if final.exists():  # an unfinished folder from outside this module: replace it
                shutil.rmtree(final)
            tmp.rename(final)
            log.info("%s ready: %s", target, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_demo(name: str, *, progress: bool = True) -> Path:
    """The folder of demo model `name`, building the demo models first if it is missing.

    Names: `DEMO_NAMES`, plus `zen-parent` (the children's shared parent). A missing model is
    built with `ensure_all`, so the first call builds every demo model, in parallel where
    there are two cores (no more wall time than building the one asked for). Safe to call
    from several processes at once: one builds, the others wait and reuse its result.
    """
    _check_name(name)
    if name not in FP8_DEMO_NAMES and not _complete(demo_dir() / name):
        ensure_all(progress=progress)
    return _ensure(name, progress)


def ensure_all(progress: bool = True, *, workers: int | None = None) -> dict[str, Path]:
    """Every demo model's folder (`DEMO_NAMES` order), building what is missing.

    Missing models are built by up to `workers` processes (default: one per core, at most
    2), one torch thread each, dealt round-robin from (qwen3-moe-tiny, zen-tiny, zen-r1-tiny):
    on two cores one worker builds qwen3-moe-tiny then zen-r1-tiny, the other the zen parent
    then zen-tiny, and zen-r1-tiny waits on the parent's lock until it exists. The bytes are
    the same as when built one after another.
    """
    order = ("qwen3-moe-tiny", "zen-tiny", "zen-r1-tiny")
    missing = [n for n in order if not _complete(demo_dir() / n)]
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    workers = max(1, min(workers, len(missing)))
    if workers > 1:
        _run_workers([missing[i::workers] for i in range(workers)], progress)
    return {name: _ensure(name, progress) for name in DEMO_NAMES}


def _run_workers(chains: list[list[str]], progress: bool) -> None:
    """Run `python -m zenith_merge.demo.cache NAME...` once per chain, in parallel, and wait for all.

    Separate interpreters rather than multiprocessing: nothing of the caller (its `__main__`,
    its torch thread pool) is re-imported or forked, and each worker pins its own threads.
    """
    package_root = str(Path(__file__).resolve().parents[2])  # so workers import this very copy of zenith_merge
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    procs = []
    try:
        for position, chain in enumerate(chains):
            cmd = [sys.executable, "-m", "zenith_merge.demo.cache", f"--position={position}", *chain]
            procs.append((chain, subprocess.Popen(cmd + ([] if progress else ["--quiet"]), env=env)))
        failed = [(chain, rc) for chain, rc in ((chain, p.wait()) for chain, p in procs) if rc != 0]
    except BaseException:  # interrupted: take the workers down too (their temporary folders are cleaned later)
        for _, p in procs:
            p.terminate()
            p.wait()
        raise
    if failed:
        raise ZenithError("building demo models failed: " + "; ".join(
            f"{', '.join(chain)} (exit status {rc})" for chain, rc in failed) + "; the messages above say why")


def _worker_main(argv: list[str]) -> int:
    """Entry of one `ensure_all` worker: ensure the named models in order, progress bars on line `--position`."""
    from . import models

    caller = os.getppid()

    def stop_when_orphaned() -> None:  # the caller was killed: stop too (the next build clears our leftovers)
        while os.getppid() == caller:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    quiet = "--quiet" in argv
    names = [a for a in argv if not a.startswith("--")]
    models.BAR_POSITION = next((int(a.split("=")[1]) for a in argv if a.startswith("--position=")), None)
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in names:
        _check_name(name)
        _ensure(name, progress=not quiet)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
