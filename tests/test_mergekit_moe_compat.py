"""mergekit-moe configs and command lines, run through mergekit-moe 0.1.5 (a dependency) and `zenith-merge moe`
side by side on tiny local models: both exit 0 or both refuse; zenith-merge's outputs load in transformers with
no remote code and generate; experts are equal by meaning (mergekit's fused expert tensors split back); and every
key of mergekit-moe's config schema is honoured or refused by name, never dropped."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_dense, tensors_of
from transformers import AutoModelForCausalLM

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPTS = [["def add(a, b):\n    return a + b"], ["What is 3 + 4? It is 7."], ["class Stack:\n    pass"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    families = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    return {(cls.removesuffix("ForCausalLM").lower(), i): make_tiny_dense(root / f"{cls}{i}", seed=7 * i + n, cls=cls,
                                                                          dtype=torch.float32)
            for n, cls in enumerate(families) for i in range(3)}


def _experts(family_models, prompts=True, **extra):
    return [{"source_model": str(p), **({"positive_prompts": PROMPTS[i]} if prompts else {}), **extra}
            for i, p in enumerate(family_models)]


def _run(tmp_path: Path, name: str, config: dict, flags: tuple[str, ...] = ()):
    """(mergekit-moe's exit code, its output, zenith-merge's exit code and stderr, its output); both run in this
    process through their command-line entry points (a subprocess each would cost seconds of imports)."""
    from mergekit.scripts.moe import main as mergekit_moe

    from zenith_merge.cli import main as zenith_merge

    folder = tmp_path / name
    folder.mkdir()
    cfg = folder / "config.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        mergekit_moe.main([str(cfg), str(folder / "mk"), "--device", "cpu", "--quiet", *flags], standalone_mode=False)
        mk_rc = 0
    except SystemExit as exit_:
        mk_rc = exit_.code or 0
    except Exception:  # mergekit-moe raising is a refusal too (exit 1 from its command line)
        mk_rc = 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        zm_rc = zenith_merge(["moe", str(cfg), str(folder / "zm"), *flags, "--no-progress"])
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return mk_rc, folder / "mk", zm_rc, err.getvalue(), folder / "zm"


def _experts_by_meaning(folder: Path) -> dict[tuple, torch.Tensor]:
    """(layer, slot, proj) -> weight, slot "shared" for a shared expert, from any of the layouts both tools write."""
    out = {}
    for name, t in tensors_of(folder).items() if (folder / "model.safetensors.index.json").exists() else \
            _single(folder).items():
        parts = name.split(".")
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:  # mergekit's fused Mixtral layout
            layer = int(parts[2])
            for j in range(t.shape[0]):
                if "gate_up" in name:
                    half = t.shape[1] // 2
                    out[layer, j, "gate"], out[layer, j, "up"] = t[j, :half], t[j, half:]
                else:
                    out[layer, j, "down"] = t[j]
        elif ".experts." in name:
            layer, j, proj = int(parts[2]), int(parts[parts.index("experts") + 1]), parts[-2]
            out[layer, j, {"w1": "gate", "w3": "up", "w2": "down"}.get(proj, proj.removesuffix("_proj"))] = t
        elif ".shared_expert." in name or ".shared_experts." in name:
            out[int(parts[2]), "shared", parts[-2].removesuffix("_proj")] = t
    return out


def _single(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _generates(folder: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out = model.generate(torch.tensor([[0, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def _same_experts(mk: Path, zm: Path) -> int:
    a, b = _experts_by_meaning(mk), _experts_by_meaning(zm)
    if not any(key[1] == "shared" for key in a):  # DeepSeek without shared_experts: its shared expert is zeros
        assert not any(b.pop(key).any() for key in [key for key in b if key[1] == "shared"])
    assert a.keys() == b.keys() and a
    for key in a:
        want = a[key].float().to(b[key].dtype).float()  # out_dtype: mergekit-moe ignores it, zenith-merge writes it
        torch.testing.assert_close(b[key].float(), want, rtol=0, atol=0, msg=str(key))
    return len(a)


CASES = {
    # (mergekit-moe 0.1.5 reads a shared expert only from the base or an expert's model: its loaders hold no other)
    # the classic: Mistral donors, no architecture, hidden-state rows from prompts -> Mixtral
    "classic_mistral": lambda m: ({"base_model": str(m["mistral", 0]), "gate_mode": "hidden", "dtype": "bfloat16",
                                   "experts": _experts([m["mistral", i] for i in range(3)])}, "MixtralForCausalLM"),
    "mixtral_cheap_embed": lambda m: ({"base_model": str(m["llama", 0]), "architecture": "mixtral",
                                       "gate_mode": "cheap_embed", "experts_per_token": 1,
                                       "experts": _experts([m["llama", i] for i in range(3)])}, "MixtralForCausalLM"),
    "mixtral_random_float16": lambda m: ({"base_model": str(m["llama", 0]), "gate_mode": "random", "dtype": "float16",
                                          "experts": _experts([m["llama", i] for i in range(2)], prompts=False)},
                                         "MixtralForCausalLM"),
    "qwen_shared_residual_scale": lambda m: (
        {"base_model": str(m["qwen2", 0]), "architecture": "qwen", "gate_mode": "hidden",
         "experts": _experts([m["qwen2", i] for i in range(2)], residual_scale=0.5),
         "shared_experts": [{"source_model": str(m["qwen2", 1]), "positive_prompts": ["shared"],
                             "residual_scale": 0.25}]}, "Qwen2MoeForCausalLM"),
    "qwen_llama_donors": lambda m: ({"base_model": str(m["llama", 0]), "architecture": "qwen", "gate_mode": "random",
                                     "experts": _experts([m["llama", i] for i in range(2)], prompts=False),
                                     "shared_experts": [{"source_model": str(m["llama", 0])}]}, "Qwen2MoeForCausalLM"),
    "qwen_with_qwen3_donors": lambda m: ({"base_model": str(m["qwen3", 0]), "architecture": "qwen",
                                          "experts": _experts([m["qwen3", i] for i in range(3)])},
                                         "Qwen3MoeForCausalLM"),
    "qwen3": lambda m: ({"base_model": str(m["qwen3", 0]), "architecture": "qwen3", "gate_mode": "hidden_avg",
                         "experts": _experts([m["qwen3", i] for i in range(2)])}, "Qwen3MoeForCausalLM"),
    "deepseek_shared": lambda m: ({"base_model": str(m["llama", 0]), "architecture": "deepseek", "gate_mode": "random",
                                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False),
                                   "shared_experts": [{"source_model": str(m["llama", 1])}]}, "DeepseekV3ForCausalLM"),
    # mergekit-yaml keys users carry into mergekit-moe configs (mergekit-moe ignores them; here each means what
    # it says: the base's tokenizer or the union, which is the base's for one vocabulary; out_dtype as dtype)
    "mixtral_tokenizer_source_union": lambda m: ({"base_model": str(m["llama", 0]), "gate_mode": "random",
                                                  "tokenizer_source": "union",
                                                  "experts": _experts([m["llama", i] for i in range(2)], prompts=False)},
                                                 "MixtralForCausalLM"),
    "mixtral_tokenizer_block_out_dtype": lambda m: ({"base_model": str(m["mistral", 0]), "gate_mode": "hidden",
                                                     "tokenizer": {"source": "base"}, "out_dtype": "bfloat16",
                                                     "experts": _experts([m["mistral", i] for i in range(2)])},
                                                    "MixtralForCausalLM"),
    # DeepSeek-MoE v1 weighs a lone top-1 expert by its score (no renormalisation for k = 1)
    "deepseek_shared_top1_residual_scale": lambda m: (
        {"base_model": str(m["mistral", 0]), "architecture": "deepseek moe", "gate_mode": "random",
         "experts_per_token": 1, "experts": _experts([m["mistral", i] for i in range(3)], prompts=False),
         "shared_experts": [{"source_model": str(m["mistral", 1]), "residual_scale": 0.5}]}, "DeepseekV3ForCausalLM"),
    "deepseek_no_shared": lambda m: ({"base_model": str(m["llama", 0]), "architecture": "deepseek",
                                      "gate_mode": "hidden", "experts": _experts([m["llama", i] for i in range(2)])},
                                     "DeepseekV3ForCausalLM"),
    "deepseek_no_shared_top1": lambda m: ({"base_model": str(m["llama", 0]), "architecture": "deepseek",
                                           "gate_mode": "random", "experts_per_token": 1,
                                           "experts": _experts([m["llama", i] for i in range(2)], prompts=False)},
                                          "DeepseekV3ForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_tools_run_and_agree_on_the_experts(tmp_path, models, case):
    config, arch = CASES[case](models)
    mk_rc, mk, zm_rc, err, zm = _run(tmp_path, case, config)
    assert mk_rc == 0 and zm_rc == 0, err
    import json

    ours, theirs = (json.loads((f / "config.json").read_text()) for f in (zm, mk))
    assert ours["architectures"] == [arch]
    if "out_dtype" in config:
        assert ours["dtype"] == config["out_dtype"]
        assert {t.dtype for t in tensors_of(zm).values()} == {getattr(torch, config["out_dtype"])}
    if "tokenizer" in config or "tokenizer_source" in config:
        assert (zm / "tokenizer.json").read_bytes() == (Path(config["base_model"]) / "tokenizer.json").read_bytes()
    assert ours["num_experts_per_tok"] == theirs["num_experts_per_tok"]
    if case.startswith("deepseek"):  # v1 renormalises only for k > 1
        assert ours["norm_topk_prob"] == (theirs["norm_topk_prob"] and theirs["num_experts_per_tok"] > 1)
    _same_experts(mk, zm)
    _generates(zm)
    # mergekit's DeepSeek-MoE needs remote code from the Hub; its Qwen2-MoE from Llama sizes the zero attention
    # biases hidden / heads * heads, wrong where head_dim is set otherwise (8 x 2 = 16 here, not 32); from Mistral
    # it stops before writing (test_mergekit_moe_outputs.py runs zenith-merge's alone)
    if not case.startswith(("deepseek", "qwen_llama")):
        _generates(mk)


def test_upcycling_runs_in_both_with_noise_of_the_asked_scale(tmp_path, models):
    llama = models["llama", 0]
    config = {"base_model": str(llama), "gate_mode": "random",
              "experts": [{"source_model": str(llama), "noise_scale": 0.01} for _ in range(3)]}
    mk_rc, mk, zm_rc, err, zm = _run(tmp_path, "upcycle", config,
                                     ("--i-understand-this-is-not-useful-without-training",))
    assert mk_rc == 0 and zm_rc == 0, err
    src = tensors_of(llama)["model.layers.1.mlp.up_proj.weight"]
    for folder in (mk, zm):
        noise = [float((w - src).std()) for (layer, _, proj), w in _experts_by_meaning(folder).items()
                 if layer == 1 and proj == "up"]
        assert len(noise) == 3 and all(0.008 < n < 0.012 for n in noise), (folder.name, noise)
    _generates(zm)


REFUSALS = {
    # (config, flags, what zenith-merge's message names)
    "identical_prompts": (lambda m: {"base_model": str(m["llama", 0]), "experts": [
        {"source_model": str(m["llama", i]), "positive_prompts": ["same"]} for i in range(2)]}, (), "same positive"),
    "all_one_model": (lambda m: {"base_model": str(m["llama", 0]), "experts": [
        {"source_model": str(m["llama", 0]), "positive_prompts": [p]} for p in ("a", "b")]}, (),
        "i-understand-this-is-not-useful-without-training"),
    "mixtral_from_qwen2": (lambda m: {"base_model": str(m["qwen2", 0]), "architecture": "mixtral", "gate_mode": "random",
                                      "experts": _experts([m["qwen2", i] for i in range(2)], prompts=False)}, (),
                           "not qwen2"),
    "qwen3_moe_with_shared": (lambda m: {"base_model": str(m["qwen3", 0]), "architecture": "Qwen3 MoE",
                                         "gate_mode": "random",
                                         "experts": _experts([m["qwen3", i] for i in range(2)], prompts=False),
                                         "shared_experts": [{"source_model": str(m["qwen3", 2])}]}, (),
                              "shared_experts"),
    "too_few_experts": (lambda m: {"base_model": str(m["llama", 0]), "gate_mode": "random", "experts_per_token": 3,
                                   "experts": _experts([m["llama", i] for i in range(2)], prompts=False)}, (),
                        "experts_per_token"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_both_tools_refuse_the_same_configs(tmp_path, models, case):
    make, flags, named = REFUSALS[case]
    mk_rc, _, zm_rc, err, zm = _run(tmp_path, case, make(models), flags)
    assert mk_rc != 0 and zm_rc == 2, err
    assert named in err and not (zm / "model.safetensors.index.json").exists()


def test_every_mergekit_moe_flag_is_accepted_with_its_meaning(tmp_path, models):
    config = {"base_model": str(models["llama", 0]), "gate_mode": "random",
              "experts": _experts([models["llama", i] for i in range(2)], prompts=False)}
    flags = ("--out-shard-size", "5K", "--random-seed", "3", "--device", "cpu", "--trust-remote-code",
             "--allow-crimes", "--lazy-unpickle", "--clone-tensors", "--copy-tokenizer", "--load-in-8bit",
             "--i-understand-this-is-not-useful-without-training", "-v", "--write-model-card", "--safe-serialization")
    folder = tmp_path / "flags"
    folder.mkdir()
    cfg = folder / "config.yml"
    cfg.write_text(yaml.safe_dump(config))
    zm = subprocess.run([str(BIN / "zenith-merge"), "moe", str(cfg), str(folder / "out"), *flags, "--dry-run"],
                        capture_output=True, text=True, env=ENV)
    assert zm.returncode == 0, zm.stderr
    assert "--trust-remote-code: no effect here" in zm.stderr and zm.stderr.count("no effect here") == 7
    assert "dry run: nothing written" in zm.stdout
    from zenith_merge.config import parse_config
    from zenith_merge.config.mergekit_moe import apply_flags, parse_flags

    given, _ = parse_flags(list(flags))
    cfg = parse_config(apply_flags(config, given))
    assert cfg.seed == 3 and cfg.load_in_8bit and cfg.max_shard_size == 5000  # bytes, as mergekit's writer counts
    for refused in ("--load-in-4bit", "--no-copy-tokenizer", "--no-safe-serialization", "--not-a-flag"):
        r = subprocess.run([str(BIN / "zenith-merge"), "moe", str(cfg_path := folder / "config.yml"),
                            str(folder / "x"), refused], capture_output=True, text=True, env=ENV)
        assert r.returncode == 2 and refused in r.stderr and "Traceback" not in r.stderr, (cfg_path, r.stderr)


def test_random_seed_seeds_the_random_router_rows_of_a_real_merge(tmp_path, models):
    """`--random-seed` in a real merge: gate_mode random rows are the same bytes for one seed and differ for
    another (mergekit seeds torch the same way; its own draws are another generator's)."""
    config = {"base_model": str(models["llama", 0]), "gate_mode": "random",
              "experts": _experts([models["llama", i] for i in range(2)], prompts=False)}
    rows = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _, _, zm_rc, err, zm = _run(tmp_path, name, config, ("--random-seed", seed))
        assert zm_rc == 0, err
        rows[name] = {n: t for n, t in tensors_of(zm).items() if n.endswith("gate.weight")}
    assert rows["a"] and all(torch.equal(rows["a"][n], rows["b"][n]) for n in rows["a"])
    assert all(not torch.equal(rows["a"][n], rows["c"][n]) for n in rows["a"])


def _shard_bytes(folder: Path) -> list[int]:
    """Each shard's tensor bytes (numel x element size, as mergekit's writer counts them), largest first."""
    import math

    from safetensors import safe_open

    width = {"BF16": 2, "F16": 2, "F32": 4}
    sizes = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            slices = [f.get_slice(k) for k in f.keys()]
            sizes.append(sum(math.prod(s.get_shape()) * width[s.get_dtype()] for s in slices))
    return sorted(sizes, reverse=True)


def test_out_shard_size_is_the_bytes_of_tensors_per_shard_as_mergekit_writes_them(tmp_path, models):
    """mergekit's help calls --out-shard-size a number of parameters; its writer compares tensor bytes with it.
    With 20K, both tools write shards of at most 20,000 bytes of tensors (a tensor alone in its shard may be
    larger), so about the same number of them."""
    config = {"base_model": str(models["llama", 0]), "gate_mode": "random", "dtype": "bfloat16",
              "experts": _experts([models["llama", i] for i in range(2)], prompts=False)}
    mk_rc, mk, zm_rc, err, zm = _run(tmp_path, "shards", config, ("--out-shard-size", "20K"))
    assert mk_rc == 0 and zm_rc == 0, err
    ours, theirs = _shard_bytes(zm), _shard_bytes(mk)
    largest = max(t.numel() * t.element_size() for t in tensors_of(zm).values())
    assert all(b <= max(20_000, largest) for b in ours + theirs), (ours, theirs)
    assert sum(ours) == sum(theirs) and len(ours) > 1 and abs(len(ours) - len(theirs)) <= len(theirs) // 2


def test_every_key_of_mergekit_moes_schema_is_honoured_or_refused(tmp_path, models):
    """Each key mergekit-moe's pydantic schema knows (experts' and shared experts' keys included), set to a
    non-default value, changes what the plan computes (its tensors, transforms, target config; not only the
    config it carries) or, where the plan leaves the key to a stage (gate_mode), the written tensors; or it is
    refused naming the key: none is dropped."""
    from mergekit.moe.config import Expert, MoEMergeConfig

    from zenith_merge.config import load_config, parse_config
    from zenith_merge.errors import ZenithError
    from zenith_merge.pipeline import run_merge
    from zenith_merge.plan.build import build_plan

    llama = [models["llama", i] for i in range(3)]
    base = {"base_model": str(llama[0]), "gate_mode": "hidden", "experts": _experts(llama[:2]),
            "architecture": "qwen", "shared_experts": [{"source_model": str(llama[2]), "positive_prompts": ["s"]}]}
    first, second = _experts(llama[:2])
    shared = base["shared_experts"][0]
    variations = {
        "base_model": {"base_model": str(llama[1])},
        "experts": {"experts": _experts(llama)},
        "gate_mode": {"gate_mode": "cheap_embed"},
        "dtype": {"dtype": "float16"},
        "experts_per_token": {"experts_per_token": 1},
        "shared_experts": {"shared_experts": [{**shared, "source_model": str(llama[1])}]},
        "architecture": {"architecture": "qwen3"},
        **{f"experts.{key}": {"experts": [{**first, key: value}, second]} for key, value in (
            ("source_model", str(llama[2])), ("positive_prompts", ["other"]), ("negative_prompts", ["no"]),
            ("noise_scale", 0.1), ("residual_scale", 0.5))},
        **{f"shared_experts.{key}": {"shared_experts": [{**shared, key: value}]} for key, value in (
            ("source_model", str(llama[0])), ("positive_prompts", ["other"]), ("negative_prompts", ["no"]),
            ("noise_scale", 0.1), ("residual_scale", 0.5))},
    }
    known = (set(MoEMergeConfig.model_fields) | {f"experts.{k}" for k in Expert.model_fields}
             | {f"shared_experts.{k}" for k in Expert.model_fields})
    assert known == set(variations), known ^ set(variations)

    def computed(plan) -> dict:
        return {k: v for k, v in plan.model_dump().items() if k not in ("config", "plan_id", "output_dir")}

    def written(name: str, data: dict) -> dict[str, torch.Tensor]:
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path / name), "routing_report": False}))
        return tensors_of(run_merge(load_config(cfg), config_dir=tmp_path, progress=False).output_dir)

    plain = computed(build_plan(parse_config(base), config_dir=tmp_path))
    plain_tensors: dict[str, torch.Tensor] = {}
    for key, change in variations.items():
        try:
            plan = build_plan(parse_config({**base, **change}), config_dir=tmp_path)
        except ZenithError as err:
            assert key.split(".")[0] in str(err) or key.split(".")[-1] in str(err), (key, err)
            continue
        if computed(plan) != plain:
            continue
        plain_tensors = plain_tensors or written("plain", base)
        ours = written(key, {**base, **change})
        assert any(not torch.equal(ours[n], plain_tensors[n]) for n in plain_tensors), f"{key}: no effect"


