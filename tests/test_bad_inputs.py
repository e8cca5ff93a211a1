"""The bad-input corpus: every case goes through the command line and must end as one clean error.

For each case: exit status 2; stderr starts with `error:` and holds no traceback; the culprit (file, key
or tensor) is named; every source folder is byte-identical afterwards (sha256 of each file); and nothing
complete-looking is left (no output manifest saying "complete"). Sources are copies of the demo model
zen-tiny (a DeepSeek-V3 layout in four shards) and of its block-FP8 twin, corrupted one way per case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from zenith_merge.cli import main
from zenith_merge.demo import ensure_demo

SHARD1 = "model-00001-of-00004.safetensors"
SHARD2 = "model-00002-of-00004.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def demos() -> dict[str, Path]:
    return {"zen": ensure_demo("zen-tiny", progress=False), "fp8": ensure_demo("zen-tiny-fp8", progress=False)}


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- building the inputs ---------------------------------------------------------------------------------

@dataclass
class Env:
    tmp: Path
    demos: dict[str, Path]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def source(self, kind: str = "zen") -> Path:
        """A fresh copy of a demo model (its own `.zenith/` bookkeeping left out), to corrupt."""
        dst = self.tmp / f"src-{kind}"
        if not dst.exists():
            shutil.copytree(self.demos[kind], dst, ignore=shutil.ignore_patterns(".zenith"))
        return dst

    def config(self, text: str | bytes, name: str = "c.yml") -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def passthrough(self, src: Path | None = None, extra: str = "") -> Path:
        """A passthrough merge config of `src` (a fresh copy of zen-tiny by default)."""
        src = src or self.source()
        return self.config(f"base_model: {src}\nexperts:\n  - source_model: {src}\n    positive_prompts: "
                           f"['def main():']\nrouting_report: false\nmax_shard_size: 2MB\n{extra}")

    def merge(self, config: Path, *more: str) -> list[str]:
        return ["merge", str(config), "--output", str(self.out), "--no-progress", *more]


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(src: Path, edit: Callable[[dict, str], None], shard: str = SHARD1) -> str:
    """Change shard's header with `edit(header, first_tensor_name)`; returns that tensor's name."""
    header, data = _header(src / shard)
    name = next(k for k in header if k != "__metadata__")
    edit(header, name)
    _write_header(src / shard, header, data)
    return name


def _raw_header(src: Path, text: bytes, shard: str = SHARD1) -> None:
    _, data = _header(src / shard)
    _write_header(src / shard, text, data)


def _poison(src: Path, value: float, count: int = 3) -> str:
    """Set `count` values of the first float tensor of shard 2 to `value`; returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / SHARD2))
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > count)
    t = tensors[name].clone()
    t.view(-1)[:count] = value
    tensors[name] = t
    header, _ = _header(src / SHARD2)
    save_file(tensors, str(src / SHARD2), metadata=header.get("__metadata__"))
    return name


