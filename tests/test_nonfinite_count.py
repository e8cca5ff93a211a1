"""`finite.nonfinite_count` counts exactly what `torch.isfinite` calls non-finite, for every float format
the writer stores, on any bit pattern (the fast any-check must never miss one)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zenith_merge.io.finite import nonfinite_count
from zenith_merge.io.safetensors_format import CODES, DTYPES

FLOAT_CODES = [c for c in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                           "F8_E8M0") if c in DTYPES]


def _expected(raw: bytes, code: str) -> int:
    if not raw:
        return 0
    values = torch.frombuffer(bytearray(raw), dtype=DTYPES[code]).double()
    return int((~torch.isfinite(values)).sum())


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(FLOAT_CODES), data=st.data())
def test_count_equals_isfinite_on_any_bits(code, data):
    size = DTYPES[code].itemsize
    raw = data.draw(st.binary(min_size=0, max_size=64).map(lambda b: b[:len(b) - len(b) % size]))
    assert nonfinite_count(memoryview(raw), code) == _expected(raw, code)
    tensor = torch.frombuffer(bytearray(raw), dtype=DTYPES[code]) if raw else torch.empty(0, dtype=DTYPES[code])
    assert nonfinite_count(tensor, code) == _expected(raw, code)


@pytest.mark.parametrize("code", FLOAT_CODES)
def test_every_special_value_of_each_format_is_counted(code):
    dtype = DTYPES[code]
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -0.0]).to(dtype)
    assert nonfinite_count(specials, code) == int((~torch.isfinite(specials.double())).sum()) > 0


def test_integers_are_never_counted():
    assert nonfinite_count(torch.full((8,), -1, dtype=torch.int32), CODES[torch.int32]) == 0
