import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.data import load_rows
from rlhf.data.tokenize import render_prompt
from rlhf.errors import RewardError
from rlhf.rewards import (
    REWARD_FUNCS,
    CodeSandbox,
    SandboxError,
    StdioTest,
    code_reward,
    extract_code,
    parse_tests,
    score_code,
)

TIMEOUT = 2.0
REPO = Path(__file__).resolve().parents[3]
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
IS_ROOT = os.geteuid() == 0


def answer(code: str) -> str:
    return f"<think>easy</think><answer>\n{code}</answer>"


@pytest.fixture(scope="module")
def sandbox():
    return CodeSandbox(timeout_s=TIMEOUT, max_workers=2)


def score(sandbox, code, tests):
    return score_code([answer(code)], [tests], sandbox)[0]


def stray_processes(uids) -> list[str]:
    """Processes of the sandbox uids, and children of this (the trainer's) process."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if int(status["Uid"].split()[0]) in uids or int(status["PPid"]) == os.getpid():
            found.append(f"{pid} {status['Name'].strip()} {status['State'].strip()}")
    return found


# ---- scoring ----------------------------------------------------------------------------------------


def test_code_is_registered():
    assert REWARD_FUNCS.get("code") is code_reward


def test_correct_solution_scores_one_and_half_passing_scores_half(sandbox):
    assert score(sandbox, ADD, ADD_TESTS) == 1.0
    assert score(sandbox, "def add(a, b):\n    return abs(a) + b\n", ADD_TESTS) == 0.5
    assert score(sandbox, "def add(a, b):\n    return None\n", ADD_TESTS) == 0.0
    assert score(sandbox, "def add(a, b) return a", ADD_TESTS) == 0.0  # a syntax error fails every test


def test_a_string_of_asserts_is_one_test_per_assert_with_the_rest_as_setup(sandbox):
    tests = "import math\nassert add(1, 2) == 3\nassert add(2, 2) == math.floor(5.5)\n"
    assert parse_tests(tests) == ["import math\nassert add(1, 2) == 3",
                                  "import math\nassert add(2, 2) == math.floor(5.5)"]
    assert score(sandbox, ADD, tests) == 0.5


def test_stdin_stdout_pairs_compare_output_ignoring_trailing_whitespace(sandbox):
    code = "a, b = map(int, input().split())\nprint(a + b)\nprint('done')\n"
    tests = [{"input": "1 2\n", "output": "3\ndone"}, {"input": "5 5", "output": "10   \ndone\n\n"}]
    assert parse_tests(tests) == [StdioTest("1 2\n", "3\ndone"), StdioTest("5 5", "10   \ndone\n\n")]
    assert score(sandbox, code, tests) == 1.0
    assert score(sandbox, code, tests + [{"input": "1 1", "output": "3\ndone"}]) == pytest.approx(2 / 3)
    assert score(sandbox, "a = input()\nprint(3)\nprint('done')\nraise SystemExit(1)", tests[:1]) == 0.0  # crashed


def test_exiting_before_the_asserts_run_does_not_pass(sandbox):
    for early_exit in ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "print('OK')\nimport os\nos._exit(0)",
                       "raise SystemExit"]:
        assert score(sandbox, ADD + early_exit, ADD_TESTS) == 0.0, early_exit
    # A `__main__` demo that reads stdin is skipped rather than eating the harness's input.
    assert score(sandbox, ADD + "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n",
                 ADD_TESTS) == 1.0


@pytest.mark.parametrize(
    "text, code",
    [
        (answer(ADD), ADD.strip()),
        ("<answer>```python\nx = 1\n```</answer>", "x = 1"),  # a fenced block inside the answer
        ("Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```", "x = 2"),  # the last one
        ("```\nx = 3\n```", "x = 3"),
        ("```python\nx = 1\n```\nIt prints:\n```\n1\n```", "x = 1"),  # not the output block after it
        ("<answer>\n    def f():\n        return 1\n</answer>", "def f():\n    return 1"),  # dedented
        ("<answer>x = 4</answer>\n```python\nx = 5\n```", "x = 4"),  # the answer tag wins
        ("```cpp\nint x;\n```", None),
        ("```python\nx = 1", None),  # cut off before the fence closed
        ("<answer> </answer>", None),
        ("the answer is 5", None),
    ],
)
def test_code_extraction(text, code):
    assert extract_code(text) == code


def test_no_code_scores_zero_and_rows_without_tests_score_none(sandbox):
    completions = ["I cannot solve this.", answer(ADD), answer(ADD), "```python\nx = 1\n```"]
    tests = [ADD_TESTS, None, ADD_TESTS, None]
    assert score_code(completions, tests, sandbox) == [0.0, None, 1.0, None]


def test_the_registered_function_reads_the_tests_column_of_chat_completions():
    completions = [[{"role": "assistant", "content": answer(ADD)}], [{"role": "assistant", "content": "no idea"}]]
    assert code_reward(["q1", "q2"], completions, tests=[ADD_TESTS, ADD_TESTS], answer=[None, None]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="needs an `tests` column"):
        code_reward(["q"], ["x"], answer=["1"])


@pytest.mark.parametrize(
    "tests, match",
    [
        (42, r"row 0: `tests` is a int \(42\); expected a list of test strings"),
        ([], "row 0: `tests` is an empty list"),
        ([1, 2], r"`tests` holds a int \(1\)"),
        ([{"input": "1"}], r"`tests` holds a dict \(\{'input': '1'\}\)"),
        (["assert add(1, 2) == 3", {"input": "1", "output": "2"}], "`tests` holds a dict"),
        (["assert add(1,"], "row 0: test 0 .* is not valid Python"),
        ("assert (", "row 0: `tests` is a string that is not valid Python"),
        ("x = 1\nprint(x)", "row 0: `tests` is a string with no assert statement"),
    ],
)
def test_malformed_tests_are_a_clear_error(sandbox, tests, match):
    with pytest.raises(ValueError, match=match):
        score_code([answer(ADD)], [tests], sandbox)


# ---- hostile programs -------------------------------------------------------------------------------

TOKEN = secrets.token_hex(6)
OUTSIDE_TMP = Path(f"/tmp/pwned_{TOKEN}")
OUTSIDE_REPO = REPO / f"pwned_{TOKEN}"

# Each defines `add` after its attack where the attack's success would show as a passing score; the others
# score 0 regardless, and what they check is that the host and this process (the trainer) are untouched.
HOSTILE = {
    "infinite loop": "while True:\n    pass\n" + ADD,
    "fork bomb": "import os\nwhile True:\n    os.fork()\n" + ADD,
    "fork bomb ignoring failed forks": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                                       "        pass\n" + ADD,
    "child leaving the process group": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\n",
    "10 GB allocation": "x = bytearray(10**10)\n" + ADD,
    "printing 50 MB": "print('x' * 50_000_000)\n" + ADD,
    "killing its parent": "import os\nos.kill(os.getppid(), 9)\n",
    "writing /tmp": f"open({str(OUTSIDE_TMP)!r}, 'w').write('x')\n",
    "writing into the repo": f"open({str(OUTSIDE_REPO)!r}, 'w').write('x')\n" + ADD,
    "connecting to the internet": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n" + ADD,
}


# The isolation modes (rlhf.rewards.sandbox) that contain each attack; the rest contain all of these.
CONTAINED_BY = {
    "writing /tmp": ("namespaces", "userns"),
    "connecting to the internet": ("namespaces", "userns"),
    "writing into the repo": ("namespaces", "uid"),  # userns: only if the repo is on the read-only root mount
    "killing its parent": ("namespaces", "userns", "uid"),
    "child leaving the process group": ("namespaces", "userns", "uid"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_score_zero_within_their_limits_and_leave_nothing_behind(sandbox, name):
    if sandbox.isolation not in CONTAINED_BY.get(name, (sandbox.isolation,)):
        pytest.skip(f"isolation={sandbox.isolation} (the strongest available here) does not contain this")
    began = time.monotonic()
    assert score(sandbox, HOSTILE[name], ADD_TESTS) == 0.0
    reaping = 5 if sandbox.isolation == "uid" else 0  # without a PID namespace, the wait for init to reap
    assert time.monotonic() - began < TIMEOUT + 3 + reaping  # its two tests run side by side (max_workers=2)
    assert not OUTSIDE_TMP.exists() and not OUTSIDE_REPO.exists()
    assert stray_processes(range(sandbox.uid_base, sandbox.uid_base + 100)) == []


def test_the_sandbox_has_no_network_not_even_the_trainers_localhost(sandbox):
    if sandbox.isolation not in ("namespaces", "userns"):
        pytest.skip(f"isolation={sandbox.isolation} leaves the network reachable")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + ADD
        assert score(sandbox, code, ADD_TESTS) == 0.0
        with pytest.raises(BlockingIOError):
            server.accept()
    # A write to /tmp lands in the program's own throwaway /tmp, not the host's.
    assert score(sandbox, f"open({str(OUTSIDE_TMP)!r}, 'w').write('x')\n" + ADD, ADD_TESTS) == 1.0
    assert not OUTSIDE_TMP.exists()


def test_output_is_read_back_only_up_to_the_cap():
    capped = CodeSandbox(timeout_s=TIMEOUT, max_output_bytes=1000, max_workers=1)
    result = capped.run("import sys\nsys.stdout.write('y' * 900)\nsys.stdout.flush()\nprint('x' * 5000)")
    assert result.truncated and not result.ok and not result.timed_out
    assert result.stdout == "y" * 900 + "x" * 100 and len(result.stderr) <= 1000
    result = capped.run("print(input() * 3)", "ab\n")
    assert result.ok and result.stdout == "ababab\n"


def test_the_program_gets_a_minimal_environment(sandbox, monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "hunter2")
    result = sandbox.run("import os\nprint(sorted(os.environ))")
    assert result.ok and "RLHF_TEST_SECRET" not in result.stdout and "PATH" in result.stdout


def test_concurrent_runs_are_capped_at_max_workers():
    pair = CodeSandbox(timeout_s=5.0, max_workers=2)
    pair.run("pass")  # the isolation probe and interpreter warm-up, out of the timing
    began = time.monotonic()
    results = pair.run_many([("import time\ntime.sleep(1)\nprint('slept')", "")] * 4)
    elapsed = time.monotonic() - began
    assert [r.stdout for r in results] == ["slept\n"] * 4
    assert 2.0 <= elapsed < 3.9  # two rounds of two: neither four at once nor one after another


def _uid_sandbox() -> CodeSandbox:
    """The fallback for root without namespaces, with an interpreter the sandbox uid may run."""
    if not IS_ROOT:
        pytest.skip("isolation=uid needs root")
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if python:
            box = CodeSandbox(timeout_s=TIMEOUT, max_workers=1, isolation="uid", python=python, uid_base=64100)
            try:
                box.isolation
                return box
            except SandboxError:
                continue
    pytest.skip("no interpreter the sandbox uid may run")


@pytest.mark.parametrize("name", ["fork bomb ignoring failed forks", "child leaving the process group",
                                  "killing its parent", "writing into the repo"])
def test_the_uid_fallback_also_contains_hostile_programs(name):
    box = _uid_sandbox()
    began = time.monotonic()
    assert score(box, HOSTILE[name], ADD_TESTS[:1]) == 0.0
    assert time.monotonic() - began < TIMEOUT + 3 + 5  # + the wait for the host's init to reap the killed
    assert stray_processes(range(box.uid_base, box.uid_base + 100)) == []
    assert not OUTSIDE_REPO.exists()


def test_isolation_settings_are_checked():
    with pytest.raises(ValueError, match="isolation must be auto or one of"):
        CodeSandbox(isolation="docker")
    if IS_ROOT:
        with pytest.raises(SandboxError, match="RLIMIT_NPROC does not bind root"):
            CodeSandbox(isolation="rlimits").isolation


# ---- the mbpp preset --------------------------------------------------------------------------------

MBPP = [
    {"task_id": 1, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n  return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 0"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 2, "text": "Write a function to reverse a string.", "code": "def rev(s):\r\n  return s[::-1]",
     "test_list": ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba'"],
     "test_setup_code": "", "challenge_test_list": []},
]


def test_the_mbpp_preset_brings_the_tests_column_to_the_code_reward(tmp_path, sandbox):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MBPP), encoding="utf-8")
    cfg = load_config("grpo", ["data=mbpp", f"data.path={path}", "data.eval_split=null", "data.eval_size=0"]).data
    assert cfg.format == "prompt" and dict(cfg.columns) == {"prompt": "text", "solution": "code", "tests": "test_list"}
    rows = load_rows(cfg, "prompt", "train", seed=0)
    assert rows[0]["prompt"] == MBPP[0]["text"] and rows[0]["tests"] == MBPP[0]["test_list"]
    assert rows[1]["solution"] == MBPP[1]["code"]
    prompt, from_chat = render_prompt(rows[0], None, cfg)
    assert not from_chat and MBPP[0]["text"] in prompt and "<answer>" in prompt
    # The reference solutions, answered the way the template asks, pass every test; a wrong one none.
    completions = [answer(row["solution"]) for row in rows] + [answer("def rev(s):\n  return None")]
    assert score_code(completions, [*rows["tests"], rows[1]["tests"]], sandbox) == [1.0, 1.0, 0.0]
