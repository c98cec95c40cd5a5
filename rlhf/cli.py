"""The `rlhf` command: one sub-command per stage; extra arguments are Hydra overrides."""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import subprocess
import sys
from typing import Optional

import typer

from rlhf.errors import RLHFError

# stage -> (config name, trainer class, one-line description)
STAGES: dict[str, tuple[str, str, str]] = {
    "sft": ("sft", "rlhf.trainers.sft:SFTTrainer",
            "Supervised fine-tuning on demonstrations (the cold start before RL)."),
    "train_rm": ("train_rm", "rlhf.trainers.reward:RewardModelTrainer",
                 "Bradley-Terry reward model on preferences (pairs or ranked lists), saved as a sequence classifier."),
    "eval": ("eval", "rlhf.trainers.evaluate:Evaluator",
             "Score a saved checkpoint: a reward model's pairwise accuracy on preferences, or a policy's answers."),
    "ppo": ("ppo", "rlhf.trainers.ppo:PPOTrainer",
            "PPO against a reward model: critic (value head), GAE, clipped objective, KL to a frozen reference."),
    "grpo": ("grpo", "rlhf.trainers.grpo:GRPOTrainer",
             "Group Relative Policy Optimization: sampled groups, verifier/RM rewards, no critic."),
    "dpo": ("dpo", "rlhf.trainers.dpo:DPOTrainer",
            "Direct preference optimisation on preference pairs (sigmoid, robust, hinge, IPO, SimPO): no reward model."),
}

OVERRIDE_HELP = """
Any further arguments are Hydra overrides: `key=value` (trainer.lr=1e-4), `group=option` (deepspeed=zero2),
`+new.key=value`, `~key`. `--cfg job` prints the resolved config and exits.
"""

app = typer.Typer(help="RLHF from the command line: SFT, reward models, PPO and GRPO on DeepSpeed.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


@app.callback()
def _root() -> None:
    """RLHF from the command line: SFT, reward models, PPO and GRPO on DeepSpeed."""


def _groups_epilog() -> str:
    from rlhf.config import group_options

    lines = [f"  {group}: {', '.join(options)}" for group, options in group_options().items()]
    return "Config groups (choose with group=option):\n\n" + "\n\n".join(lines)


def _quiet_libraries() -> None:
    """Environment and log levels of torch, DeepSpeed, transformers and datasets; imports them (seconds), so it runs
    only once the config has composed and passed its checks."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "RANK" in os.environ


def launch_command(stage: str, cfg, overrides: list[str]) -> list[str]:
    """The deepspeed-launcher command that runs this stage on every process (each rank re-reads the config). The
    launcher runs on this interpreter, not a `deepspeed` from PATH: `.venv/bin/rlhf` works without activating the venv,
    and every rank runs the Python that holds this rlhf."""
    launcher = cfg.launcher
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(launcher.master_port)]
    if launcher.hostfile:
        cmd += ["--hostfile", launcher.hostfile, "--num_nodes", str(launcher.num_nodes)]
        if launcher.master_addr:
            cmd += ["--master_addr", launcher.master_addr]
        if launcher.include:
            cmd += ["--include", launcher.include]
    # --no_local_rank: ranks read LOCAL_RANK from the environment; the CLI takes no --local_rank flag.
    cmd += ["--num_gpus", str(launcher.nproc_per_node), "--no_local_rank", "--module", "rlhf.cli",
            stage.replace("_", "-")]
    return cmd + list(overrides) + [f"run.dir={cfg.run.dir}"]


def _print_config(cfg, print_cfg: str) -> None:
    from omegaconf import OmegaConf

    if print_cfg not in ("job", "all"):
        raise RLHFError(f"--cfg takes 'job' (the resolved config), got {print_cfg!r}")
    typer.echo(OmegaConf.to_yaml(cfg))


def run_stage(stage: str, overrides: list[str], print_cfg: Optional[str] = None) -> None:
    from rlhf.config import load_config

    config_name, target, _ = STAGES[stage]
    cfg = load_config(config_name, overrides)  # a config error answers here, before any heavy import
    if print_cfg is not None:
        return _print_config(cfg, print_cfg)
    _quiet_libraries()  # also before a launch: the ranks inherit DS_ACCELERATOR
    wants_launcher = cfg.launcher.nproc_per_node > 1 or cfg.launcher.hostfile
    if wants_launcher and not _under_launcher():
        from rlhf.trainers.base import default_run_dir

        if not cfg.run.dir:
            cfg.run.dir = default_run_dir(stage)
        cmd = launch_command(stage, cfg, overrides)
        typer.echo(shlex.join(cmd))
        if cfg.launcher.dry_run:
            return
        raise typer.Exit(subprocess.call(cmd))
    module_name, cls_name = target.split(":")
    trainer_cls = getattr(importlib.import_module(module_name), cls_name)
    trainer_cls(cfg).run()


def _register(stage: str) -> None:
    _, _, description = STAGES[stage]

    @app.command(stage.replace("_", "-"), help=f"{description}\n\n{OVERRIDE_HELP}", epilog=_groups_epilog(),
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def command(ctx: typer.Context,
                cfg: Optional[str] = typer.Option(None, "--cfg", help="Print the resolved config ('job') and exit.")):
        run_stage(stage, list(ctx.args), cfg)


for _stage in STAGES:
    _register(_stage)


@app.command("pipeline", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             help="The whole recipe: sft -> train-rm -> ppo -> grpo and an equal-time SFT control, each stage starting "
                  "from the previous one's final/, then report.md/report.html and summary.json in run.dir. Finished "
                  "stages are skipped on a re-run (pipeline.force=[stage] runs one again).\n\n"
                  "Overrides: pipeline.stages=[sft,grpo], common.<key>=... for every stage, <stage>.<key>=... for one "
                  "(grpo.trainer.max_steps=50, ppo.algo.kl_coef=0.1), report.<key>=... for the evaluation; "
                  "recipe=full for the longer recipe in place of the 10-minute demo (conf/recipe/).")
def pipeline(ctx: typer.Context,
             cfg: Optional[str] = typer.Option(None, "--cfg", help="Print the resolved config ('job') and exit.")):
    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline, section_overrides

    config = load_config("pipeline", section_overrides(list(ctx.args)))
    if cfg is not None:
        return _print_config(config, cfg)
    _quiet_libraries()
    from rlhf.engine.distributed import kept_alive
    from rlhf.jobs import default_workers

    main = os.environ.get("RANK", "0") == "0"  # under a launcher every rank runs the pipeline; one of them speaks
    # Under a launcher every rank runs each stage in this process, in step with the others; side by side only alone.
    workers = 1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else config.pipeline.workers or default_workers()
    with kept_alive():
        run_pipeline(config, run_stage, typer.echo if main else (lambda message: None), workers=workers)


@app.command("plot", help="Redraw the plots of a run directory (a stage's curves.png) or of a pipeline directory "
                          "(plots/*.png, report.md, report.html).")
def plot(run_dir: str = typer.Argument(..., help="A stage's run.dir or a pipeline's run.dir.")):
    from pathlib import Path

    from rlhf.report import redraw

    if not Path(run_dir).is_dir():
        raise RLHFError(f"{run_dir} is not a directory")
    written = redraw(Path(run_dir))
    if not written:
        raise RLHFError(f"{run_dir} has no metrics.jsonl (nor a pipeline's stage directories) to plot")
    for path in written:
        typer.echo(str(path))


def main() -> None:
    try:
        app()
    except RLHFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
