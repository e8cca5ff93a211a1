"""`zenith-merge search`: assembly weights per tensor class, or a merge method's parameters, chosen on
calibration text.

Two same-family parents (a base good at one domain, a child better at another) are
interpolated tensor by tensor, W = (1 - lambda_c) W_first + lambda_c W_second, with one
lambda per tensor class c. Each candidate is planned like any merge, its tensors produced
in memory by the merge's own code (so it scores exactly what `merge` would write), and
scored in bits per byte on two texts:

    loss = keep_bpb / keep_bpb(first) - 1                      (must stay <= max_loss)
    gap  = (gain_bpb(first) - gain_bpb) / (gain_bpb(first) - gain_bpb(second))

The search is a uniform sweep (every class at one lambda: the frontier plain averaging
traces), then a small evolutionary refinement of per-class lambdas (uniform crossover of the
best candidates, Gaussian mutation), seeded. The best candidate closes the most of the gap
among those within `max_loss`; with none within it, the one that loses least.

For a merge method (ties, dare_ties, slerp, ...: `search.parameters`), a candidate is one value per searched
top-level parameter, and every combination is scored; its "first" and "second" are experts[0] and
experts[1] themselves, copied bit for bit (linear with a one-hot weight).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .architectures import architecture_of, classify
from .config import MergeConfig, SearchSettings
from .errors import ConfigError, PlanError

LAMBDA_DECIMALS = 2  # candidates are rounded so that configs stay readable and repeats are caught


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a lambda per searched class, and where it came from."""

    lambdas: tuple[tuple[str, float], ...]
    origin: str

    def apply(self, cfg: MergeConfig) -> MergeConfig:
        """A method config with this candidate's values: `name` sets a top-level parameter, `models.<i>.<name>`
        (`experts.<i>.<name>`) one model's own."""
        top, experts = dict(cfg.parameters), list(cfg.experts)
        for key, value in self.lambdas:
            index, name = model_parameter(key)
            if index is None:
                top[name] = value
            else:
                experts[index] = experts[index].model_copy(
                    update={"parameters": {**experts[index].parameters, name: value}})
        return cfg.model_copy(update={"parameters": top, "experts": experts})

    def write_into(self, data: dict) -> None:
        """Set this candidate's values in raw config `data` (a zenith or mergekit-yaml mapping)."""
        for key, value in self.lambdas:
            index, name = model_parameter(key)
            if index is None:
                data.setdefault("parameters", {})[name] = value
            else:
                entries = data.get("models") if data.get("models") is not None else data["experts"]
                entries[index].setdefault("parameters", {})[name] = value


    def weights(self, given: dict[str, list[float]]) -> dict[str, list[float]]:
        """The `assembly.weights` this candidate stands for: the `given` ones, each searched class overridden."""
        out = {k: list(v) for k, v in given.items()}
        out.update({c: [round(1.0 - lam, LAMBDA_DECIMALS + 2), lam] for c, lam in self.lambdas})
        return out


def model_parameter(key: str) -> tuple[int | None, str]:
    """`search.parameters` key -> (the model's index, or None for a top-level parameter; the parameter)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] in ("models", "experts") and parts[1].isdigit():
        return int(parts[1]), parts[2]
    if len(parts) != 1:
        raise ConfigError(f"search.parameters.{key}: a parameter name (a top-level parameter) or "
                          f"models.<i>.<name> (model i's own)")
    return None, key


@dataclass(frozen=True)
class Score:
    """A candidate's bits per byte on both texts, and what they mean against the parents."""

    candidate: Candidate
    keep_bpb: float
    gain_bpb: float
    loss: float
    gap: float
    feasible: bool

    def rank(self) -> tuple:
        """Sort key, best first: within `max_loss` before outside it; then most gap closed, or least loss."""
        return (0, -self.gap, self.loss) if self.feasible else (1, self.loss, -self.gap)