def _index(src: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((src / INDEX).read_text())
    edit(data)
    (src / INDEX).write_text(json.dumps(data))


def _fp8_edit(e: Env, edit: Callable[[dict, str], None]) -> tuple[list[str], str]:
    """A scale of the FP8 copy changed by `edit(header, scale_name)`; the merge config runs on that copy."""
    src = e.source("fp8")
    for shard in sorted(src.glob("model-*.safetensors")):
        header, data = _header(shard)
        scale = next((k for k in header if k.endswith("weight_scale_inv")), None)
        if scale:
            edit(header, scale)
            _write_header(shard, header, data)
            return e.merge(e.passthrough(src)), re.escape(scale.removesuffix("_scale_inv"))
    raise AssertionError("no FP8 scale in the demo")


# -- the cases: name -> build(env) -> (argv, regex naming the culprit) ------------------------------------

CASES: dict[str, Callable[[Env], tuple[list[str], str]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _config_case(name: str, text: str | bytes, culprit: str) -> None:
    CASES[name] = lambda e: (e.merge(e.config(text)), culprit)


# configs: encoding, YAML hazards, bounds, numbers, keys
_config_case("config-not-utf8", b"base_model: caf\xe9\n", r"c\.yml: not UTF-8")
_config_case("config-yaml-int-tag", "base_model: demo://zen-tiny\ndtype: !!int bfloat16\n", r"c\.yml: line 2: YAML tag !!int")
_config_case("config-python-tag", "base_model: !!python/object/apply:os.system ['true']\n", r"c\.yml: line 1: YAML tag")
_config_case("config-deep-nesting", "a: " + "[" * 3000 + "]" * 3000 + "\n", r"c\.yml: line 1: nested more than")
_config_case("config-alias-bomb", "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9)),
    r"c\.yml: more than \d+ values once aliases are expanded")
_config_case("config-400-digit-shard-size", "base_model: demo://zen-tiny\nmax_shard_size: " + "9" * 400 + "\n",
             r"c\.yml: line 2: a number of 400 characters")
_config_case("config-huge-shard-size-string", "base_model: demo://zen-tiny\nmax_shard_size: '1" + "0" * 60 + "GB'\n",
             r"max_shard_size.*not a plausible byte size")
_config_case("config-nan-weight", "base_model: demo://zen-tiny\nmerge_method: assembly\nexperts:\n"
             "  - source_model: demo://zen-tiny\n  - source_model: demo://zen-r1-tiny\n"
             "assembly:\n  weights:\n    default: [.nan, 1.0]\n", r"assembly\.weights\.default\.0: nan is not a finite")
_config_case("config-inf-value", "base_model: demo://zen-tiny\nslerp_t: .inf\n", r"slerp_t: inf is not a finite")
_config_case("config-int-out-of-range", "base_model: demo://zen-tiny\nworkers: 99999999999999999999999\n",
             r"workers: 9+ is out of range")
_config_case("config-duplicate-key", "base_model: demo://zen-tiny\nbase_model: demo://zen-r1-tiny\n",
             r"c\.yml: line 2: key 'base_model' is given twice")
_config_case("config-unknown-key", "base_model: demo://zen-tiny\nbase_modle: x\n", r"base_modle: unknown key")
_config_case("config-bad-yaml", "base_model: [unclosed\n", r"c\.yml: not valid YAML")
_config_case("config-top-level-list", "- base_model: demo://zen-tiny\n", r"c\.yml: expected a mapping")
_config_case("config-empty", "", r"c\.yml: expected a mapping")
_config_case("config-no-base-model", "experts: []\n", r"base_model")
_config_case("config-missing-folder", "base_model: /nonexistent/model\n", r"/nonexistent/model")
_config_case("config-unknown-demo", "base_model: demo://zen-huge\n", r"zen-huge")
_config_case("config-bad-dtype", "base_model: demo://zen-tiny\ndtype: bfloat17\n", r"dtype")
_config_case("config-negative-top-k", "base_model: demo://zen-tiny\nexperts_per_token: -1\n", r"experts_per_token")
_config_case("config-tab-indent", "base_model: demo://zen-tiny\nexperts:\n\t- source_model: x\n", r"c\.yml: not valid YAML")


@case("config-file-missing")
def _(e):
    return e.merge(e.tmp / "nope.yml"), r"nope\.yml: cannot read config"


@case("config-is-a-folder")
def _(e):
    (e.tmp / "dir.yml").mkdir()
    return e.merge(e.tmp / "dir.yml"), r"dir\.yml: cannot read config"


@case("config-too-large")
def _(e):
    return e.merge(e.config("# " + "x" * (5 * 2**20) + "\nbase_model: demo://zen-tiny\n")), r"c\.yml: \d+ bytes; a config"


# the output folder
@case("output-inside-source")
def _(e):
    src = e.source()
    return ["merge", str(e.passthrough(src)), "--output", str(src / "merged"), "--no-progress"], r"overlaps source"


@case("output-is-source")
def _(e):
    src = e.source()
    return ["merge", str(e.passthrough(src)), "--output", str(src), "--no-progress"], r"overlaps source"


@case("output-not-empty-not-ours")
def _(e):
    e.out.mkdir()
    (e.out / "thesis.tex").write_text("precious")
    return e.merge(e.passthrough()), r"is not empty"


@case("output-overwrite-not-ours")
def _(e):
    e.out.mkdir()
    (e.out / "thesis.tex").write_text("precious")
    return e.merge(e.passthrough(), "--overwrite"), r"not a zenith-merge output"


@case("output-parent-is-a-file")
def _(e):
    (e.tmp / "afile").write_text("x")
    return ["merge", str(e.passthrough()), "--output", str(e.tmp / "afile" / "out"), "--no-progress"], r"afile"


@case("resume-unreadable-manifest")
def _(e):
    (e.out / ".zenith").mkdir(parents=True)
    (e.out / ".zenith" / "manifest.json").write_text("{oops")
    return e.merge(e.passthrough(), "--resume"), r"manifest\.json: unreadable manifest"


# safetensors headers
def _header_case(name: str, edit: Callable[[dict, str], None], culprit: str | None = None) -> None:
    def build(e):
        tensor = _edit_header(e.source(), edit)
        return e.merge(e.passthrough()), culprit or rf"{SHARD1}: tensor '{re.escape(tensor)}'"
    CASES[name] = build


_header_case("header-dtype-list", lambda h, n: h[n].update(dtype=["BF16"]))
_header_case("header-dtype-unknown", lambda h, n: h[n].update(dtype="BF17"))
_header_case("header-dtype-sub-byte", lambda h, n: h[n].update(dtype="F4"))
_header_case("header-shape-negative", lambda h, n: h[n].update(shape=[-1, 4]))
_header_case("header-shape-string", lambda h, n: h[n].update(shape="big"))
_header_case("header-shape-disagrees", lambda h, n: h[n].update(shape=[*h[n]["shape"], 2]))
_header_case("header-offsets-reversed", lambda h, n: h[n].update(data_offsets=h[n]["data_offsets"][::-1]))
_header_case("header-offsets-past-end", lambda h, n: h[n].update(
    data_offsets=[h[n]["data_offsets"][0] + 10**9, h[n]["data_offsets"][1] + 10**9]), None)
_header_case("header-entry-not-object", lambda h, n: h.update({n: 7}))
_header_case("header-metadata-not-object", lambda h, n: h.update(__metadata__=[1]), rf"{SHARD1}: corrupt")


@case("header-overlapping-offsets")
def _(e):
    def edit(h, n):
        names = [k for k in h if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: h[k]["data_offsets"])[:2]
        h[b] = {**h[a]}  # b claims a's bytes
    _edit_header(e.source(), edit, shard=SHARD2)
    return e.merge(e.passthrough()), rf"{SHARD2}: corrupt safetensors header \(tensors .* overlap\)"


def _raw_case(name: str, text: bytes, culprit: str) -> None:
    def build(e):
        _raw_header(e.source(), text)
        return e.merge(e.passthrough()), rf"{SHARD1}: corrupt safetensors header{culprit}"
    CASES[name] = build


_raw_case("header-not-json", b"{not json", ": not valid JSON")
_raw_case("header-not-utf8", b'{"a\xff": 1}', ": not valid JSON")
_raw_case("header-5000-digit-int", b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
          ": a number of 5000 characters")
_raw_case("header-deep-nesting", b'{"w": ' + b"[" * 100000 + b"]" * 100000 + b"}", ": JSON nested")
_raw_case("header-nan-constant", b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
          ": NaN is not a finite number")
_raw_case("header-json-array", b"[1, 2, 3]", r" \(not a JSON object\)")


@case("header-length-lies")
def _(e):
    src = e.source()
    raw = bytearray((src / SHARD1).read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 2)
    (src / SHARD1).write_bytes(bytes(raw))
    return e.merge(e.passthrough()), rf"{SHARD1}: truncated safetensors file"


@case("header-length-implausible")
def _(e):
    src = e.source()
    raw = bytearray((src / SHARD1).read_bytes())
    raw[:8] = struct.pack("<Q", 2**60)
    (src / SHARD1).write_bytes(bytes(raw))
    return e.merge(e.passthrough()), rf"{SHARD1}: corrupt safetensors file \(header length"


@case("shard-truncated")
def _(e):
    src = e.source()
    raw = (src / SHARD2).read_bytes()
    (src / SHARD2).write_bytes(raw[:len(raw) - 1000])
    return e.merge(e.passthrough()), rf"{SHARD2}: .*truncated file"


@case("shard-empty")
def _(e):
    src = e.source()
    (src / SHARD2).write_bytes(b"")
    return e.merge(e.passthrough()), rf"{SHARD2}: truncated safetensors file"


# indexes, links, config.json, side files
@case("index-names-missing-shard")
def _(e):
    src = e.source()
    (src / SHARD2).unlink()
    return e.merge(e.passthrough()), rf"shard '{SHARD2}' named in {INDEX} is missing"


@case("index-path-traversal")
def _(e):
    src = e.source()
    _index(src, lambda d: d["weight_map"].update({k: "../../etc/passwd" for k in list(d["weight_map"])[:1]}))
    return e.merge(e.passthrough()), r"\.\./\.\./etc/passwd"


@case("index-absolute-path")
def _(e):
    src = e.source()
    _index(src, lambda d: d["weight_map"].update({k: "/etc/hostname" for k in list(d["weight_map"])[:1]}))
    return e.merge(e.passthrough()), r"/etc/hostname"


@case("index-weight-map-not-mapping")
def _(e):
    src = e.source()
    _index(src, lambda d: d.update(weight_map=[1, 2]))
    return e.merge(e.passthrough()), rf"{INDEX}: no 'weight_map'"


@case("index-not-json")
def _(e):
    src = e.source()
    (src / INDEX).write_text("{oops")
    return e.merge(e.passthrough()), rf"{INDEX}: not valid JSON"


@case("index-deep-nesting")
def _(e):
    src = e.source()
    (src / INDEX).write_text("[" * 100000 + "]" * 100000)
    return e.merge(e.passthrough()), rf"{INDEX}: JSON nested"


@case("shard-symlink-out-of-folder")
def _(e):
    src = e.source()
    outside = e.tmp / "elsewhere.safetensors"
    shutil.move(src / SHARD2, outside)
    os.symlink(outside, src / SHARD2)
    return e.merge(e.passthrough()), rf"{SHARD2}.* is a link to .*outside the model folder"


@case("config-json-not-json")
def _(e):
    src = e.source()
    (src / "config.json").write_text("{oops")
    return e.merge(e.passthrough()), r"config\.json: not valid JSON"


@case("config-json-huge-number")
def _(e):
    src = e.source()
    (src / "config.json").write_text('{"hidden_size": ' + "7" * 5000 + "}")
    return e.merge(e.passthrough()), r"config\.json: a number of 5000 characters"


@case("config-json-not-object")
def _(e):
    src = e.source()
    (src / "config.json").write_text("[]")
    return e.merge(e.passthrough()), r"config\.json: not a JSON object"


@case("config-json-unknown-architecture")
def _(e):
    src = e.source()
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FancyNewMoEForCausalLM"]
    cfg["model_type"] = "fancy"
    (src / "config.json").write_text(json.dumps(cfg))
    return e.merge(e.passthrough()), r"FancyNewMoEForCausalLM"


@case("tokenizer-json-corrupt")
def _(e):
    src = e.source()
    (src / "tokenizer.json").write_text('{"model": {"vocab": ')
    return e.merge(e.passthrough()), re.escape(str(src / "tokenizer.json")) + ": not valid JSON"


@case("generation-config-corrupt")
def _(e):
    src = e.source()
    (src / "generation_config.json").write_bytes(b"\xff\xfe")
    return e.merge(e.passthrough()), re.escape(str(src / "generation_config.json"))


# pickles
@case("pickle-without-opt-in")
def _(e):
    src = e.tmp / "src-bin"
    src.mkdir()
    shutil.copy(e.demos["zen"] / "config.json", src)
    torch.save({"w": torch.ones(2)}, src / "pytorch_model.bin")
    return e.merge(e.passthrough(src)), r"pytorch_model\.bin: pickled \.bin checkpoint"


@case("pickle-with-code")
def _(e):
    src = e.tmp / "src-bin"
    src.mkdir()
    shutil.copy(e.demos["zen"] / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(_evil_pickle())
    return e.merge(e.passthrough(src, "allow_pickle: true\n")), r"pytorch_model\.bin: cannot load with weights_only"


def _evil_pickle() -> bytes:
    import io

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/zenith-pwned",))

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    return buf.getvalue()


# FP8 scales
CASES["fp8-scale-missing"] = lambda e: _fp8_edit(e, lambda h, s: h.pop(s))
CASES["fp8-scale-wrong-shape"] = lambda e: _fp8_edit(e, lambda h, s: h[s].update(
    shape=[h[s]["shape"][0] + 1, *h[s]["shape"][1:]],
    data_offsets=[h[s]["data_offsets"][0], h[s]["data_offsets"][1] + 4 * h[s]["shape"][-1]]))
CASES["fp8-scale-wrong-dtype"] = lambda e: _fp8_edit(e, lambda h, s: h[s].update(
    dtype="I32"))


# non-finite weights
@case("nan-in-source-weight")
def _(e):
    name = _poison(e.source(), float("nan"))
    return e.merge(e.passthrough()), rf"tensor '{re.escape(name)}': 3 NaN/Inf values \(copied from .*{SHARD2}\)"


@case("inf-in-source-weight")
def _(e):
    name = _poison(e.source(), float("-inf"), count=1)
    return e.merge(e.passthrough()), rf"tensor '{re.escape(name)}': 1 NaN/Inf value \("


# fp8-cast
@case("fp8-cast-of-a-bf16-model-to-bf16")
def _(e):
    return ["fp8-cast", str(e.source()), str(e.out), "--no-progress"], r"no block-FP8 weights to dequantise"


@case("fp8-cast-into-its-input")
def _(e):
    src = e.source("fp8")
    return ["fp8-cast", str(src), str(src / "out"), "--no-progress"], r"overlaps source"


@case("fp8-cast-nan")
def _(e):
    name = _poison(e.source(), float("nan"), count=2)
    return ["fp8-cast", str(e.source()), str(e.out), "--to", "fp8", "--no-progress"], rf"'{re.escape(name)}'.*NaN/Inf"


def _says_complete(out: Path) -> bool:
    try:
        return json.loads((out / ".zenith" / "manifest.json").read_text()).get("state") == "complete"
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clean_error(name, tmp_path, demos, capsys):
    env = Env(tmp_path, demos)
    argv, culprit = CASES[name](env)
    sources = {p: _digests(p) for p in [*demos.values(), *tmp_path.glob("src-*")]}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(culprit, err), err
    assert {p: _digests(p) for p in sources} == sources, "a source changed"
    assert not _says_complete(env.out)
    assert not Path("/tmp/zenith-pwned").exists()


def test_the_corpus_has_at_least_50_cases():
    assert len(CASES) >= 50


def test_a_write_the_filesystem_refuses_is_one_clean_error(tmp_path, demos):
    """A real write failure from the kernel (a file-size limit: EFBIG, as a full disk gives ENOSPC) in the
    middle of a shard: exit 2 naming the file, the partial shard removed, the folder not complete."""
    env = Env(tmp_path, demos)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000)); "
            "from zenith_merge.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *env.merge(env.passthrough())], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert re.search(r"out/\.model-0000\d-of-0000\d\.safetensors\.\d+\.tmp: File too large", done.stderr), done.stderr
    assert not list(env.out.glob(".*.tmp")), "the partial shard was left"
    assert json.loads((env.out / ".zenith" / "manifest.json").read_text())["state"] == "writing"


def test_a_full_disk_is_named_with_what_to_do():
    from zenith_merge.errors import from_os_error

    with pytest.raises(OSError) as info, open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    message = str(from_os_error(info.value))
    assert "No space left on device" in message and "rerun with --resume" in message


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A small tmpfs mounted at `path` for the test (a real full or read-only filesystem); skipped where the
    machine does not let the tests mount one."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _one_clean_error(config: Path, out: Path) -> subprocess.CompletedProcess:
    """`zenith-merge merge` in a subprocess, asserted to end with exit 2 and one error line, no traceback."""
    done = subprocess.run([sys.executable, "-m", "zenith_merge.cli", "merge", str(config), "--output", str(out),
                           "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return done


def test_a_really_full_disk_is_one_clean_error(tmp_path, demos):
    """A 1 MB filesystem fills up in the middle of the first shard (ENOSPC from the kernel, not a limit we set):
    exit 2 naming the temporary shard and saying what to do, no partial shard left, the folder not complete."""
    env = Env(tmp_path, demos)
    config = env.passthrough()
    with _tmpfs(tmp_path / "disk", "size=1m") as disk:
        done = _one_clean_error(config, disk / "out")
        assert re.search(r"out/\S+\.tmp: No space left on device", done.stderr), done.stderr
        assert "--resume" in done.stderr
        assert not list((disk / "out").glob(".*.tmp")), "the partial shard was left"
        assert not _says_complete(disk / "out")


def test_an_output_folder_on_a_read_only_filesystem_is_one_clean_error(tmp_path, demos):
    """Root may write anywhere chmod forbids, but not onto a read-only mount: exit 2 naming the folder, the
    sources unchanged."""
    env = Env(tmp_path, demos)
    config = env.passthrough()
    sources = _digests(env.source())
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        done = _one_clean_error(config, ro / "out")
        assert re.search(r"ro/out\S*: Read-only file system", done.stderr), done.stderr
    assert _digests(env.source()) == sources
