"""Every shipped config plans, as text and as JSON, and so does each with `fp8_output: true` where the
output is DeepSeek-V3; every key README.md's "Configs" table documents exists in the config schema, and
plans when set on a shipped example, its value reaching the plan.

The configs are globbed from merge/ and merge/examples/, so a new example is covered without editing
this file. Planning reads configs and safetensors headers only (the demo models are built on first use).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from zenith_merge.cli import main
from zenith_merge.config import MergeConfig, load_config, with_absolute_paths
from zenith_merge.plan.models import (
    AssembleRecipe,
    CopyRecipe,
    ExpertRecipe,
    Fp8ScaleRecipe,
    MethodRecipe,
    MlaRecipe,
    Recipe,
    RouterRecipe,
    VocabRecipe,
    ZerosRecipe,
)
from zenith_merge.plan.summary import recipe_label

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [*sorted((ROOT / "merge").glob("*.yml")), *sorted((ROOT / "merge" / "examples").glob("*.yml"))]
IDS = [str(p.relative_to(ROOT / "merge")) for p in CONFIGS]
DEEPSEEK = "DeepseekV3ForCausalLM"
FP8_REFUSAL = "fp8_output: not with router.train_steps or align.train_steps"


def _plan(capsys, *argv) -> tuple[int, str, str]:
    """`zenith-merge plan ARGV` in this process: (exit status, stdout, stderr); never a traceback."""
    try:
        rc = main(["plan", *map(str, argv)])
    except SystemExit as err:  # argparse
        rc = err.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def _plan_json(capsys, path: Path) -> dict:
    """The `--json` plan of config `path` (which must plan)."""
    rc, out, err = _plan(capsys, path, "--json")
    assert rc == 0, err
    return json.loads(out)


def _trains(path: Path) -> bool:
    """Whether the config trains after writing (router or alignment training), which fp8_output refuses."""
    cfg = load_config(path)
    return bool(cfg.router.train_steps or cfg.align.train_steps)


def _with_fp8_output(path: Path, tmp_path: Path, **changes) -> Path:
    """A copy of config `path` in tmp_path with `fp8_output: true` (and `changes`), its relative paths made
    absolute so that it names the same models, text and output folder as the original."""
    data = with_absolute_paths(yaml.safe_load(path.read_text()), path.parent)
    data["fp8_output"] = True
    for dotted, value in changes.items():
        _at(data, dotted.replace("__", "."), value, create=True)
    out = tmp_path / f"fp8-{path.name}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _check_plan_json(plan: dict) -> None:
    """A JSON plan has tensors and shards, and the shards hold each tensor exactly once."""
    names = [t["name"] for t in plan["tensors"]]
    assert names and plan["shards"]
    assert len(set(names)) == len(names)
    in_shards = [n for s in plan["shards"] for n in s["tensors"]]
    assert sorted(in_shards) == sorted(names)
    assert plan["estimates"]["tensor_count"] == len(names)
    assert plan["target_config"]["architectures"]


def test_configs_are_found():
    """The glob sees merge/config.yml and the examples (an empty parametrisation would test nothing)."""
    assert ROOT / "merge" / "config.yml" in CONFIGS
    assert len([p for p in CONFIGS if p.parent.name == "examples"]) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_plans(path, capsys):
    """`plan CONFIG` and `plan CONFIG --json` exit 0; the JSON parses and lists the tensors and shards."""
    rc, out, err = _plan(capsys, path)
    assert rc == 0, err
    assert out.startswith("plan ") and "tensors " in out and "estimated peak memory" in out
    plan = _plan_json(capsys, path)
    _check_plan_json(plan)
    assert f"tensors {len(plan['tensors'])}," in out
    fp8 = bool(plan["config"].get("fp8_output"))
    assert any(t["dtype"] == "F8_E4M3" for t in plan["tensors"]) == fp8
    assert ("\nfp8_output: " in out) == fp8


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_plans_with_fp8_output(path, capsys, tmp_path):
    """With `fp8_output: true`, a DeepSeek-V3 output plans in text and JSON: each F8_E4M3 weight is followed
    by its float32 `weight_scale_inv`, and the text says how many. A config that trains after writing is
    refused with exit 2 and the reason, not a traceback."""
    original = _plan_json(capsys, path)
    if original["target_config"]["architectures"][0] != DEEPSEEK:
        pytest.skip(f"output is {original['target_config']['architectures'][0]}, not {DEEPSEEK}")
    fp8_path = _with_fp8_output(path, tmp_path)
    if _trains(fp8_path):
        for extra in ((), ("--json",)):
            rc, out, err = _plan(capsys, fp8_path, *extra)
            assert rc == 2 and FP8_REFUSAL in err and out == ""
        return

    rc, text, err = _plan(capsys, fp8_path)
    assert rc == 0, err
    plan = _plan_json(capsys, fp8_path)
    _check_plan_json(plan)
    # the copy means what the original means: same sources, same output folder
    assert plan["output_dir"] == original["output_dir"]
    assert {k: s["path"] for k, s in plan["sources"].items()} == {k: s["path"] for k, s in original["sources"].items()}

    tensors = plan["tensors"]
    fp8 = [i for i, t in enumerate(tensors) if t["dtype"] == "F8_E4M3"]
    scales = [i for i, t in enumerate(tensors) if t["recipe"]["kind"] == "fp8_scale"]
    assert fp8 and len(fp8) == len(scales)
    for i in fp8:
        weight, scale = tensors[i], tensors[i + 1]
        assert weight["name"].endswith(".weight") and weight["recipe"]["kind"] != "fp8_scale"
        assert scale["name"] == weight["name"] + "_scale_inv" and scale["name"].endswith("weight_scale_inv")
        assert scale["dtype"] == "F32" and scale["recipe"] == {"kind": "fp8_scale", "tensor": weight["name"],
                                                               "via": scale["recipe"]["via"]}
        assert len(scale["shape"]) == 2 and len(weight["shape"]) == 2
    assert all(tensors[i - 1]["dtype"] == "F8_E4M3" for i in scales)
    # the rest keep their BF16 plan: norms, routers, embeddings and head are not quantised
    kept = {t["name"]: t["dtype"] for t in original["tensors"]}
    assert all(kept[t["name"]] == t["dtype"] for t in tensors if t["dtype"] != "F8_E4M3" and t["name"] in kept)
    assert len(tensors) == len(original["tensors"]) + len(scales)
    q = plan["target_config"]["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]

    assert f"fp8_output: {len(fp8)} of {len(tensors)} tensors written as F8_E4M3" in text
    assert f"{len(scales)} block scales (fp8_output)" in text
    if plan["method"] == "assembly":
        assert re.search(rf"^\s+{len(scales)}  block scales \(fp8_output\)$", text, re.M)


@pytest.mark.parametrize("key", ["router__train_steps", "align__train_steps"])
def test_fp8_output_refused_with_training(key, capsys, tmp_path):
    """fp8_output with router or alignment training is refused: exit 2 and the reason, in text and JSON."""
    path = _with_fp8_output(ROOT / "merge" / "config.yml", tmp_path, **{key: 5})
    for extra in ((), ("--json",)):
        rc, out, err = _plan(capsys, path, *extra)
        assert rc == 2, (out, err)
        assert err.startswith("error: ") and FP8_REFUSAL in err and "fp8-cast" in err
        assert out == ""


def test_console_script_plans_fp8_assembly(tmp_path):
    """The reported crash, as reported: the installed `zenith-merge plan` on the Chimera with fp8_output."""
    path = _with_fp8_output(ROOT / "merge" / "examples" / "chimera.yml", tmp_path)
    script = Path(sys.executable).parent / "zenith-merge"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "zenith_merge.cli"]
    done = subprocess.run([*cmd, "plan", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "block scales (fp8_output)" in done.stdout


def test_recipe_label_covers_every_recipe_kind():
    """The summary names every recipe kind in plan.Recipe; a new kind fails here until it is described."""
    union = typing.get_args(Recipe)[0]
    kinds = {cls.model_fields["kind"].default for cls in typing.get_args(union)}
    examples = [
        CopyRecipe(source="base", tensor="model.norm.weight"),
        CopyRecipe(source="donor1", tensor="x", pad=True),
        ExpertRecipe(layer=1, slot=3, proj="down"),
        RouterRecipe(layer=1, part="bias"),
        AssembleRecipe(tensor="t", tensor_class="attention", sources=("base", "donor1"), weights=(0.7, 0.3),
                       threshold=0.0, regmean=True),
        VocabRecipe(part="head"),
        Fp8ScaleRecipe(tensor="model.layers.1.mlp.experts.0.down_proj.weight", via="BF16"),
        ZerosRecipe(),
        MlaRecipe(layer=0, part="kv_b_proj"),
        MethodRecipe(tensor="t", tensor_class="routed_experts", method="ties", sources=("donor0", "donor1", "base"),
                     base=2, inputs=({"weight": 1.0}, {"weight": 1.0}, {}), shared={}, merge_dtype="F32"),
    ]
    assert {r.kind for r in examples} == kinds
    labels = {r.kind: recipe_label(r) for r in examples}
    assert all(label and label != kind for kind, label in labels.items())
    assert labels["fp8_scale"] == "block scales (fp8_output)"
    assert recipe_label(examples[4]) == "attention (RegMean): 0.7 base + 0.3 donor1"
    assert labels["method"] == "routed_experts: ties of donor0, donor1, base (method base: base), in F32"
    layer = examples[-1].model_copy(update={"fused": ("expert_down",), "layer": 1, "expert": 0})
    assert recipe_label(layer).endswith("in F32, statistics over the layer's experts (expert_scope layer)")
    assert recipe_label(examples[-1].model_copy(update={"expert_axis": 0})).endswith("in F32, expert by expert")


# README.md "Configs": every documented key resolves against config/schema.py's pydantic models.


def _readme_section(title: str) -> str:
    """The text of README.md's `## title` section."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _table_keys() -> list[str]:
    """The dotted keys in the first column of the Configs table (`a.b`, `.c` in one cell: `a.b`, `a.c`)."""
    keys = []
    for line in _readme_section("Configs").splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        prefix = ""
        for key in re.findall(r"`([^`]+)`", cell):
            if key.startswith("."):
                key = prefix + key
            prefix = key.rsplit(".", 1)[0] if "." in key else ""
            keys.append(key)
    return keys


