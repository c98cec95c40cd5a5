"""The `code` rule reward: a completion's Python code run against its row's test cases, as DeepSeek-R1
scored programming problems. Reward = the fraction of the row's tests that pass.

The row's `tests` column holds one of:
- a list of test snippets, usually assert statements: `["assert add(1, 2) == 3", ...]`; each runs after the
  solution in the same namespace, and passes when it completes;
- one string of assert statements: each top-level assert is a test; any other statements in it (imports,
  helper definitions) run before each of them;
- a list of `{"input": str, "output": str}` pairs: the code runs as a script with `input` on stdin and
  passes when its stdout equals `output` (trailing whitespace of each line and trailing blank lines ignored).

Each test is its own sandboxed process (rlhf.rewards.sandbox); nothing from the completion runs in here.
"""

from __future__ import annotations

import ast
import re
import secrets
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from rlhf.rewards.rules import _ANSWER_TAG, REWARD_FUNCS, _column, completion_text
from rlhf.rewards.sandbox import CodeSandbox, SandboxResult

# ```python\n ... ``` (any tag; only python-like and untagged blocks count, see extract_code).
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}
_EXPECTED = ('a list of test strings (e.g. ["assert f(1) == 2"]), one string of assert statements, or a list of '
             '{"input": str, "output": str} stdin/stdout pairs')

# Assert tests run under this harness. It reads a random nonce from stdin before the solution runs and prints
# it only after the test completes, so a solution that exits early (sys.exit, os._exit) cannot pass: the
# nonce is in neither the program text nor argv nor the environment. (It guards against early exits, not
# against code that digs the nonce out of the harness's frames: the sandbox, not this, is the security.)
_HARNESS = """\
import sys


def _run(nonce, exec=exec, compile=compile, out=sys.stdout):  # bound before the solution could patch them
    scope = dict(__name__="solution")  # not __main__: a solution's `if __name__ == "__main__":` demo is skipped
    exec(compile({code!r}, "<solution>", "exec"), scope)
    exec(compile({test!r}, "<test>", "exec"), scope)
    out.write("\\n" + nonce + "\\n")
    out.flush()


_run(sys.stdin.readline().strip())
"""


@dataclass(frozen=True)
class StdioTest:
    input: str
    output: str


TestCase = Union[str, StdioTest]  # a str is Python test code (asserts) run after the solution


def extract_code(text: str) -> Optional[str]:
    """The code of a completion: the last <answer>...</answer> block (unwrapping a fenced block inside it), else
    the last ```python block, else the last untagged ``` block. None when there is none or it is empty."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        fenced = _FENCE.findall(tagged[-1])
        code = fenced[-1][1] if fenced else tagged[-1]
    else:
        blocks = _FENCE.findall(text)
        python = [body for tag, body in blocks if tag.strip().lower() in _PYTHON_TAGS]
        untagged = [body for tag, body in blocks if not tag.strip()]
        # A python block wins over a later untagged one, which is often the program's output.
        code = (python or untagged or [None])[-1]
    # Dedented, so that a block indented as a whole inside the answer still runs.
    return textwrap.dedent(code).strip("\n") if code is not None and code.strip() else None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def _split_asserts(source: str, row: int) -> list[str]:
    try:
        statements = ast.parse(source).body
    except SyntaxError as e:
        raise ValueError(f"row {row}: `tests` is a string that is not valid Python ({e.msg}, line {e.lineno}); "
                         f"expected {_EXPECTED}") from None
    setup = [ast.unparse(s) for s in statements if not isinstance(s, ast.Assert)]
    asserts = [ast.unparse(s) for s in statements if isinstance(s, ast.Assert)]
    if not asserts:
        raise ValueError(f"row {row}: `tests` is a string with no assert statement; expected {_EXPECTED}")
    return ["\n".join([*setup, a]) for a in asserts]


def parse_tests(value: Any, row: int = 0) -> Optional[list[TestCase]]:
    """A row's `tests` value as test cases; None when the row has none (the reward does not apply)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _split_asserts(value, row)
    if not isinstance(value, (list, tuple)) or not value:
        found = "an empty list" if isinstance(value, (list, tuple)) else _describe(value)
        raise ValueError(f"row {row}: `tests` is {found}; expected {_EXPECTED}")
    if all(isinstance(t, str) for t in value):
        for k, test in enumerate(value):
            try:
                compile(test, f"<test {k}>", "exec")  # compiles the dataset's test, never the completion
            except SyntaxError as e:
                raise ValueError(f"row {row}: test {k} ({test!r}) is not valid Python: {e.msg}") from None
        return list(value)
    if all(isinstance(t, Mapping) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)
           for t in value):
        return [StdioTest(t["input"], t["output"]) for t in value]
    bad = next(t for t in value if not isinstance(t, str))
    raise ValueError(f"row {row}: `tests` holds {_describe(bad)}; expected {_EXPECTED}")


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _job(code: str, test: TestCase) -> tuple[str, str, Callable[[SandboxResult], bool]]:
    """(program, stdin, passed?) for one test of `code`."""
    if isinstance(test, StdioTest):
        expected = _normalise_output(test.output)
        return code, test.input, lambda r: r.ok and _normalise_output(r.stdout) == expected
    nonce = secrets.token_hex(16)
    return (_HARNESS.format(code=code, test=test), nonce + "\n",
            lambda r: r.ok and r.stdout.rstrip("\n").rsplit("\n", 1)[-1] == nonce)


def score_code(completions: Sequence[Any], tests: Sequence[Any], sandbox: CodeSandbox) -> list[Optional[float]]:
    """Fraction of each row's tests its completion passes; None where the row has no tests, 0.0 where the
    completion holds no code. Every test of the batch runs in `sandbox`, max_workers at a time."""
    if len(tests) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(tests)} `tests` values")
    cases = [parse_tests(value, i) for i, value in enumerate(tests)]  # every data error before any run
    jobs, owners = [], []
    for i, (completion, row_cases) in enumerate(zip(completions, cases)):
        code = extract_code(completion_text(completion, i)) if row_cases is not None else None
        for case in row_cases if code is not None else ():
            jobs.append(_job(code, case))
            owners.append(i)
    passed = [0] * len(completions)
    results = sandbox.run_many([(program, stdin) for program, stdin, _ in jobs])
    for i, (_, _, check), result in zip(owners, jobs, results):
        passed[i] += check(result)
    return [None if row_cases is None else passed[i] / len(row_cases) for i, row_cases in enumerate(cases)]


_default_sandbox: Optional[CodeSandbox] = None


def configure_sandbox(**limits: Any) -> CodeSandbox:
    """Replace the `code` reward's sandbox with one of these limits (CodeSandbox's keyword arguments)."""
    global _default_sandbox
    _default_sandbox = CodeSandbox(**limits)
    return _default_sandbox


def default_sandbox() -> CodeSandbox:
    """The sandbox the registered `code` reward uses (created on first use: its isolation probe runs then)."""
    global _default_sandbox
    if _default_sandbox is None:
        _default_sandbox = CodeSandbox()
    return _default_sandbox


@REWARD_FUNCS.register("code")
def code_reward(prompts: Optional[list], completions: list, **columns: Any) -> list[Optional[float]]:
    """Fraction of the row's `tests` the completion's code passes (see the module docstring), run sandboxed.

    The code is the completion's <answer>...</answer> block, else its last fenced code block; none scores 0.0.
    None for rows whose `tests` is null, so `code` mixes with `accuracy` over a mixed dataset.
    """
    return score_code(completions, _column(columns, "tests", len(completions), "code"), default_sandbox())
