"""The embedded task: chains of small arithmetic operations, and long-thought traces for them.

A problem is a start value and 3..11 numbered operations ("(2) *3"); the difficulty is
the number of operations, so harder problems need more reasoning steps. Every word of the
problem and of the traces is one token of the embedded model's word-level tokenizer (numbers
0..50 included), which keeps the arithmetic learnable by a tiny transformer in minutes:
operands are 2..5 (plus, minus) or 2..3 (times), and every value stays in 0..50.

Each step first copies its operation from the problem, then applies it:
"(3) *2 : 14 * 2 = 28 ." -- the step label "(3)" and the operation "*2" are one token each, so
the copy is the simplest induction lookup (find the earlier "(3)", copy the token after it); the
arithmetic then sees its three inputs right before the "=". (The first embedded default spelled
them "( 3 ) times 2": a two-token match that its 3-layer network learned fragilely, and whose
failures made every wrong answer.)

The long-thought trace is the shortest correct trace (one line per operation, then the boxed
answer; its length is a record's min_tokens) plus redundancy whose amount is drawn per trace,
independent of the difficulty. Every piece of redundancy starts at a visible decision point
right after a step, so fine-tuning can move each decision separately:
  - "wait , let me check : ..." after a correct step: pure waste;
  - the same check after a slip (a wrong result written with probability SLIP): necessary,
    it repairs the value ("..., not 16 . so x = 15 ."), so not every extra token is waste;
  - "so x is 45 ." restatements and "hmm , ..." hesitations: waste;
  - over-thinking, "hmm , maybe 15 * 3 is 44 instead . so x = 44 .": turns a right value
    wrong; its rate grows with the trace's verbosity, so the longest traces are the least
    accurate on average (the paper's Table 1), and pruning them can raise accuracy;
  - a final review that restates every step: waste.
A share of the traces (`concise`) carries none of the optional redundancy, only the slip repairs:
real long-thought models can also answer briefly, and a model that never saw the short form
would be less accurate in it for reasons pruning cannot fix (the first embedded default, trained
without it, lost 0.96 -> 0.83 greedy accuracy when its redundancy was banned at decode time).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

MAX_VALUE = 50  # every value stays a single number token 0..50
PLUS_MINUS = range(2, 6)  # small operands keep the addition table learnable by a tiny model
TIMES = (2, 3)
OPS = {"plus": "+", "minus": "-", "times": "*"}


@dataclass(frozen=True)
class TaskParams:
    """Everything that shapes the task and its traces; hashed into build_info.json."""

    seed: int = 20250122
    n_train: int = 1200
    n_test: int = 400
    min_steps: int = 3
    max_steps: int = 11
    slip: float = 0.05  # a step result written wrong
    fix_slip: float = 0.9  # ... and then caught by a check
    check: tuple[float, float] = (0.55, 0.45)  # P(check a correct step) = a + b * h: > 0.5 on average, so greedy checks too
    concise: float = 0.1  # share of traces with no optional redundancy (P(check) at the first step stays ~0.64)
    restate: float = 0.25  # * h
    hesitate: float = 0.2  # * h
    overthink: float = 0.2  # * h**2: concentrated in the most verbose traces
    review: float = 0.7  # * h: restate every step at the end
    intro: float = 0.6  # * h


PARAMS = TaskParams()

# The first word(s) of every optional piece of a trace (checks, restatements, hesitations,
# over-thinking, the intro and the final review). Forbidding them at decode time makes the model
# write the shortest trace: its accuracy that way bounds what pruning can keep.
REDUNDANCY_OPENERS = ("wait", "hmm", "okay", "so x", "let")


def params_hash(params: TaskParams = PARAMS) -> str:
    """A digest of the generator's parameters, independent of git, to tell builds apart."""
    blob = json.dumps(asdict(params), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def apply_op(op: str, value: int, operand: int) -> int:
    if op == "plus":
        return value + operand
    if op == "minus":
        return value - operand
    return value * operand


def sample_spec(rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    """A start value and `n_steps` operations whose intermediate values all stay in 0..MAX_VALUE."""
    value = rng.randint(2, 20)
    start, ops = value, []
    for _ in range(n_steps):
        choices = [("plus", k) for k in PLUS_MINUS if value + k <= MAX_VALUE]
        choices += [("minus", k) for k in PLUS_MINUS if value - k >= 0]
        # Multiplication is rarer and bounded so the table stays small enough to learn.
        mul = [("times", k) for k in TIMES if 2 <= value and value * k <= MAX_VALUE]
        op, k = rng.choice(mul) if mul and rng.random() < 0.25 else rng.choice(choices)
        ops.append((op, k))
        value = apply_op(op, value, k)
    return start, ops


def label(i: int) -> str:
    """Step i's label, one token: "(3)"."""
    return f"({i})"


def op_token(op: str, k: int) -> str:
    """An operation with its operand, one token: "*2"."""
    return f"{OPS[op]}{k}"


def problem_text(start: int, ops: list[tuple[str, int]]) -> str:
    body = " ".join(f"{label(i)} {op_token(op, k)} ." for i, (op, k) in enumerate(ops, 1))
    return f"start with {start} . {body} what is the result ?"


def solve(start: int, ops: list[tuple[str, int]]) -> list[int]:
    values = [start]
    for op, k in ops:
        values.append(apply_op(op, values[-1], k))
    return values


def _step(i: int, a: int, op: str, k: int, r: int) -> str:
    # The step first copies its operation from the problem ("(3) *2", found there by its
    # label: an induction lookup), then computes with it.
    return f"{label(i)} {op_token(op, k)} : {a} {OPS[op]} {k} = {r} ."


def _answer(value: int) -> str:
    return f"so the answer is \\boxed{{ {value} }} ."


def min_trace(start: int, ops: list[tuple[str, int]]) -> str:
    """The shortest correct trace: the necessary steps only."""
    values = solve(start, ops)
    lines = [f"x = {start} ."]
    lines += [_step(i, values[i - 1], op, k, values[i]) for i, (op, k) in enumerate(ops, 1)]
    lines.append(_answer(values[-1]))
    return " ".join(lines)


def _near(rng: random.Random, value: int) -> int:
    """A plausible wrong value: off by a little, still a valid number token."""
    while True:
        wrong = value + rng.choice((-3, -2, -1, 1, 2, 3, 10, -10))
        if 0 <= wrong <= MAX_VALUE:
            return wrong


def long_trace(
    start: int, ops: list[tuple[str, int]], rng: random.Random, p: TaskParams = PARAMS
) -> tuple[str, int]:
    """Sample a long-thought trace; returns (text, the boxed final value, maybe wrong)."""
    concise = rng.random() < p.concise
    h = 0.0 if concise else rng.random()  # this trace's verbosity, hidden; the model infers it from its context
    out = []
    if rng.random() < p.intro * h:
        out.append("okay , let me work through this one step at a time .")
    out.append(f"x = {start} .")
    x = start
    written = []
    for i, (op, k) in enumerate(ops, 1):
        # A wrong value written earlier can push the chain out of the number range: clamp.
        right = max(0, min(MAX_VALUE, apply_op(op, x, k)))
        r = _near(rng, right) if rng.random() < p.slip else right
        out.append(_step(i, x, op, k, r))
        if r != right:
            if rng.random() < p.fix_slip:
                out.append(f"wait , let me check : {x} {OPS[op]} {k} = {right} , not {r} . so x = {right} .")
                r = right
        else:
            if not concise and rng.random() < p.check[0] + p.check[1] * h:
                out.append(f"wait , let me check : {x} {OPS[op]} {k} = {r} . yes .")
            if rng.random() < p.restate * h:
                out.append(f"so x is {r} .")
            if rng.random() < p.hesitate * h:
                out.append("hmm , let me make sure i have the right step .")
            if rng.random() < p.overthink * h * h:
                wrong = _near(rng, r)
                out.append(f"hmm , maybe {x} {OPS[op]} {k} is {wrong} instead . so x = {wrong} .")
                r = wrong
        written.append((i, x, op, k, r))
        x = r
    if rng.random() < p.review * h:
        out.append("let me go over it again .")
        out += [_step(*w) for w in written]
        out.append("yes .")
    out.append(_answer(x))
    return " ".join(out), x


def words() -> list[str]:
    """Every word the problems and traces can contain (the tokenizer's core vocabulary)."""
    rng = random.Random(0)
    seen: dict[str, None] = {str(n): None for n in range(MAX_VALUE + 1)}
    # Trace and problem words, collected from the generator itself so no literal is missed.
    probe = PARAMS.__class__(**{**asdict(PARAMS), "check": (1.0, 0.0), "slip": 0.5, "fix_slip": 0.5,
                                "restate": 1.0, "hesitate": 1.0, "overthink": 1.0, "review": 1.0, "intro": 1.0,
                                "concise": 0.0})
    for _ in range(50):
        start, ops = sample_spec(rng, 11)
        for text in (problem_text(start, ops), long_trace(start, ops, rng, probe)[0]):
            seen.update(dict.fromkeys(text.split()))
    return list(seen)


def _split_specs(p: TaskParams) -> dict[str, list[tuple[int, list[tuple[str, int]]]]]:
    """Distinct problems, difficulty uniform, cut into disjoint train and test splits."""
    rng = random.Random(p.seed)
    seen: set[str] = set()
    specs = []
    while len(specs) < p.n_train + p.n_test:
        spec = sample_spec(rng, rng.randint(p.min_steps, p.max_steps))
        text = problem_text(*spec)
        if text not in seen:
            seen.add(text)
            specs.append(spec)
    return {"test": specs[: p.n_test], "train": specs[p.n_test:]}


def make_problems(split: str, p: TaskParams = PARAMS) -> list[dict]:
    """Records {"id", "problem", "answer", "min_tokens", "difficulty"} of a split.

    `min_tokens`: the shortest correct trace in the embedded tokenizer's tokens (one per word)
    plus the end-of-turn token the model emits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    records = []
    for n, (start, ops) in enumerate(_split_specs(p)[split]):
        records.append({
            "id": f"embedded-{split}-{n:05d}",
            "problem": problem_text(start, ops),
            "answer": str(solve(start, ops)[-1]),
            "min_tokens": len(min_trace(start, ops).split()) + 1,
            "difficulty": len(ops) - p.min_steps + 1,
        })
    return records


def test_problem_texts(p: TaskParams = PARAMS) -> set[str]:
    """Problem texts of the test split, kept out of the model's training traces."""
    return {problem_text(*spec) for spec in _split_specs(p)["test"]}