def _router_rows(folder: Path) -> dict[int, torch.Tensor]:
    rows = {}
    for name, t in _single(folder).items():
        if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
            rows[int(name.split(".")[2])] = t
    return rows


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_gate_source_residual_gives_mergekits_router_rows_bit_for_bit(tmp_path, models, gate_mode):
    """mergekit-moe reads prompt states from the residual stream before each layer, in bfloat16, prompts batched
    with left padding; gate_source: residual computes them the same way, so the router rows are the same bytes
    (prompts of different lengths, so padding counts; negative prompts subtracted); the default (the MoE block's
    own normalised input) gives other rows by design."""
    experts = _experts([models["llama", i] for i in range(3)])
    experts[0]["positive_prompts"] = ["def add(a, b):\n    return a + b", "x = 1", "for i in range(10):\n    pass"]
    experts[1]["negative_prompts"] = ["print('hello')", "import os"]
    config = {"base_model": str(models["llama", 0]), "gate_mode": gate_mode, "experts": experts}
    _, mk, _, _, zm_default = _run(tmp_path, "default", config)
    _, _, zm_rc, err, zm = _run(tmp_path, "residual", {**config, "gate_source": "residual"})
    assert zm_rc == 0, err
    want, got, default = _router_rows(mk), _router_rows(zm), _router_rows(zm_default)
    assert want.keys() == got.keys() and want
    for layer in want:
        assert got[layer].dtype == want[layer].dtype and torch.equal(got[layer], want[layer]), layer
        off = torch.nn.functional.cosine_similarity(default[layer].float(), want[layer].float(), dim=-1)
        assert float(off.min()) < 0.99, (layer, off)


@pytest.mark.parametrize("name", ["deepseek", "deepseek moe", "DeepSeek MoE", "deepseek_v3", "DeepseekV3ForCausalLM"])
def test_a_deepseek_v3_base_keeps_its_architecture_under_mergekits_deepseek_names(tiny_deepseek, tmp_path, name):
    """`architecture: deepseek` means DeepSeek-MoE from dense donors; with a DeepSeek-V3 base it keeps the base's
    architecture, as it did before mergekit-moe's names were read. Another family's name is refused by name."""
    from zenith_merge.config import parse_config
    from zenith_merge.errors import PlanError
    from zenith_merge.plan.build import build_plan

    data = {"base_model": str(tiny_deepseek), "gate_mode": "random", "output_dir": str(tmp_path / "out"),
            "experts": [{"source_model": str(tiny_deepseek)}]}
    plan = build_plan(parse_config({**data, "architecture": name}), config_dir=tmp_path)
    assert plan.target_config["architectures"] == ["DeepseekV3ForCausalLM"]
    with pytest.raises(PlanError, match="architecture: mixtral differs from the base's DeepseekV3ForCausalLM"):
        build_plan(parse_config({**data, "architecture": "mixtral"}), config_dir=tmp_path)
