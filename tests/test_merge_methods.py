"""mergekit-yaml's merge methods (zenith_merge.maths.methods): bitwise equal to mergekit 0.1.5's own, called as
mergekit-yaml calls them (its ExecuteMergeMethodTask: one TensorGroup, resolved parameters, _execute_resolved)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit import merge_methods as mk
from mergekit.merge_methods.base import BasePolicy, ParameterScope, PerInputValues, TensorEntry, TensorGroup
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify
from pydantic import TypeAdapter, ValidationError

from zenith_merge.maths.methods import METHODS, Parameter, merge, validate
from zenith_merge.maths.task_arithmetic import (
    della_drop,
    magnitude_outliers_prune,
    magnitude_prune,
    random_drop,
)

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]
TASK = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", *RANDOM]


def mergekit_merge(name, tensors, base, inputs, shared):
    """mergekit's own result, bound as its task adapter binds it (defaults from mergekit's ParameterSpecs)."""
    method = mk.get(name)
    entries = tuple(TensorEntry(id=i, tensor=t, is_base=i == base) for i, t in enumerate(tensors))
    group = TensorGroup(entries=entries)
    method.validate_inputs([e.id for e in entries], base)
    params = {p.name: p.validate(shared.get(p.name, p.default)) for p in method.spec.shared_parameters}
    for p in method.spec.input_parameters:
        chosen = entries if p.scope == ParameterScope.INPUT else group.non_base
        params[p.name] = PerInputValues([(e.id, p.validate(inputs[e.id].get(p.name, p.default))) for e in chosen])
    (out,) = method._execute_resolved((group,), [params])
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floats(lo: float, hi: float):
    """Hypothesis' simple floats (0.5, 1, ...) and as many that no low-precision dtype holds exactly."""
    return st.floats(lo, hi) | st.integers(0, 2**40).map(lambda k: lo + (hi - lo) * k / 2**40)


@st.composite
def cases(draw, name):
    """A method's inputs as the lead's planner passes them: tensors, base index, per-input and shared values."""
    spec = METHODS[name]
    dims = draw(st.sampled_from([1, 1, 2, 2, 2, 3, 3, 0]))  # 0: a 0-d tensor (a scalar weight)
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=dims, max_size=dims)))
    if dims and draw(st.integers(0, 14)) == 0:
        shape = tuple(draw(st.permutations((0, *shape[1:]))))  # empty
    dtype = draw(st.sampled_from(DTYPES))
    lo = max(spec.min_inputs, spec.min_non_base + (spec.base == "required"), 2 if name != "passthrough" else 1)
    hi = min(spec.max_inputs or 4, (spec.max_non_base + 1) if spec.max_non_base else 4)
    n = draw(st.integers(lo, hi))
    base = None
    if spec.base == "required" or (spec.base == "optional" and n > spec.min_non_base):
        base = draw(st.integers(0, n - 1))
    elif name == "linear":  # a configured base is one more input to linear (mergekit's BasePolicy.IGNORED)
        base = draw(st.none() | st.integers(0, n - 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = [10 ** draw(st.floats(-3, 1)) for _ in range(n)]
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) * s for s in scale]
    for i in range(n):  # special inputs: zero, tiny, equal to / a multiple of / near the first (small deltas)
        kind = draw(st.sampled_from(["random"] * 4 + ["zero", "tiny", "copy", "parallel", "nearby"]))
        if kind == "zero":
            tensors[i] = torch.zeros(shape, dtype=torch.float64)
        elif kind == "tiny":
            tensors[i] = tensors[i] * 1e-7
        elif kind == "copy":
            tensors[i] = tensors[0].clone()
        elif kind == "parallel":
            tensors[i] = tensors[0] * draw(st.floats(-2, 2))
        elif kind == "nearby":  # cosines from 1 - 1e-9 to ~0.9: both sides of slerp's 0.9995 threshold
            tensors[i] = tensors[0] + tensors[i] * 10 ** draw(st.floats(-4.5, -0.5)) / scale[i] * scale[0]
    tensors = [t.to(dtype) for t in tensors]

    def value(p: Parameter):
        if p.kind == "bool":
            return draw(st.booleans())
        if p.name in ("weight", "scale"):
            return draw(st.sampled_from([1.0, 0.0, -0.5]) | floats(-1, 2))
        if p.name == "density":
            return draw(st.sampled_from([1.0, 0.0, 1.2]) | floats(0.02, 0.98))
        if p.name == "gamma":
            return draw(floats(0, 0.4))
        if p.name == "epsilon":
            return draw(floats(0.0, 0.2))
        if p.name == "lambda":
            return draw(st.sampled_from([1.0]) | floats(0.25, 2))
        if p.name == "t":
            return draw(floats(-0.5, 1.5))
        raise AssertionError(p.name)

    def given_values(scopes):
        chosen = {}
        for p in spec.parameters:
            if p.scope in scopes and (p.required or draw(st.booleans())):  # the rest take their defaults
                chosen[p.name] = value(p)
        return chosen

    if name == "passthrough" and draw(st.booleans()):
        inputs = [{"scale": None}]
    else:
        inputs = [given_values(("input",) if i == base else ("input", "non_base")) for i in range(n)]
    return tensors, base, inputs, given_values(("shared",))


