"""The demo's maths: arithmetic and algebra problems with DeepSeek-R1-style step-by-step reasoning, in three
styles (plain, DeepSeek chat, Qwen3 chat with its /think and /no_think switches).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Literal

Style = Literal["plain", "r1_chat", "qwen_chat"]
STYLES: tuple[str, ...] = ("plain", "r1_chat", "qwen_chat")

PEOPLE = ["Alice", "Bob", "Carla", "Deepak", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nadia", "Omar", "Priya"]
THINGS = ["apples", "books", "marbles", "coins", "pencils", "tickets", "cookies", "stamps", "shells", "cards",
          "stickers", "oranges", "bottles", "eggs"]


def _add_steps(a: int, b: int) -> str:
    steps, carry, x, y = [], 0, a, b
    while x or y or carry:
        da, db = x % 10, y % 10
        s = da + db + carry
        steps.append(f"{da} + {db}{f' + {carry}' if carry else ''} = {s}, write {s % 10}"
                     f"{', carry 1' if s >= 10 else ''}")
        carry, x, y = s // 10, x // 10, y // 10
    return "; ".join(steps)


def _p_add(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(10, 999), r.randint(10, 999)
    return (f"What is {a} + {b}?", f"Add digit by digit from the right: {_add_steps(a, b)}. So {a} + {b} = {a + b}.",
            str(a + b))


def _p_sub(r: random.Random) -> tuple[str, str, str]:
    a, b = sorted((r.randint(10, 999), r.randint(10, 999)), reverse=True)
    t = b // 10 * 10
    return (f"What is {a} - {b}?", f"{a} - {b}: first take away {t} to get {a - t}, then take away {b % 10} "
            f"to get {a - b}.", str(a - b))


def _p_mul(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(11, 99), r.randint(11, 99)
    t, u = b // 10 * 10, b % 10
    return (f"What is {a} * {b}?", f"Split {b} = {t} + {u}. {a} * {t} = {a * t}. {a} * {u} = {a * u}. "
            f"Then {a * t} + {a * u} = {a * b}.", str(a * b))


def _p_div(r: random.Random) -> tuple[str, str, str]:
    b, q, rem = r.randint(3, 12), r.randint(4, 60), 0
    rem = r.randint(0, b - 1) if r.random() < 0.5 else 0
    a = b * q + rem
    steps = f"{b} * {q} = {b * q}, which is the largest multiple of {b} not above {a}. {a} - {b * q} = {rem}."
    ans = f"{q} remainder {rem}" if rem else str(q)
    return f"What is {a} divided by {b}?", steps + f" So {a} / {b} = {ans}.", ans


def _p_linear(r: random.Random) -> tuple[str, str, str]:
    x, a, b = r.randint(-9, 20), r.randint(2, 9), r.randint(1, 30)
    c = a * x + b
    return (f"Solve for x: {a}x + {b} = {c}.", f"Subtract {b} from both sides: {a}x = {c - b}. Divide both sides "
            f"by {a}: x = {x}. Check: {a} * {x} + {b} = {c}.", f"x = {x}")


def _p_two_sided(r: random.Random) -> tuple[str, str, str]:
    x, a, c = r.randint(-9, 15), r.randint(4, 9), r.randint(1, 3)
    b = r.randint(1, 20)
    d = a * x + b - c * x
    rhs = f"{c}x + {d}" if d >= 0 else f"{c}x - {-d}"
    return (f"Solve for x: {a}x + {b} = {rhs}.", f"Subtract {c}x from both sides: {a - c}x + {b} = {d}. "
            f"Subtract {b}: {a - c}x = {d - b}. Divide by {a - c}: x = {x}.", f"x = {x}")


def _p_speed(r: random.Random) -> tuple[str, str, str]:
    v, t = r.randint(20, 120), r.choice([1, 2, 3, 4, 1.5, 2.5])
    d = f"{v * t:g}"
    return (f"A train travels {d} km in {t:g} hours. What is its average speed?",
            f"Average speed = distance / time = {d} / {t:g} = {v} km/h.", f"{v} km/h")


def _p_percent(r: random.Random) -> tuple[str, str, str]:
    p, n = r.choice([10, 20, 25, 50, 75, 5, 15]), r.randint(2, 40) * 20
    return (f"What is {p}% of {n}?", f"{p}% means {p}/100. {n} * {p} / 100 = {n * p} / 100 = {n * p // 100}.",
            str(n * p // 100))


def _p_shopping(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    n, price, paid = r.randint(2, 9), r.randint(2, 15), 0
    cost = n * price
    paid = r.choice([x for x in (20, 50, 100, 200) if x >= cost])
    return (f"{who} buys {n} {thing} at {price} dollars each and pays with {paid} dollars. How much change "
            f"does {who} get?", f"Cost: {n} * {price} = {cost} dollars. Change: {paid} - {cost} = {paid - cost} dollars.",
            f"{paid - cost} dollars")


def _p_word(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    a, b, c = r.randint(5, 60), r.randint(2, 30), r.randint(1, 20)
    return (f"{who} has {a} {thing}, buys {b} more and gives away {c}. How many {thing} does {who} have now?",
            f"Start with {a}. After buying: {a} + {b} = {a + b}. After giving away: {a + b} - {c} = {a + b - c}.",
            str(a + b - c))


def _p_share(r: random.Random) -> tuple[str, str, str]:
    who, thing = r.choice(PEOPLE), r.choice(THINGS)
    k, each = r.randint(2, 8), r.randint(2, 12)
    return (f"{who} shares {k * each} {thing} equally among {k} friends. How many does each friend get?",
            f"Each friend gets {k * each} / {k}. {k} * {each} = {k * each}, so {k * each} / {k} = {each}.", str(each))


def _p_area(r: random.Random) -> tuple[str, str, str]:
    w, h = r.randint(2, 30), r.randint(2, 30)
    if r.random() < 0.5:
        return (f"A rectangle is {w} cm wide and {h} cm long. What is its area?",
                f"Area = width * length = {w} * {h} = {w * h} square cm.", f"{w * h} square cm")
    return (f"A rectangle is {w} cm wide and {h} cm long. What is its perimeter?",
            f"Perimeter = 2 * (width + length) = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} cm.", f"{2 * (w + h)} cm")


def _p_average(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(3, 5)
    mean = r.randint(5, 60)
    xs = [mean + r.randint(-9, 9) for _ in range(n - 1)]
    xs.append(mean * n - sum(xs))
    s = " + ".join(map(str, xs))
    return (f"What is the average of {', '.join(map(str, xs))}?",
            f"Sum: {s} = {mean * n}. There are {n} numbers. {mean * n} / {n} = {mean}.", str(mean))


def _p_order_ops(r: random.Random) -> tuple[str, str, str]:
    a, b, c = r.randint(2, 20), r.randint(2, 9), r.randint(2, 9)
    return (f"Evaluate {a} + {b} * {c}.", f"Multiplication comes first: {b} * {c} = {b * c}. Then {a} + {b * c} = "
            f"{a + b * c}.", str(a + b * c))


def _p_square(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(11, 40)
    t, u = n // 10 * 10, n % 10
    return (f"What is {n} squared?", f"{n}^2 = ({t} + {u})^2 = {t}^2 + 2 * {t} * {u} + {u}^2 = {t * t} + "
            f"{2 * t * u} + {u * u} = {n * n}.", str(n * n))


def _p_fraction(r: random.Random) -> tuple[str, str, str]:
    from math import gcd

    b, d = r.choice([2, 3, 4, 5, 6, 8]), r.choice([2, 3, 4, 5, 6, 8])
    a, c = r.randint(1, b - 1) if b > 1 else 1, r.randint(1, d - 1) if d > 1 else 1
    num, den = a * d + c * b, b * d
    g = gcd(num, den)
    simp = f" Simplify by {g}: {num // g}/{den // g}." if g > 1 else ""
    ans = f"{num // g}/{den // g}"
    return (f"What is {a}/{b} + {c}/{d}?", f"Common denominator {b} * {d} = {den}. {a}/{b} = {a * d}/{den} and "
            f"{c}/{d} = {c * b}/{den}. Sum: {a * d + c * b}/{den}.{simp}", ans)


MATHS_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _p_add, _p_sub, _p_mul, _p_div, _p_linear, _p_two_sided, _p_speed, _p_percent, _p_shopping, _p_word, _p_share,
    _p_area, _p_average, _p_order_ops, _p_square, _p_fraction,
)


def maths_problem(r: random.Random) -> tuple[str, str, str]:
    """(question, step-by-step reasoning, answer) for one arithmetic or algebra problem."""
    return r.choice(MATHS_TEMPLATES)(r)


def format_problem(q: str, steps: str, answer: str, style: Style = "plain", *, think: bool = True) -> str:
    """One worked problem as text in a style (see the module docstring); `think=False` is Qwen3's `/no_think`."""
    if style == "plain":
        return f"Question: {q}\n<think>\n{steps}\n</think>\nThe answer is {answer}.\n\n"
    if style == "r1_chat":
        return (f"<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜><think>\n{steps}\n</think>\n\n"
                f"The answer is {answer}.<｜end▁of▁sentence｜>")
    if style != "qwen_chat":
        raise ValueError(f"unknown maths style {style!r}; styles: {', '.join(STYLES)}")
    if think:
        return (f"<|im_start|>user\n{q} /think<|im_end|>\n<|im_start|>assistant\n<think>\n{steps}\n</think>\n\n"
                f"The answer is {answer}.<|im_end|>\n")
    return (f"<|im_start|>user\n{q} /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
            f"The answer is {answer}.<|im_end|>\n")


def maths_sample(r: random.Random, style: Style = "plain") -> str:
    """One worked problem in a style; a quarter of Qwen chat turns use `/no_think` (an empty think block)."""
    return maths_doc(r, style)[1]


def maths_doc(r: random.Random, style: str) -> tuple[str, str]:
    q, steps, answer = maths_problem(r)
    think = r.random() < 0.75 if style == "qwen_chat" else True
    return q, format_problem(q, steps, answer, style, think=think)
