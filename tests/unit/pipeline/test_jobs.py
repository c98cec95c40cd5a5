"""The pipeline's job runner: side by side where the stage graph allows, never more than `workers` at once, a
failure named with its error line and the others stopped; in order in this process with one worker."""

import pytest

from rlhf import jobs
from rlhf.errors import RLHFError
from rlhf.jobs import Job, Runner

# polls each stage takes to finish, and the stages it reads (the pipeline's graph with rm_init=config)
DURATIONS = {"sft": 2, "train_rm": 6, "ppo": 3, "grpo": 3, "sft_control": 3}
AFTER = {"ppo": ("sft", "train_rm"), "grpo": ("sft",), "sft_control": ("sft", "grpo")}


class FakeProcesses:
    def __init__(self, fail=None):
        self.started, self.running, self.most, self.envs, self.fail, self.terminated = [], {}, 0, {}, fail, []

    def __call__(self, cmd, stdout, stderr, env):
        name = next(n for n in DURATIONS if f"run.dir=/r/{n}" in cmd)
        stdout.write("error: reward function 'x' raised\n" if name == self.fail else "ok\n")
        self.started.append(name)
        self.envs[name] = env
        fakes = self

        class Proc:
            polls, returncode = DURATIONS[name], None

            def poll(self):
                self.polls -= 1
                if self.polls <= 0:
                    self.returncode = 1 if name == fakes.fail else 0
                    fakes.running.pop(name, None)
                return self.returncode

            def terminate(self):
                fakes.terminated.append(name)

            def wait(self):
                return self.returncode

        self.running[name] = True
        self.most = max(self.most, len(self.running))
        return Proc()


def make_jobs(tmp_path):
    return [Job(n, "sft" if n == "sft_control" else n, (lambda n=n: [f"run.dir=/r/{n}"]), tmp_path / n,
                after=AFTER.get(n, ())) for n in DURATIONS]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    processes = FakeProcesses()
    monkeypatch.setattr(jobs.subprocess, "Popen", processes)
    return processes


def test_two_workers_run_independent_stages_side_by_side(tmp_path, fake):
    lines = []
    Runner(lambda *a: None, lines.append, workers=2, threads=1).run(make_jobs(tmp_path))
    # sft and the reward model at once; GRPO as soon as sft is done, its control after it; PPO after the RM
    assert fake.started == ["sft", "train_rm", "grpo", "sft_control", "ppo"]
    assert fake.most == 2 and fake.envs["grpo"]["OMP_NUM_THREADS"] == "1"
    assert sum("finished in" in line for line in lines) == 5
    assert (tmp_path / "grpo" / "stage.log").read_text() == "ok\n"


def test_a_failed_stage_is_named_with_its_error_and_the_others_stop(tmp_path, fake):
    fake.fail = "sft"
    with pytest.raises(RLHFError, match=r"pipeline stage sft failed \(exit 1\).*reward function 'x' raised"):
        Runner(lambda *a: None, lambda line: None, workers=2, threads=1).run(make_jobs(tmp_path))
    assert fake.terminated == ["train_rm"]


def test_one_worker_or_one_job_runs_in_this_process_in_order(tmp_path, fake):
    calls = []
    Runner(lambda command, overrides: calls.append(overrides[0]), lambda line: None).run(make_jobs(tmp_path))
    assert calls == [f"run.dir=/r/{n}" for n in DURATIONS]
    Runner(lambda command, overrides: calls.append(overrides[0]), lambda line: None, workers=2).run(
        make_jobs(tmp_path)[:1])
    assert calls[-1] == "run.dir=/r/sft" and fake.started == []
    # a chain (each job reads the one before it, as a lone stage and its evaluation) cannot run side by side either
    chain = [Job("grpo", "grpo", lambda: ["run.dir=/r/grpo"], tmp_path / "grpo"),
             Job("eval/grpo", "eval", lambda: ["run.dir=/r/eval"], tmp_path / "eval", after=("grpo",))]
    Runner(lambda command, overrides: calls.append(overrides[0]), lambda line: None, workers=2).run(chain)
    assert calls[-2:] == ["run.dir=/r/grpo", "run.dir=/r/eval"] and fake.started == []


def test_progress_reads_the_step_and_estimates_the_time_left(tmp_path):
    (tmp_path / "config.yaml").write_text("trainer:\n  max_steps: 100\n  max_time_s: null\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 25}\n')
    assert jobs.progress(tmp_path, elapsed=50.0) == "step 25/100, eta 150 s"
    (tmp_path / "config.yaml").write_text("trainer:\n  max_steps: 1000000\n  max_time_s: 80\n")
    assert jobs.progress(tmp_path, elapsed=50.0) == "step 25, eta 30 s"
    assert jobs.progress(tmp_path / "none", elapsed=1.0) == "starting"


def test_a_job_that_can_only_run_alone_gets_every_core(tmp_path, fake, monkeypatch):
    monkeypatch.setitem(AFTER, "train_rm", ("sft",))  # the reward model from the SFT checkpoint: sft runs alone
    Runner(lambda *a: None, lambda line: None, workers=2, cores=2).run(make_jobs(tmp_path))
    threads = {name: env["OMP_NUM_THREADS"] for name, env in fake.envs.items()}
    assert threads["sft"] == "2" and threads["train_rm"] == threads["grpo"] == "1"
    assert fake.most == 2