def check_against_mergekit(name, case, seed=None):
    tensors, base, inputs, shared = case
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            expected = mergekit_merge(name, tensors, base, inputs, shared)
        except (RuntimeError, IndexError, ValueError) as error:  # della's shape and epsilon limits, DARE's density
            with pytest.raises(ValueError):
                merge(name, tensors, base, inputs, shared, torch.Generator().manual_seed(seed or 0))
            return str(error)
    ours = merge(name, tensors, base, inputs, shared, None if seed is None else torch.Generator().manual_seed(seed))
    assert same_bits(ours, expected), f"{name}: max |difference| {max_diff(ours, expected)}"
    return None


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
                                  "nuslerp", "model_stock", "passthrough"])
def test_deterministic_methods_equal_mergekit_bit_for_bit(name):
    @SETTINGS
    @given(case=cases(name))
    def check(case):
        assert check_against_mergekit(name, case) is None

    check()


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_equal_mergekit_with_the_same_seed(name):
    @SETTINGS
    @given(case=cases(name), seed=st.integers(0, 2**31))
    def check(case, seed):
        check_against_mergekit(name, case, seed)

    check()


def test_slerp_chunking_over_a_million_elements_equals_mergekit():
    """mergekit slerps in chunks of 2^20 elements; the norms and the dot are rounded chunk by chunk."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3 * 1024 * 1024 + 5, generator=g)
    b = a + 0.05 * torch.randn(a.shape, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        a_, b_ = a.to(dtype), b.to(dtype)
        assert same_bits(merge("slerp", [b_, a_], 1, [{}, {}], {"t": 0.3}),
                         mergekit_merge("slerp", [b_, a_], 1, [{}, {}], {"t": 0.3}))


def _deltas():
    g = torch.Generator().manual_seed(8)
    yield torch.randn(7, 9, generator=g) * 1e-9  # L1 norm below the rescale threshold
    yield torch.randn(5, 40, generator=g) * 3e-10
    yield torch.zeros(4, 6)
    yield torch.randint(-2, 3, (6, 6), generator=g).float()  # many ties in |delta|
    yield torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    yield torch.randn(9, generator=g).to(torch.float16)
    yield torch.randn(3, 5, generator=g).double()
    yield torch.tensor(1.5)
    yield torch.randn(1, generator=g)
    yield torch.randn(4, 1, generator=g)
    for shape in ((0,), (0, 0), (2, 0), (0, 1), (1, 1, 0), (3, 0, 2), (0, 1, 3)):
        yield torch.zeros(shape)


def test_sparsifiers_equal_mergekits_on_edge_cases():
    """Tiny, zero, tied, 0-d, 1-element, (n, 1) and empty deltas; densities outside [0, 1]; gamma > 1;
    epsilon out of range. Where mergekit fails (della on a short dim 1, DARE with a negative density),
    ours raises ValueError."""
    l1 = RescaleNorm.l1
    for delta in _deltas():
        for density in (-0.1, 0.0, 0.01, 0.3, 0.5, 0.99, 1.0, 1.5):
            for rescale in (False, True):
                norm = l1 if rescale else None
                assert same_bits(magnitude_prune(delta, density, rescale),
                                 sparsify(delta, density, SparsificationMethod.magnitude, rescale_norm=norm))
                for gamma in (0.0, 0.1, 0.9, 2.0):
                    assert same_bits(magnitude_outliers_prune(delta, density, gamma, rescale),
                                     sparsify(delta, density, SparsificationMethod.magnitude_outliers, gamma=gamma,
                                              rescale_norm=norm))
                for epsilon in (None, 0.005, 0.2):  # None: DARE
                    method = SparsificationMethod.della_magprune if epsilon else SparsificationMethod.random
                    with torch.random.fork_rng():
                        torch.manual_seed(9)
                        try:
                            expected = sparsify(delta, density, method, epsilon=epsilon or 0, rescale_norm=norm)
                        except (RuntimeError, IndexError, ValueError):
                            expected = None
                    generator = torch.Generator().manual_seed(9)
                    try:
                        ours = (della_drop(delta, density, epsilon, rescale, generator) if epsilon
                                else random_drop(delta, density, rescale, generator))
                    except ValueError:
                        ours = None
                    assert (ours is None and expected is None) or same_bits(ours, expected), \
                        (method, tuple(delta.shape), density, epsilon)


def test_slerp_edge_cases_equal_mergekit():
    """Around the 0.9995 dot threshold, antipodal, zero and sub-eps norms, 0-d and empty tensors."""
    g = torch.Generator().manual_seed(5)
    v0 = torch.randn(64, generator=g)
    ortho = torch.randn(64, generator=g)
    ortho -= (ortho @ v0) / (v0 @ v0) * v0
    ortho *= v0.norm() / ortho.norm()
    pairs = [(v0, -v0), (v0, 3 * v0), (v0, torch.zeros(64)), (torch.zeros(64), v0), (v0 * 1e-9, v0 + ortho),
             (v0, (v0 + ortho) * 1e-9), (torch.tensor(2.0), torch.tensor(-1.0)), (torch.zeros(0, 4), torch.zeros(0, 4))]
    for cos in (0.998, 0.999, 0.99945, 0.9995, 0.99955, 0.9999, 0.999999):
        angle = torch.arccos(torch.tensor(cos, dtype=torch.float64))
        pairs.append((v0, (v0 * angle.cos() + ortho * angle.sin()).float()))
    for dtype in DTYPES:
        for a, b in pairs:
            for t in (0.0, 0.3, 1.0, 1.7):
                a_, b_ = a.to(dtype), b.to(dtype)
                assert same_bits(merge("slerp", [b_, a_], 1, [{}, {}], {"t": t}),
                                 mergekit_merge("slerp", [b_, a_], 1, [{}, {}], {"t": t})), (dtype, t)


def _at_cosine(v: torch.Tensor, ortho: torch.Tensor, cos: float) -> torch.Tensor:
    angle = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    return v * angle.cos() + ortho * angle.sin()


def test_nuslerp_and_model_stock_edge_cases_equal_mergekit():
    """Cosines a hair from +-1 (float64 resolves them), zero and tiny offsets, and model_stock's singular
    1 + (N - 1) cos = 0, with and without a base, row-wise and filter-wise."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 16, generator=g, dtype=torch.float64)
    v = torch.randn(4, 16, generator=g, dtype=torch.float64)
    ortho = torch.randn(4, 16, generator=g, dtype=torch.float64)
    ortho -= (ortho * v).sum() / (v * v).sum() * v
    ortho *= v.norm() / ortho.norm()
    offsets = [(v, _at_cosine(v, ortho, 1 - d)) for d in (1e-17, 1e-12, 3e-9, 1e-8, 1e-6)]
    offsets += [(v, _at_cosine(v, ortho, -1 + d)) for d in (1e-12, 2e-6, 5e-6, 2e-5)]
    offsets += [(v, -v), (v, 2 * v), (v, torch.zeros_like(v)), (v * 1e-9, ortho), (v, -0.5 * v)]
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for a, b in offsets:
            tensors = [(base + a).to(dtype), base.to(dtype), (base + b).to(dtype)]
            for flatten, row_wise in ((True, False), (False, False), (False, True)):
                shared = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
                for b_index in (1, None):
                    inputs = [{"weight": 0.3}, {} if b_index == 1 else {"weight": 0.4}, {"weight": 0.7}]
                    if b_index is None:
                        tensors_, inputs_ = [tensors[0], tensors[2]], [inputs[0], inputs[2]]
                    else:
                        tensors_, inputs_ = tensors, inputs
                    assert same_bits(merge("nuslerp", tensors_, b_index, inputs_, shared),
                                     mergekit_merge("nuslerp", tensors_, b_index, inputs_, shared))
            for filter_wise in (False, True):
                third = (base - (a + b) / 2).to(dtype)  # three offsets with mean pairwise cosine near -1/2
                for stock in ([tensors[1], tensors[0], tensors[2]], [tensors[1], tensors[0], tensors[2], third]):
                    shared = {"filter_wise": filter_wise}
                    assert same_bits(merge("model_stock", stock, 0, [{}] * len(stock), shared),
                                     mergekit_merge("model_stock", stock, 0, [{}] * len(stock), shared))


