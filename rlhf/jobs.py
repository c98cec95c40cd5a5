"""Running the pipeline's stage commands: one after another in this process, or side by side in child processes.

Stages that do not read each other's output (the reward model and SFT; then PPO and GRPO) can run at the same
time. On a small CPU that pays: two processes of one thread each do more work than one process of two threads,
whose small matrix products spend much of their time waiting on each other. A job starts as soon as the jobs it
reads have finished and a worker is free, in the order given, so the order is the priority.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rlhf.errors import RLHFError

PROGRESS_EVERY_S = 30.0
"""Seconds between the progress lines that name each running job's step and its ETA."""


@dataclass
class Job:
    """One stage command: `rlhf <command> <overrides>`, writing into `run_dir`, after the jobs named in `after`."""

    name: str
    command: str
    overrides: Callable[[], list[str]]  # called when the job starts (it may read what earlier jobs wrote)
    run_dir: Path
    after: tuple[str, ...] = ()
    began: float = field(default=0.0, init=False)
    wall_s: float = field(default=0.0, init=False)


def default_workers() -> int:
    """Two side by side where there are two cores or more (what the stage graph can use), else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def progress(run_dir: Path, elapsed: float) -> str:
    """`step 120/300, eta 40 s` from a running job's config.yaml and the last line of its metrics.jsonl."""
    try:
        import yaml

        trainer = yaml.safe_load((run_dir / "config.yaml").read_text()).get("trainer", {})
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        step = int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, AttributeError):
        return "starting"
    limits = []
    if trainer.get("max_steps") and trainer["max_steps"] < 10 ** 6:
        limits.append(elapsed / step * (trainer["max_steps"] - step) if step else None)
    if trainer.get("max_time_s"):
        limits.append(max(trainer["max_time_s"] - elapsed, 0.0))
    known = [t for t in limits if t is not None]
    steps = f"step {step}/{trainer['max_steps']}" if trainer.get("max_steps", 10 ** 6) < 10 ** 6 else f"step {step}"
    return f"{steps}, eta {min(known):.0f} s" if known else steps


class Runner:
    """Runs jobs with `workers` at a time: in this process through `run_stage` when workers is 1 or the jobs can
    only run one after another (each reads the one before it), else each in a child process, its output in
    <run_dir>/stage.log.

    A child gets `threads` torch threads when that is set, else the cores shared among the jobs that can run when
    it starts (those running and those ready, at most `workers`): a job that can only run alone, as the SFT cold
    start that every other stage reads, gets every core, two that start together one half each."""

    def __init__(self, run_stage: Callable[[str, list[str]], Any], echo: Callable[[str], None], workers: int = 1,
                 threads: Optional[int] = None, cores: Optional[int] = None):
        self.run_stage, self.echo, self.workers, self.threads = run_stage, echo, max(1, workers), threads
        self.cores = cores or os.cpu_count() or 1

    def threads_for(self, sharing: int) -> int:
        """Threads of a job that starts while `sharing` jobs (itself included) can run."""
        return self.threads or max(1, self.cores // max(1, min(self.workers, sharing)))

    def run(self, jobs: Sequence[Job]) -> None:
        # Jobs that can only run one at a time (one worker, or each job reading the one before it, as a lone stage
        # and its evaluation) run here, on every core, their output in the terminal.
        if self.workers == 1 or all(before.name in job.after for before, job in zip(jobs, jobs[1:])):
            for job in jobs:
                overrides = job.overrides()
                self.echo(f"pipeline: {job.name}: rlhf {job.command.replace('_', '-')} {' '.join(overrides)}")
                job.began = time.time()
                self.run_stage(job.command, overrides)
                job.wall_s = time.time() - job.began
            return
        self._side_by_side(list(jobs))

    def _side_by_side(self, jobs: list[Job]) -> None:
        names = {j.name for j in jobs}
        pending, running, done = list(jobs), {}, set()
        last_report = time.time()
        try:
            while pending or running:
                ready = [j for j in pending if all(a in done or a not in names for a in j.after)]
                sharing = len(running) + len(ready)
                for job in ready:
                    if len(running) >= self.workers:
                        break
                    pending.remove(job)
                    running[job.name] = (job, self._start(job, self.threads_for(sharing)))
                if not running:  # pending jobs that wait on one outside the run: never happens from the pipeline
                    raise RLHFError(f"pipeline: nothing can start: {[(j.name, j.after) for j in pending]}")
                for name, (job, (proc, log)) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del running[name]
                    job.wall_s = time.time() - job.began
                    if proc.returncode != 0:
                        raise RLHFError(f"pipeline stage {name} failed (exit {proc.returncode}) after "
                                        f"{job.wall_s:.0f} s: {last_error(job.run_dir / 'stage.log')} (its output: "
                                        f"{job.run_dir / 'stage.log'})")
                    done.add(name)
                    self.echo(f"pipeline: {name} finished in {job.wall_s:.0f} s")
                if running and time.time() - last_report >= PROGRESS_EVERY_S:
                    last_report = time.time()
                    self.echo("pipeline: " + "; ".join(f"{n} {progress(j.run_dir, time.time() - j.began)}"
                                                       for n, (j, _) in running.items()))
                time.sleep(0.5)
        finally:
            for job, (proc, log) in running.values():  # a failure or Ctrl-C stops the others: they can resume
                proc.terminate()
                proc.wait()
                log.close()

    def _start(self, job: Job, threads: int):
        overrides = job.overrides()
        job.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo(f"pipeline: {job.name} started ({threads} thread(s), output in {job.run_dir / 'stage.log'}): "
                  f"rlhf {job.command.replace('_', '-')} {' '.join(overrides)}")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1"}
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)  # each child is a world of its own
        log = open(job.run_dir / "stage.log", "w")
        job.began = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", job.command.replace("_", "-"), *overrides],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        return proc, log


def last_error(log: Path) -> str:
    """The `error: ...` line a failed stage printed, else its last line."""
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["no output"])[-1]