def _intro_keys() -> list[str]:
    """The mergekit-moe keys listed before the table (`experts[].source_model/positive_prompts`: two keys)."""
    intro = _readme_section("Configs").split("\n|", 1)[0]
    keys = []
    for item in re.findall(r"`([^`]+)`", intro):
        if ":" in item or " " in item:  # `architecture: Qwen3 MoE` is a value, not a key
            continue
        head, _, tail = item.rpartition(".")
        keys += [f"{head}.{t}" if head else t for t in tail.split("/")]
    return keys


def _models(annotation) -> list:
    """The pydantic models and containers an annotation allows (Optional and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _models(arg)]
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    return [annotation] if annotation is not type(None) else []


def _resolve(key: str) -> None:
    """Walk a documented key through MergeConfig's fields; raise KeyError naming the part that is missing.

    `name[]` steps into a list's items; `<placeholder>` is any key of a mapping.
    """
    current = [MergeConfig]
    for part in key.split("."):
        nxt = []
        name, is_list = (part[:-2], True) if part.endswith("[]") else (part, False)
        for ann in current:
            origin = typing.get_origin(ann)
            if name.startswith("<") and name.endswith(">"):
                if origin is dict:
                    nxt += _models(typing.get_args(ann)[1])
            elif isinstance(ann, type) and issubclass(ann, BaseModel) and name in ann.model_fields:
                nxt += _models(ann.model_fields[name].annotation)
        if is_list:
            nxt = [a for ann in nxt if typing.get_origin(ann) is list for a in _models(typing.get_args(ann)[0])]
        if not nxt:
            raise KeyError(f"{key}: {part!r} is not in the schema")
        current = nxt


def test_readme_table_keys_are_in_the_schema():
    """Every key in the first column of README.md's Configs table is a field of config/schema.py's models."""
    keys = _table_keys()
    assert "assembly.regmean.max_memory" in keys and "align.max_tokens" in keys and "fp8_output" in keys
    missing = []
    for key in keys:
        try:
            _resolve(key)
        except KeyError as err:
            missing.append(str(err))
    assert not missing, "documented in README.md but not in config/schema.py: " + "; ".join(missing)


def test_readme_mergekit_keys_are_in_the_schema():
    """The mergekit-moe keys README.md lists above the table are accepted too."""
    keys = _intro_keys()
    assert "experts[].residual_scale" in keys and "tokenizer.tokens" in keys
    for key in keys:
        _resolve(key)


def test_schema_resolver_refuses_unknown_keys():
    """The resolver is not vacuous: a misspelt or misplaced key is reported."""
    for key in ("align.ridges", "assembly.regmean.nope", "experts.keep", "router.train_steps.x", "nope"):
        with pytest.raises(KeyError):
            _resolve(key)
    _resolve("assembly.weights.<class>")
    _resolve("experts[].layers")


# Every key of README.md's Configs table, set on a shipped example to a value other than the example's: the
# config plans (exit 0, JSON) and the resolved config the plan carries holds that value, so no documented key is
# refused or silently dropped on its way to the plan. A key added to the table without a case here fails
# test_every_documented_key_has_a_case. Each case: (example, {key: value, ...}, the key whose value is compared);
# keys are dotted, `models.-1` / `experts.-1` index a list; companions a key needs are set beside it.
FLAGSHIP, CHIMERA, TIES = "config.yml", "examples/chimera.yml", "examples/ties.yml"
PASS, CONCAT = "examples/passthrough.yml", "examples/chimera_concat.yml"
# merge/examples/ties.yml in zenith-merge's own form (its method keys are refused in a mergekit-yaml file)
ZENITH_TIES = {"merge_method": "ties", "base_model": "demo://zen-parent", "parameters": {"density": 0.7},
               "experts": [{"source_model": "demo://zen-tiny", "parameters": {"weight": 1.0}},
                           {"source_model": "demo://zen-r1-tiny", "parameters": {"weight": 1.0}},
                           {"source_model": "demo://zen-parent"}],
               "merge_dtype": "float32", "dtype": "bfloat16", "max_shard_size": "2MB"}
KEY_CASES = {
    "merge_method": (TIES, {"merge_method": "dare_ties"}),
    "parameters": (TIES, {"parameters": {"density": 0.5, "normalize": True}}),
    "experts[].parameters": (TIES, {"models.-1.parameters": {"weight": 0.5}}, "experts.1.parameters"),
    "method_base": (ZENITH_TIES, {"method_base": False, "merge_method": "linear", "parameters": {"weight": 1.0}}),
    "merge_dtype": (ZENITH_TIES, {"merge_dtype": "bfloat16"}),
    "expert_scope": (TIES, {"expert_scope": "expert"}),
    "method_vocab.pad_to_multiple_of": (ZENITH_TIES, {"method_vocab.pad_to_multiple_of": 64}),
    "search.parameters": (TIES, {"search.parameters": {"density": [0.5, 0.9]}}),
    "experts[].keep": (CONCAT, {"experts.1.keep": 4}),
    "experts[].shared_expert": (CONCAT, {"experts.1.shared_expert": "routed", "experts.1.keep": 3}),
    "experts[].layers": (FLAGSHIP, {"experts.-1.layers": {1: 0}}),
    "align.mode": (FLAGSHIP, {"align.mode": "fit"}),
    "align.ridge": (FLAGSHIP, {"align.ridge": 0.1}),
    "align.max_tokens": (FLAGSHIP, {"align.max_tokens": 4000}),
    "align.max_memory": (FLAGSHIP, {"align.max_memory": "100MB"}),
    "align.calibration": (FLAGSHIP, {"align.calibration": ["demo:code"]}),
    "assembly.weights.<class>": (CHIMERA, {"assembly.weights.norms": [0.5, 0.5]}),
    "search.keep": (CHIMERA, {"search.keep": ["demo:maths"], "search.gain": ["demo:code"]}),
    "search.gain": (CHIMERA, {"search.gain": ["demo:code"], "search.keep": ["demo:maths"]}),
    "search.max_loss": (CHIMERA, {"search.max_loss": 0.05}),
    "search.classes": (CHIMERA, {"search.classes": ["attention"]}),
    "search.grid": (CHIMERA, {"search.grid": [0.0, 0.5, 1.0]}),
    "search.generations": (CHIMERA, {"search.generations": 2}),
    "search.population": (CHIMERA, {"search.population": 4}),
    "search.sigma": (CHIMERA, {"search.sigma": 0.2}),
    "search.max_chars": (CHIMERA, {"search.max_chars": 1000}),
    "assembly.regmean.data": (CHIMERA, {"assembly.regmean.data": [["demo:maths"], ["demo:code"]]}),
    "assembly.regmean.classes": (CHIMERA, {"assembly.regmean.classes": ["attention"]}),
    "assembly.regmean.off_diagonal": (CHIMERA, {"assembly.regmean.off_diagonal": 0.5}),
    "assembly.regmean.ridge": (CHIMERA, {"assembly.regmean.ridge": 0.1}),
    "assembly.regmean.max_tokens": (CHIMERA, {"assembly.regmean.max_tokens": 256}),
    "assembly.regmean.max_memory": (CHIMERA, {"assembly.regmean.max_memory": "100MB"}),
    "assembly.threshold": (CHIMERA, {"assembly.threshold": 0.01}),
    "output_dir": (PASS, {"output_dir": "/tmp/zenith-elsewhere"}),
    "max_shard_size": (PASS, {"max_shard_size": "5MB"}),
    "tokenizer.slerp_t": (FLAGSHIP, {"tokenizer.slerp_t": 0.5}),
    "tokenizer.pad_to_multiple_of": (FLAGSHIP, {"tokenizer.pad_to_multiple_of": 128}),
    "router.calibrate": (FLAGSHIP, {"router.calibrate": True}),
    "router.train_steps": (FLAGSHIP, {"router.train_steps": 2}),
    "router.train": (FLAGSHIP, {"router.train": "all", "router.train_steps": 2}),
    "align.train_steps": (FLAGSHIP, {"align.train_steps": 2}),
    "align.lr": (FLAGSHIP, {"align.lr": 0.01, "align.train_steps": 2}),
    "align.teacher_data": (FLAGSHIP, {"align.teacher_data": ["demo:maths"], "align.train_steps": 2}),
    "align.teacher_weight": (FLAGSHIP, {"align.teacher_weight": 0.5, "align.teacher_data": ["demo:maths"],
                                        "align.train_steps": 2}),
    "experts[].random_experts": (FLAGSHIP, {"experts.-1.random_experts": True}),
    "router.target_share": (FLAGSHIP, {"router.target_share": 0.3, "router.calibrate": True}),
    "tokenizer.donor_merges": (FLAGSHIP, {"tokenizer.donor_merges": True}),
    "tokenizer.protect": (FLAGSHIP, {"tokenizer.protect": ["demo:code"], "tokenizer.donor_merges": True}),
    "load_in_8bit": (FLAGSHIP, {"load_in_8bit": True}),
    "calibration_dtype": (FLAGSHIP, {"calibration_dtype": "float32"}),
    "calibration_max_memory": (FLAGSHIP, {"calibration_max_memory": "1GB"}),
    "fp8_output": (CHIMERA, {"fp8_output": True}),
    "routing_report": (FLAGSHIP, {"routing_report": False}),
    "workers": (PASS, {"workers": 2}),
    "backend": (PASS, {"backend": "ray"}),
    "allow_pickle": (PASS, {"allow_pickle": True}),
    "allow_nonfinite": (PASS, {"allow_nonfinite": True}),
    "gate_source": (CONCAT, {"gate_source": "residual"}),
    "out_dtype": (TIES, {"out_dtype": "float32"}, "dtype"),  # mergekit's name for `dtype`
}


def _at(node, dotted: str, value=..., *, create: bool = False):
    """The value at `dotted` in nested dicts and lists (`experts.1.keep`; None below a missing or null parent);
    with `value`, set it there (None removes the key)."""
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else (node.setdefault(part, {}) if create else node[part])
        if node is None:
            return None
    key = int(last) if isinstance(node, list) else last
    if value is ...:
        return node[key]
    if value is None:
        node.pop(key, None)
    else:
        node[key] = value


def test_every_documented_key_has_a_case():
    """A key documented in README.md's Configs table (or a case left for a key no longer there) fails here."""
    assert set(KEY_CASES) == set(_table_keys())


@pytest.mark.parametrize("key", list(KEY_CASES))
def test_every_documented_key_plans_and_reaches_the_plan(key, capsys, tmp_path):
    """The example with the key changed plans (JSON, shards consistent) and the plan carries the new value where
    the unchanged example's plan carries another."""
    example, changes, *compared = KEY_CASES[key]
    compared = compared[0] if compared else next(iter(changes))
    if isinstance(example, dict):
        data = {**copy.deepcopy(example), "output_dir": str(tmp_path / "out")}
    else:
        path = ROOT / "merge" / example
        data = with_absolute_paths(yaml.safe_load(path.read_text()), path.parent)
    (tmp_path / "example.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    for dotted, value in changes.items():
        _at(data, dotted, value, create=True)
    (tmp_path / "changed.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    plan = _plan_json(capsys, tmp_path / "changed.yml")
    _check_plan_json(plan)
    original = _plan_json(capsys, tmp_path / "example.yml")
    if compared != "output_dir":  # the top-level field; every other key is read from the resolved config
        plan, original = plan["config"], original["config"]
    assert _at(plan, compared) != _at(original, compared), f"{key}: the plan carries the example's value"