@pytest.mark.parametrize("name", TASK + ["linear", "nuslerp"])
def test_weight_sums_near_zero_equal_mergekit(name):
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(3, 5, generator=g) for _ in range(3)]
    spec = METHODS[name]
    for weights in ((0.5, -0.5), (3e-9, 2e-9), (6e-9, 6e-9), (-4e-7, 3e-7), (1e-30, 0.0), (0.0, 0.0)):
        if spec.base == "none":
            base, inputs = None, [{"weight": w} for w in (1e-9, *weights)]
        else:
            base, inputs = 0, [{}, *({"weight": w, "density": 0.5} if spec.random else {"weight": w} for w in weights)]
        shared = {"normalize": True} if "normalize" in {p.name for p in spec.parameters} else {}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            expected = mergekit_merge(name, tensors, base, inputs, shared)
        ours = merge(name, tensors, base, inputs, shared, torch.Generator().manual_seed(0))
        assert same_bits(ours, expected), (weights, max_diff(ours, expected))


def test_the_table_matches_mergekits_registry():
    kinds = {float: "float", bool: "bool", int: "int", str: "str"}
    for name, method in METHODS.items():
        spec = mk.get(name).spec
        contract = spec.contract
        assert method.base == {BasePolicy.REQUIRED: "required", BasePolicy.OPTIONAL: "optional",
                               BasePolicy.IGNORED: "none"}[contract.base], name
        assert (method.min_inputs, method.max_inputs) == (contract.min_inputs, contract.max_inputs), name
        assert (method.min_non_base, method.max_non_base) == (contract.min_non_base or 0, contract.max_non_base)
        assert method.reference == (spec.reference_url or method.reference), name
        ours = [(p.name, p.scope, p.default, p.required) for p in method.parameters]
        theirs = [(p.name, p.scope.value, None if p.required else p.default, p.required) for p in spec.parameters]
        assert ours == theirs, name
        for p, q in zip(method.parameters, spec.parameters):
            assert p.kind == kinds.get(q.value_type, "float"), (name, p.name)  # Optional[float] is passthrough's
    assert {m.name for m in METHODS.values() if m.random} == set(RANDOM)