@dataclass
class SearchResult:
    """Every scored candidate (parents first), the settings, and the best one."""

    settings: SearchSettings
    given: dict[str, list[float]]  # the config's assembly.weights (classes not searched keep theirs)
    classes: tuple[str, ...]
    first: tuple[float, float]  # (keep, gain) bits per byte of the first parent
    second: tuple[float, float]
    scores: list[Score] = field(default_factory=list)
    kind: str = "assembly"  # or "method": a merge method's parameters (`classes` then names them)

    @property
    def best(self) -> Score:
        """The winning candidate (see the module docstring)."""
        return min(self.scores, key=Score.rank)

    def sweep(self) -> list[Score]:
        """The uniform sweep's scores, by lambda."""
        return sorted((s for s in self.scores if s.candidate.origin == "sweep"),
                      key=lambda s: s.candidate.lambdas[0][1])


def check_searchable(cfg: MergeConfig) -> SearchSettings:
    """The config's search settings, or an error naming the key that makes a search impossible."""
    from .config.mergekit_yaml import MERGEKIT_METHODS

    settings = cfg.search or SearchSettings()
    method = cfg.merge_method in MERGEKIT_METHODS
    if not method and cfg.merge_method != "assembly":
        raise ConfigError(f"merge_method: search looks for assembly weights or a merge method's parameters; this "
                          f"config is {cfg.merge_method!r} (use merge_method: assembly with assembly.weights, or a "
                          f"method such as ties with search.parameters)")
    for key in settings.parameters:
        index, _ = model_parameter(key)
        if index is not None and index >= len(cfg.experts):
            raise ConfigError(f"search.parameters.{key}: there are {len(cfg.experts)} models")
    if method and not settings.parameters:
        raise ConfigError(f"search.parameters: give the {cfg.merge_method} parameters to search and their values, "
                          f"e.g. {{density: [0.3, 0.5, 0.7], weight: [0.5, 1.0]}}")
    if not method and settings.parameters:
        raise ConfigError("search.parameters: searches a merge method's parameters; assembly searches "
                          "assembly.weights per class (search.classes, search.grid)")
    if len(cfg.experts) < 2 or (not method and len(cfg.experts) != 2):
        raise ConfigError(f"experts: search interpolates two parents (lambda per class between experts[0] and "
                          f"experts[1]); this config has {len(cfg.experts)}" if not method else
                          "experts: a method search compares the merge with experts[0] and experts[1]; give both")
    for key in ("keep", "gain"):
        if not getattr(settings, key):
            raise ConfigError(f"search.{key}: give text to score candidates on (files, or demo:code / demo:maths), "
                              f"e.g. search: {{keep: [demo:code], gain: [demo:maths]}}; never the evaluation text")
    return settings


def parameter_grid(settings: SearchSettings) -> list[Candidate]:
    """Every combination of the searched parameters' values (a merge method's search)."""
    import itertools

    names = sorted(settings.parameters)
    return [Candidate(tuple(zip(names, values)), "grid")
            for values in itertools.product(*(settings.parameters[n] for n in names))]


def one_parent(cfg: MergeConfig, index: int) -> MergeConfig:
    """A method config that copies experts[index] bit for bit (linear, one-hot weight): a parent's score."""
    experts = [e.model_copy(update={"parameters": {"weight": float(i == index)}}) for i, e in enumerate(cfg.experts)]
    return cfg.model_copy(update={"merge_method": "linear", "method_base": False, "parameters": {},
                                  "experts": experts, "merge_dtype": None})


def searched_classes(cfg: MergeConfig, base_path: Path, names: Sequence[str]) -> tuple[str, ...]:
    """`search.classes`, or every tensor class the base's tensors fall in, in a fixed order."""
    import json

    from .config import TENSOR_CLASSES

    if cfg.search is not None and cfg.search.classes:
        return tuple(cfg.search.classes)
    arch = architecture_of(json.loads((base_path / "config.json").read_text()), where=str(base_path))
    present = {tid.tensor_class for n in names if (tid := classify(arch, n)) is not None}
    return tuple(c for c in TENSOR_CLASSES if c in present)


def uniform(classes: Sequence[str], lam: float, origin: str) -> Candidate:
    """Every searched class at `lam`."""
    return Candidate(tuple((c, float(lam)) for c in classes), origin)


def breed(parents: Sequence[Candidate], rng: random.Random, sigma: float, origin: str) -> Candidate:
    """A child of two parents: each class's lambda from either parent, plus N(0, sigma), kept in [0, 1]."""
    a, b = rng.choice(parents), rng.choice(parents)
    lambdas = []
    for (c, la), (_, lb) in zip(a.lambdas, b.lambdas):
        lam = (la if rng.random() < 0.5 else lb) + rng.gauss(0.0, sigma)
        lambdas.append((c, round(min(1.0, max(0.0, lam)), LAMBDA_DECIMALS)))
    return Candidate(tuple(lambdas), origin)


