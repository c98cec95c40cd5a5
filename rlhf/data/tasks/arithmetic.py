"""The built-in arithmetic task: `47+38=` -> `<think>7+8=15,4+3+1=8</think><answer>85</answer>`.

The think block is schoolbook addition from the least significant column, one `a+b(+carry)=sum` step
per column; the last column is written in full, so its sum supplies the leading digits. A flawed
teacher that forgets carries (`drop_carries=True`) is right exactly on the carry-free problems: SFT
copies its mistake, and RL against the `accuracy` verifier can then remove it (as in R1, the cold start
is small and imperfect; the verifier does the rest).

Every function here is pure and deterministic in (config, split, seed). Train and test are disjoint by
construction: a stable hash of the pair (a, b) puts it in one pool or the other, whatever num_train, the
seed or the stage asking, so no seed's training rows can reach any seed's test rows.
"""

from __future__ import annotations

import random
from typing import Any

from rlhf.errors import ConfigError, DataError

SPLITS = ("train", "test")
TEST_SHARE = 5
"""One pair in TEST_SHARE belongs to the test split."""

_MASK64 = (1 << 64) - 1
# Below this many (a, b) pairs the pool is enumerated; above it, sampled (digits >= 3 pools are huge).
_ENUMERATE_MAX = 200_000


def _mix64(x: int) -> int:
    """splitmix64's finaliser: stable across processes and well mixed (hash() of an int is the int itself)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def in_test_split(a: int, b: int) -> bool:
    """Whether the problem a+b belongs to the held-out test split (a fixed property of the pair)."""
    return _mix64(_mix64(a) ^ b) % TEST_SHARE == 0


def _columns(a: int, b: int, drop_carries: bool) -> tuple[list[str], str, bool]:
    """Column steps, the resulting sum as written, and whether any carry passed between columns."""
    if a < 0 or b < 0:
        raise ValueError(f"column-wise addition is defined for non-negative operands, got {a}+{b}")
    xs, ys = str(a)[::-1], str(b)[::-1]
    width = max(len(xs), len(ys))
    steps: list[str] = []
    low_digits: list[str] = []
    carry, carried = 0, False
    for i in range(width):
        da = int(xs[i]) if i < len(xs) else 0
        db = int(ys[i]) if i < len(ys) else 0
        s = da + db + carry
        steps.append(f"{da}+{db}+{carry}={s}" if carry else f"{da}+{db}={s}")
        if i == width - 1:
            return steps, str(s) + "".join(reversed(low_digits)), carried
        low_digits.append(str(s % 10))
        carried = carried or s >= 10
        carry = 0 if drop_carries else s // 10
    raise AssertionError("unreachable: an operand has at least one digit")


def _completion(steps: list[str], answer: str) -> str:
    return f"<think>{','.join(steps)}</think><answer>{answer}</answer>"


def has_carry(a: int, b: int) -> bool:
    """Whether adding a and b carries from one column into another (the top column's overflow does not count)."""
    return _columns(a, b, drop_carries=False)[2]


def solution(a: int, b: int, drop_carries: bool = False) -> str:
    """The R1-format completion for `a+b=`.

    drop_carries=True is the flawed teacher: every carry is forgotten, the think block shows the columns
    without them and the answer is the (wrong, when has_carry(a, b)) sum that follows.
    """
    steps, total, _ = _columns(a, b, drop_carries)
    return _completion(steps, total)


def _operand_range(digits: int) -> range:
    if digits < 1:
        raise ConfigError(f"data.arithmetic.digits must be at least 1, got {digits}")
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _pairs(cfg: Any, split: str, seed: int) -> list[tuple[int, int]]:
    if split not in SPLITS:
        raise ValueError(f"arithmetic split must be one of {SPLITS}, got {split!r}")
    n = cfg.num_train if split == "train" else cfg.num_eval
    key = "num_train" if split == "train" else "num_eval"
    if n < 0:
        raise ConfigError(f"data.arithmetic.{key} must be >= 0, got {n}")
    operands = _operand_range(cfg.digits)
    want_test = split == "test"
    share = 1 / TEST_SHARE if want_test else 1 - 1 / TEST_SHARE
    total = len(operands) ** 2
    rng = random.Random(f"arithmetic/{split}/{seed}")
    if total <= _ENUMERATE_MAX or n > total * share / 4:
        pool = [(a, b) for a in operands for b in operands if in_test_split(a, b) == want_test]
        if n > len(pool):
            raise DataError(
                f"the arithmetic task with digits={cfg.digits} has only {len(pool)} {split} problems, "
                f"but data.arithmetic.{key}={n}; lower {key} or raise data.arithmetic.digits"
            )
        return rng.sample(pool, n)
    # The pool is much larger than n: rejection sampling finishes in about n / share draws.
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    lo, hi = operands.start, operands.stop - 1
    while len(chosen) < n:
        pair = (rng.randint(lo, hi), rng.randint(lo, hi))
        if pair not in seen and in_test_split(*pair) == want_test:
            seen.add(pair)
            chosen.append(pair)
    return chosen


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"data.arithmetic.{name} must be in [0, 1], got {value}")