TEXTS = [True, False, 0, 1, 2, -1, 0.0, 1.0, 1.5, float("inf"), float("nan"), 10**400, None, b"1", "1e-3", " 1.5 ",
         "1_000", "1__0", "_1", "inf", "-Infinity", "NaN", "true", "TRUE", "Yes", "off", "t", "F", "1", "0", "2", "1.0",
         "1.", ".5", "+1", "", "  true ", "0x10", "1,5", "\u0661", "1e400", "1.50", "-0", "yes "]


@settings(max_examples=200, deadline=None, database=None)
@given(value=st.sampled_from(TEXTS) | st.text("0123456789._eE+-naifINFAty \t", max_size=6)
       | st.floats(allow_nan=True) | st.integers(-3, 3))
def test_validate_matches_mergekits_parameter_spec(value):
    """No method has an int parameter; ints are checked on ordinary spellings only (pydantic reads "0-0" as 0)."""
    for kind, typ in (("float", float), ("bool", bool), ("int", int), ("str", str)):
        if kind == "int" and isinstance(value, str) and value not in TEXTS:
            continue
        try:
            expected = TypeAdapter(typ).validate_python(value)
        except ValidationError:
            with pytest.raises(ValueError):
                validate(Parameter("x", kind, "shared", required=True), value)
            continue
        got = validate(Parameter("x", kind, "shared", required=True), value)
        assert type(got) is type(expected) and (got == expected or got != got and expected != expected), (kind, value)


