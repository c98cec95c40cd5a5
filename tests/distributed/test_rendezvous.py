"""A rank that never starts fails the run with a message naming who waited for whom, instead of a hang."""

import socket

from tests.integration.conftest import FAST, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_rank_fails_within_the_timeout_with_a_clear_message(tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = run_cli("sft", f"run.dir={tmp_path}/run", *FAST, "launcher.connect_timeout_s=3", env=env, check=False)
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error, proc.stderr[-2000:]
    assert "launcher.connect_timeout_s=3" in error[-1] and "rank 0 of 2" in error[-1]
    assert socket.gethostname() in error[-1] and "127.0.0.1" in error[-1]