def _wrong_sum(rng: random.Random, total: int) -> str:
    offsets = [d for d in range(-10, 11) if d != 0 and total + d >= 0]
    return str(total + rng.choice(offsets))


def arithmetic_problems(cfg: Any, split: str, seed: int) -> list[dict]:
    """RL prompts: rows {prompt: "47+38=", answer: "85"}; num_train rows for "train", num_eval for "test"."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in _pairs(cfg, split, seed)]


def arithmetic_demonstrations(cfg: Any, split: str, seed: int) -> list[dict]:
    """SFT rows {prompt, completion, answer}; `answer` is always the true sum.

    On "train", round(carry_drop_rate * #carry problems) of the problems that need a carry get the
    carry-forgetting teacher, and round(wrong_rate * #rows) of the others keep a correct think block but
    end in a random wrong answer. "test" demonstrations are always correct.
    """
    _check_rate("carry_drop_rate", cfg.carry_drop_rate)
    _check_rate("wrong_rate", cfg.wrong_rate)
    pairs = _pairs(cfg, split, seed)
    rows = [{"prompt": f"{a}+{b}=", "completion": solution(a, b), "answer": str(a + b)} for a, b in pairs]
    if split == "test":
        return rows
    rng = random.Random(f"arithmetic/demonstrations/{seed}")
    carry_rows = [i for i, (a, b) in enumerate(pairs) if has_carry(a, b)]
    dropped = set(rng.sample(carry_rows, round(cfg.carry_drop_rate * len(carry_rows))))
    for i in sorted(dropped):
        rows[i]["completion"] = solution(*pairs[i], drop_carries=True)
    others = [i for i in range(len(rows)) if i not in dropped]
    for i in sorted(rng.sample(others, min(len(others), round(cfg.wrong_rate * len(rows))))):
        a, b = pairs[i]
        steps, _, _ = _columns(a, b, drop_carries=False)
        rows[i]["completion"] = _completion(steps, _wrong_sum(rng, a + b))
    return rows


REJECTION_WEIGHTS = {"off_by": 3, "bad_column": 6, "spurious_carry": 1, "miscopy": 1, "unclosed_answer": 1,
                     "no_think": 1, "carry_drop": 2}
"""Relative odds of each kind of rejection (carry_drop only on problems that carry). They follow the mistakes of the
policy the reward model will score: the cold start's wrong answers are dropped carries and, once it writes the carry,
a carry column summed wrong (`8+7+1=17`: 246 and 59 of 768 sampled answers, every other kind together 22). A wrong
column sum is the hardest for a reward model to see, so it gets the most pairs, on the carry column where there is one
(at 3 in 12, on any column, the reward model ranked the cold start's right answers above those at chance, 0.49 AUC,
and PPO against it stalled once it wrote its carries); format errors are learned from few pairs."""


def _miscopied(a: int, b: int, rng: random.Random) -> tuple[int, int]:
    """(a, b) with one digit of one operand replaced by another (a leading digit never by 0)."""
    digits = [list(str(a)), list(str(b))]
    which = rng.randrange(2)
    i = rng.randrange(len(digits[which]))
    low = 1 if i == 0 and len(digits[which]) > 1 else 0
    digits[which][i] = str(rng.choice([d for d in range(low, 10) if str(d) != digits[which][i]]))
    return int("".join(digits[0])), int("".join(digits[1]))


def _rejection(kind: str, a: int, b: int, steps: list[str], total: str, rng: random.Random) -> str:
    """A flawed completion of `a+b=` of the given kind (see arithmetic_preferences)."""
    if kind == "miscopy":
        return solution(*_miscopied(a, b, rng))
    free = [i for i, step in enumerate(steps) if step.count("+") == 1]  # columns no carry reaches
    if kind == "spurious_carry" and not free:
        kind = "bad_column"
    if kind == "carry_drop":
        return solution(a, b, drop_carries=True)
    if kind in ("bad_column", "spurious_carry"):
        if kind == "spurious_carry":
            i = rng.choice(free)
        else:  # the column a carry reaches, where there is one: the sum a policy gets wrong once it carries
            i = rng.choice([j for j in range(len(steps)) if j not in free] or range(len(steps)))
        lhs, value = steps[i].split("=")
        delta = 1 if kind == "spurious_carry" else rng.choice([d for d in (-2, -1, 1, 2) if int(value) + d >= 0])
        faulty = list(steps)
        faulty[i] = f"{lhs}+1={int(value) + 1}" if kind == "spurious_carry" else f"{lhs}={int(value) + delta}"
        return _completion(faulty, str(a + b + delta * 10 ** i))
    if kind == "off_by":
        offsets = [d for d in (-10, -2, -1, 1, 2, 10) if a + b + d >= 0]
        return _completion(steps, str(a + b + rng.choice(offsets)))
    if kind == "unclosed_answer":
        return f"<think>{','.join(steps)}</think><answer>{total}"
    return f"<answer>{total}</answer>"


def arithmetic_preferences(cfg: Any, split: str, seed: int) -> list[dict]:
    """Reward-model pairs {prompt, chosen, rejected, answer}.

    chosen is the correct R1-format solution. rejected is, at the odds of REJECTION_WEIGHTS, the carry-forgetting
    solution (on problems that carry), the right work with an answer a little off (+-1, +-2 or +-10), a column added
    wrong (the one a carry reaches, where there is one), a carry added where none was due (the answer following the
    faulty column in both), an operand digit copied wrong (the rest right for the miscopied problem), the right
    answer without `</answer>`, or the right answer without a think block. So every rejected fails the accuracy or
    the format reward, and chosen passes both. The faulty-column and miscopy kinds make the reward model check each
    column against the prompt, not only whether a carry appears: a policy optimised against it otherwise learns to
    write carries everywhere, or to copy a digit wrong and add right.
    """
    rng = random.Random(f"arithmetic/preferences/{split}/{seed}")
    per_problem = max(1, int(getattr(cfg, "pairs_per_problem", 1))) if split == "train" else 1
    rows = []
    for a, b in _pairs(cfg, split, seed):
        steps, total, carried = _columns(a, b, drop_carries=False)
        chosen = _completion(steps, total)
        kinds = [kind for kind, weight in REJECTION_WEIGHTS.items() for _ in range(weight)
                 if carried or kind != "carry_drop"]
        for _ in range(per_problem):
            if not kinds:
                break
            kind = rng.choice(kinds)
            kinds = [k for k in kinds if k != kind]  # another pair of this problem rejects differently
            rows.append({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": _rejection(kind, a, b, steps, total, rng),
                         "answer": total})
    return rows