def test_validate_optional_and_required():
    assert validate(METHODS["passthrough"].parameters[0], None) is None
    assert validate(METHODS["passthrough"].parameters[0], "0.5") == 0.5
    with pytest.raises(ValueError, match="weight"):
        validate(METHODS["linear"].parameters[0], None)


def test_task_arithmetic_with_unit_weights_is_the_sum_of_task_vectors():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        base, a, b = (torch.randn(5, 7, generator=g, dtype=dtype) for _ in range(3))
        out = merge("task_arithmetic", [a, base, b], 1, [{"weight": 1.0}, {}, {"weight": 1.0}],
                    {"normalize": False, "lambda": 1.0})
        assert same_bits(out, base + ((a - base) + (b - base)))


def test_linear_with_one_hot_weights_returns_the_chosen_tensor():
    g = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        tensors = [torch.randn(3, 4, 2, generator=g).to(dtype) for _ in range(3)]
        for chosen in range(3):
            weights = [{"weight": float(i == chosen)} for i in range(3)]
            assert same_bits(merge("linear", tensors, None, weights, {}), tensors[chosen])


def test_ties_with_full_density_and_agreeing_signs_is_normalised_task_arithmetic():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    signs = torch.randn(6, 5, generator=g).sign()
    others = [base + signs * (torch.rand(6, 5, generator=g) + 0.1) for _ in range(3)]
    weights = [{"weight": w, "density": 1.0} for w in (0.5, 1.5, 0.25)]
    ties = merge("ties", [base, *others], 0, [{}, *weights], {})
    ta = merge("task_arithmetic", [base, *others], 0, [{}, *weights], {"normalize": True})
    assert torch.equal(ties, ta)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_random_drops_keep_density_and_the_l1_norm(density):
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(300, 400, generator=g)
    n = delta.numel()
    for dropped in (random_drop(delta, density, True, g), della_drop(delta, density, min(density, 1 - density) / 2,
                                                                     True, g)):
        kept = (dropped != 0).sum().item() / n
        assert abs(kept - density) < 5 * (density * (1 - density) / n) ** 0.5 + 1e-3
        assert torch.allclose(dropped.abs().sum(), delta.abs().sum(), rtol=1e-4)
        survivors = dropped != 0  # each kept entry is the original times one common factor
        ratio = dropped[survivors] / delta[survivors]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)


def test_edge_cases_refused_with_one_line_reasons():
    x = torch.randn(4, 1)
    with pytest.raises(ValueError, match="density"):
        merge("della", [x, x + 1], 0, [{}, {"weight": 1.0, "density": 0.5, "epsilon": 0.6}], {})
    with pytest.raises(ValueError, match="dim 1"):
        merge("della", [x, x + 1], 0, [{}, {"weight": 1.0, "density": 0.5}], {})
    with pytest.raises(ValueError, match="base"):
        merge("ties", [x, x], None, [{"weight": 1.0}] * 2, {})
    with pytest.raises(ValueError, match="inputs"):
        merge("slerp", [x, x, x], 0, [{}] * 3, {"t": 0.5})
    with pytest.raises(ValueError, match="missing required parameter t"):
        merge("slerp", [x, x], 0, [{}] * 2, {})
    with pytest.raises(ValueError, match="unknown parameter"):
        merge("linear", [x, x], None, [{"weight": 1.0, "density": 0.5}] * 2, {})