class CandidateScorer:
    """Plans a candidate, produces its tensors in memory with the merge's own code, and scores it."""

    def __init__(self, cfg: MergeConfig, config_dir: Path | None, settings: SearchSettings,
                 work_dir: Path | None = None):
        from transformers import AutoTokenizer

        from .pipeline import read_texts
        from .plan.build import build_plan

        self.cfg, self.config_dir, self.work_dir = cfg, config_dir, work_dir
        plan = build_plan(cfg, config_dir=config_dir, output_dir=work_dir)
        st = plan.stages
        if plan.vocab is not None or st.align or st.prompt_vectors or st.router_offsets or not plan.resolved:
            raise PlanError("search scores assembly merges without stages other than RegMean's statistics (no union "
                            "tokenizer or computed router rows); drop tokenizer.source: union for the search")
        if st.regmean and work_dir is None:
            raise PlanError("search: assembly.regmean needs a folder for its statistics (the search's --out)")
        if cfg.assembly is not None and cfg.assembly.regmean is not None and work_dir is not None:
            # statistics for every weight any candidate can mix (all parents at equal weight), computed once
            from .pipeline import run_stages

            share = [1.0] * len(cfg.experts)
            mixed = cfg.model_copy(update={"assembly": cfg.assembly.model_copy(update={"weights": {"default": share}})})
            run_stages(build_plan(mixed, config_dir=config_dir, output_dir=work_dir), mixed, config_dir=config_dir,
                       progress=False)
        need = 3 * 4 * sum(_numel(t.shape) for t in plan.tensors)  # float32: the parents' reads, tensors, model
        from .system import physical_memory

        ram = physical_memory()
        if ram is not None and need > ram // 2:
            raise PlanError(f"search assembles every candidate in memory; this model needs about {need / 2**30:.1f} "
                            f"GiB, more than half of this machine's {ram / 2**30:.1f} GiB. Search on a smaller "
                            f"relative of the model, or set assembly.weights by hand")
        self.names = [t.name for t in plan.tensors]
        self.base_path = Path(plan.sources["base"].path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.hf_config = _hf_config(plan.target_config)
        self.texts = {key: "\n".join(read_texts(getattr(settings, key), f"search.{key}", config_dir))
                      [:settings.max_chars] for key in ("keep", "gain")}

    def __call__(self, weights: dict[str, list[float]]) -> tuple[float, float]:
        """(keep, gain) bits per byte of the assembly with these `assembly.weights`."""
        return self.score(self.cfg.model_copy(update={"assembly": self.cfg.assembly.model_copy(
            update={"weights": weights})}))

    def score(self, cfg: MergeConfig) -> tuple[float, float]:
        """(keep, gain) bits per byte of the merge `cfg` describes (the search's config, changed)."""
        from .demo import bits_per_byte
        from .pipeline import PlanTensorSource
        from .plan.build import build_plan

        plan = build_plan(cfg, config_dir=self.config_dir, output_dir=self.work_dir)
        if plan.stages.regmean:  # the statistics computed at the start serve every candidate
            from .pipeline import run_stages

            plan = run_stages(plan, cfg, config_dir=self.config_dir, progress=False)
        source = PlanTensorSource(plan)
        try:
            tensors = {t.name: source.tensor(t.spec).float() for t in plan.tensors}
        finally:
            source.close()
        model = _model_from_tensors(self.hf_config, tensors)
        del tensors
        return tuple(bits_per_byte(model, self.tokenizer, self.texts[k]) for k in ("keep", "gain"))


def run_search(cfg: MergeConfig, *, config_dir: Path | None = None, progress: bool = True,
               work_dir: Path | None = None) -> SearchResult:
    """Sweep, then refine, per-class lambdas for the config's two parents; every candidate scored.

    `work_dir` holds what stays the same between candidates (RegMean's statistics, in its `.zenith/`)."""
    settings = check_searchable(cfg)
    method = bool(settings.parameters)
    if method:  # planned once up front: with the grid's first point, the searched parameters are all set
        cfg = parameter_grid(settings)[0].apply(cfg)
    score_fn = CandidateScorer(cfg, config_dir, settings, work_dir)
    classes = tuple(sorted(settings.parameters)) if method else searched_classes(cfg, score_fn.base_path, score_fn.names)
    if not classes:
        raise ConfigError("search.classes: no tensor class to search")
    if method:
        first, second = (score_fn.score(one_parent(cfg, i)) for i in (0, 1))
    else:
        first = score_fn({"default": [1.0, 0.0]})
        second = score_fn({"default": [0.0, 1.0]})
    if not first[1] > second[1]:
        raise ConfigError(f"search.gain: experts[1] is not better than experts[0] on this text ({second[1]:.4f} vs "
                          f"{first[1]:.4f} bits per byte), so there is no gap to close; check the text and the order "
                          f"of experts[]")
    given = dict(cfg.parameters) if method else dict(cfg.assembly.weights)
    result = SearchResult(settings=settings, given=given, classes=classes, first=first, second=second,
                          kind="method" if method else "assembly")
    seen: set[tuple] = set()
    grid = parameter_grid(settings) if method else []
    bar = tqdm(total=len(grid) if method else len(settings.grid) + settings.generations * settings.population,
               desc="search", disable=not progress, leave=False)

    def evaluate(cand: Candidate) -> None:
        seen.add(cand.lambdas)
        keep, gain = score_fn.score(cand.apply(cfg)) if method else score_fn(cand.weights(result.given))
        loss = keep / first[0] - 1.0
        gap = (first[1] - gain) / (first[1] - second[1])
        result.scores.append(Score(cand, keep, gain, loss, gap, loss <= settings.max_loss))
        best = result.best
        bar.set_postfix_str(f"best gap {100 * best.gap:.1f}% at {100 * best.loss:+.2f}%")
        bar.update()

    try:
        for cand in grid:
            evaluate(cand)
        for lam in [] if method else sorted(set(settings.grid)):
            evaluate(uniform(classes, lam, "sweep"))
        rng = random.Random(cfg.seed)
        for gen in range(1, 0 if method else settings.generations + 1):
            parents = [s.candidate for s in sorted(result.scores, key=Score.rank)[:settings.population]]
            for _ in range(settings.population):
                for _attempt in range(20):
                    child = breed(parents, rng, settings.sigma, f"generation {gen}")
                    if child.lambdas not in seen:
                        break
                else:
                    bar.update()
                    continue
                evaluate(child)
    finally:
        bar.close()
    return result


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _hf_config(target: dict):
    """A transformers config object for the output's config.json contents."""
    from transformers import AutoConfig

    data = dict(target)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _model_from_tensors(hf_config, tensors: dict[str, torch.Tensor]):
    """A float32 transformers model from checkpoint-named tensors (transformers renames them as on loading)."""
    from transformers import logging as hf_logging
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(None, config=hf_config, state_dict=tensors, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


SEARCH_FILES = {"json": "search.json", "md": "search.md", "png": "search.png", "config": "best.yml"}


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def search_table(result: SearchResult, top: int = 10) -> str:
    """Markdown: the parents, the chosen candidate, the uniform sweep and the best refined candidates."""
    s = result.settings
    best = result.best
    lines = [f"Scored on `keep` = {', '.join(s.keep)} and `gain` = {', '.join(s.gain)} (first {s.max_chars} "
             f"characters each); allowed loss on `keep` {100 * s.max_loss:g}%.",
             "",
             f"- experts[0]: keep {result.first[0]:.4f}, gain {result.first[1]:.4f} bits per byte",
             f"- experts[1]: keep {result.second[0]:.4f}, gain {result.second[1]:.4f} bits per byte",
             f"- chosen ({best.candidate.origin}): keep {best.keep_bpb:.4f} ({_pct(best.loss)}), gain "
             f"{best.gain_bpb:.4f}, gap closed {100 * best.gap:.1f}%"
             + ("" if best.feasible else f" - NO candidate stayed within {100 * s.max_loss:g}%; this one loses least"),
             "",
             "| parameter | value |" if result.kind == "method" else "| class | lambda (share of experts[1]) |",
             "| --- | ---: |"]
    lines += [f"| {c} | {lam:g} |" for c, lam in best.candidate.lambdas]
    if result.kind == "method":
        ranked = sorted(result.scores, key=Score.rank)
        lines += ["", f"Every candidate, best first ({', '.join(result.classes)}):", "",
                  "| values | keep bpb | gain bpb | keep vs experts[0] | gap closed | within |",
                  "| --- | ---: | ---: | ---: | ---: | :---: |"]
        lines += [f"| {' '.join(f'{v:g}' for _, v in x.candidate.lambdas)} | {x.keep_bpb:.4f} | {x.gain_bpb:.4f} | "
                  f"{_pct(x.loss)} | {100 * x.gap:.1f}% | {'yes' if x.feasible else 'no'} |" for x in ranked]
        return "\n".join(lines)
    lines += ["", "Uniform sweep (every searched class at one lambda):", "",
              "| lambda | keep bpb | gain bpb | keep vs experts[0] | gap closed | within |",
              "| ---: | ---: | ---: | ---: | ---: | :---: |"]
    lines += [f"| {sc.candidate.lambdas[0][1]:g} | {sc.keep_bpb:.4f} | {sc.gain_bpb:.4f} | {_pct(sc.loss)} | "
              f"{100 * sc.gap:.1f}% | {'yes' if sc.feasible else 'no'} |" for sc in result.sweep()]
    refined = sorted((x for x in result.scores if x.candidate.origin != "sweep"), key=Score.rank)[:top]
    if refined:
        lines += ["", f"Refinement: the best {len(refined)} of {sum(x.candidate.origin != 'sweep' for x in result.scores)} "
                      f"per-class candidates (lambdas in the order {', '.join(result.classes)}):", "",
                  "| origin | lambdas | keep vs experts[0] | gap closed |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {x.candidate.origin} | {' '.join(f'{lam:g}' for _, lam in x.candidate.lambdas)} | "
                  f"{_pct(x.loss)} | {100 * x.gap:.1f}% |" for x in refined]
    return "\n".join(lines)


def write_search(result: SearchResult, cfg_data: dict, config_path: Path, out_dir: Path) -> dict[str, Path]:
    """search.json (every candidate), search.md (tables + plot), search.png, and best.yml: the config
    with the chosen `assembly.weights` (paths made absolute so it runs from anywhere). Files are
    written whole under temporary names, then renamed."""
    import yaml

    from .checks.plots import lambda_sweep_plot
    from .config import with_absolute_paths
    from .io.manifest import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / v for k, v in SEARCH_FILES.items()}
    best = result.best
    write_json_atomic(paths["json"], {
        "config": str(config_path), "settings": result.settings.model_dump(), "classes": list(result.classes),
        "first": {"keep": result.first[0], "gain": result.first[1]},
        "second": {"keep": result.second[0], "gain": result.second[1]},
        "best": _score_json(best),
        "candidates": [_score_json(x) for x in result.scores]})
    sweep = [(x.candidate.lambdas[0][1], 100 * x.loss, 100 * x.gap) for x in result.sweep()]
    refined = [(100 * x.loss, 100 * x.gap) for x in result.scores if x.candidate.origin != "sweep"]
    lambda_sweep_plot(paths["png"], sweep=sweep, refined=refined, best=(100 * best.loss, 100 * best.gap),
                      max_loss=100 * result.settings.max_loss)
    md = f"# Assembly weight search: {config_path.name}\n\n{search_table(result)}\n\n![lambda sweep]({SEARCH_FILES['png']})\n"
    write_text_atomic(paths["md"], md)
    data = with_absolute_paths(cfg_data, config_path.parent)
    if result.kind == "method":
        best.candidate.write_into(data)
    else:
        data.setdefault("assembly", {})["weights"] = best.candidate.weights(result.given)
    header = (f"# {config_path.name} with the {'parameters' if result.kind == 'method' else 'weights'} "
              f"`zenith-merge search` chose: keep {_pct(best.loss)}, "
              f"gap closed {100 * best.gap:.1f}%\n# on the search text (not held-out text). Paths are absolute.\n")
    write_text_atomic(paths["config"], header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return paths


def _score_json(x: Score) -> dict:
    return {"origin": x.candidate.origin, "lambdas": dict(x.candidate.lambdas), "keep_bpb": x.keep_bpb,
            "gain_bpb": x.gain_bpb, "loss": x.loss, "gap": x.gap, "within_max_loss": x.feasible}

