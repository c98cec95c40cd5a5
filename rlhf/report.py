"""The pipeline's report: every policy checkpoint scored the same way, a table, plots, and the demo's targets.

Every row of the table comes from one `rlhf eval` of that checkpoint on the same held-out prompts (greedy,
the same rule rewards, the exact KL to the SFT checkpoint on the same answers), so rows differ only in the
checkpoint. Wall times are the stages' own (summary.json of each stage); the total is the pipeline's, from its
start to the report (stages side by side count once).
"""

from __future__ import annotations

import base64
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from xml.etree.ElementTree import Element

import markdown
from markdown.treeprocessors import Treeprocessor
from omegaconf import DictConfig, OmegaConf

from rlhf.jobs import Job
from rlhf.plan import POLICIES, STAGES, Plan, as_overrides, eval_data_overrides, render_value
from rlhf.plotting import plot_against_time, plot_run

POLICY_KEYS = ("accuracy", "format_rate", "reward", "rm_score", "rm_auc", "kl", "response_length")
# summary.json keys of `rlhf eval` where they differ from the report's
EVAL_KEYS = {"rm_score": "reward/model", "rm_auc": "auc/model"}
# The targets of the embedded demo (the arithmetic task on a 2-core CPU), checked against what was measured.
DEMO_TARGETS = {"rm_accuracy": 0.95, "ppo_gain": 0.15, "grpo_gain": 0.30, "total_wall_s": 600.0}


def evaluation_jobs(plan: Plan, cfg: DictConfig, scheduled: Sequence[str] = ()) -> list[Job]:
    """`rlhf eval` of every policy checkpoint, finished or `scheduled` to run, against the SFT checkpoint, into
    <pipeline>/eval/<stage>, on the pipeline's data (the built-in task unless its `common`/`grpo` sections set
    another; `report.*` last). A scheduled policy's evaluation runs after it (and after the reward model, whose score
    it reports), so it can run beside the stages still training."""
    jobs = []
    for stage in POLICIES:
        if stage.name not in scheduled and not plan.finished(stage.name):
            continue
        after = tuple(s for s in (stage.name, "sft", "train_rm") if s in scheduled)
        jobs.append(Job(f"eval/{stage.name}", "eval", partial(_eval_overrides, stage.name, plan, cfg),
                        plan.root / "eval" / stage.name, after=after))
    return jobs


def _eval_overrides(stage: str, plan: Plan, cfg: DictConfig) -> list[str]:
    """An evaluation's overrides, computed when it starts (the reward model may have finished since the plan)."""
    overrides = [f"model.name_or_path={render_value(str(plan.final(stage)))}",
                 f"reference={render_value(str(plan.final('sft')))}",
                 f"run.dir={plan.root / 'eval' / stage}", "run.overwrite=true", f"run.seed={cfg.run.seed}"]
    overrides += eval_data_overrides(cfg)
    if plan.finished("train_rm"):  # the reward model's (normalised) score rides along with weight 0: reported, not summed
        overrides += ["reward.funcs=[accuracy,format,model]", "reward.weights=[1.0,0.2,0.0]",
                      f"reward.model_path={render_value(str(plan.final('train_rm')))}", "reward.normalize=true"]
    return overrides + as_overrides(OmegaConf.to_container(cfg.report))


def collect(plan: Plan) -> dict[str, dict[str, Any]]:
    """The pipeline's `stages` table: policy rows from their evaluation, the RM row and wall times from the stages."""
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        own = plan.summary(stage.name)
        if not own:
            continue
        row: dict[str, Any] = {}
        if not stage.is_policy:
            row["pairwise_accuracy"] = own.get("pairwise_accuracy")
        else:
            evaluated = _read(plan.root / "eval" / stage.name / "summary.json")
            source = evaluated or own
            for key in POLICY_KEYS:
                value = source.get(EVAL_KEYS.get(key, key))
                if value is not None:
                    row[key] = value
            row["steps"] = own.get("steps")
        row["wall_s"] = own.get("wall_s")
        stages[stage.name] = row
    return stages


def check_targets(stages: dict[str, dict[str, Any]], total_wall_s: float) -> list[dict[str, Any]]:
    """The embedded demo's targets, each with what was measured and whether it was met."""
    out = []

    def add(name: str, target: str, measured: float | None, ok: bool | None) -> None:
        out.append({"target": name, "wanted": target, "measured": measured, "met": ok})

    rm = stages.get("train_rm", {}).get("pairwise_accuracy")
    add("reward model held-out pairwise accuracy", f">= {DEMO_TARGETS['rm_accuracy']}", rm,
        None if rm is None else rm >= DEMO_TARGETS["rm_accuracy"])
    sft = stages.get("sft", {}).get("accuracy")
    for stage, key in (("ppo", "ppo_gain"), ("grpo", "grpo_gain")):
        acc = stages.get(stage, {}).get("accuracy")
        gain = None if acc is None or sft is None else acc - sft
        add(f"{stage.upper()} accuracy gain over SFT", f">= +{DEMO_TARGETS[key]:.2f}", gain,
            None if gain is None else gain >= DEMO_TARGETS[key] - 1e-9)
    control = stages.get("sft_control", {}).get("accuracy")
    grpo = stages.get("grpo", {}).get("accuracy")
    add("GRPO accuracy above the equal-time SFT control", "> control", None if grpo is None or control is None
        else grpo - control, None if grpo is None or control is None else grpo > control)
    add("pipeline wall time (s)", f"<= {DEMO_TARGETS['total_wall_s']:.0f}", round(total_wall_s, 1),
        total_wall_s <= DEMO_TARGETS["total_wall_s"])
    return out


def draw_plots(plan: Plan) -> list[Path]:
    """plots/<stage>.png (the curves that tell each stage's story) and plots/accuracy_vs_time.png."""
    out = []
    for stage in STAGES:
        if (plan.dir(stage.name) / "metrics.jsonl").is_file():
            path = plot_run(plan.dir(stage.name), keys=list(stage.curves),
                            out=plan.root / "plots" / f"{stage.name}.png", title=stage.label)
            if path is not None:
                out.append(path)
    runs = {s.label: plan.dir(s.name) for s in POLICIES if plan.dir(s.name).is_dir()}
    path = plot_against_time(runs, "eval/accuracy", plan.root / "plots" / "accuracy_vs_time.png",
                             "held-out greedy accuracy against training time")
    if path is not None:
        out.insert(0, path)
    return out


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if key not in ("wall_s", "response_length", "kl") else f"{value:.1f}" \
            if key != "kl" else f"{value:.2f}"
    return str(value)


def table(stages: dict[str, dict[str, Any]]) -> list[list[str]]:
    header = ["checkpoint", "held-out accuracy", "format rate", "mean reward", "RM score", "RM AUC", "KL to SFT (nats)",
              "response length", "steps", "wall s"]
    rows = [header]
    for stage in POLICIES:
        if stage.name in stages:
            r = stages[stage.name]
            rows.append([stage.label] + [_cell(r.get(k), k) for k in POLICY_KEYS] +
                        [_cell(r.get("steps")), _cell(r.get("wall_s"), "wall_s")])
    return rows


def render_markdown(stages, targets, plots: list[Path], root: Path, total_wall_s: float) -> str:
    rows = table(stages)
    lines = ["# rlhf pipeline report", "",
             f"Pipeline directory `{root}`; total wall time of the stages and evaluations {total_wall_s:.0f} s.", "",
             "Every policy row is the same greedy evaluation on the same held-out prompts; mean reward is the rule "
             "reward (accuracy + 0.2 x format); RM score is the reward model's normalised score of the same answers, "
             "RM AUC how often it scores a right answer of that policy above a wrong one (0.5: it cannot tell them "
             "apart, and a policy trained against it gains no more); "
             "KL is the exact KL to the SFT checkpoint summed over each answer.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if "train_rm" in stages:
        rm = stages["train_rm"]
        lines += ["", f"Reward model: held-out pairwise accuracy {_cell(rm.get('pairwise_accuracy'))}, "
                      f"{_cell(rm.get('wall_s'), 'wall_s')} s."]
    lines += ["", "## Targets of the embedded demo", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for t in targets:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['wanted']} | {_cell(t['measured'])} | {met} |")
    lines += ["", "## Curves", ""] + [f"![{p.stem}]({p.relative_to(root)})" for p in plots]
    return "\n".join(lines) + "\n"


class _EmbedImages(Treeprocessor):
    """Every image the page links to (plots/*.png, relative to the pipeline directory) inlined as a data: URI."""

    def __init__(self, md: markdown.Markdown, root: Path):
        super().__init__(md)
        self.root = root

    def run(self, tree: Element) -> None:
        for img in tree.iter("img"):
            path = self.root / img.get("src", "")
            if path.is_file():
                img.set("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode())


def render_html(markdown_text: str, root: Path) -> str:
    """report.md as a standalone page: its tables as HTML tables, its plots embedded (base64)."""
    md = markdown.Markdown(extensions=["tables"])
    md.treeprocessors.register(_EmbedImages(md, root), "embed_images", 0)  # after "inline" (20) makes the <img>s
    body = md.convert(markdown_text)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>rlhf pipeline report</title><style>{style}" \
           f"</style></head><body>{body}</body></html>\n"


def write_report(plan: Plan, cfg: DictConfig, echo: Callable[[str], None] = print, began: Optional[float] = None,
                 ran: Optional[dict[str, float]] = None, evaluations: Sequence[Job] = ()) -> dict[str, Any]:
    """Write summary.json, report.md, report.html and the plots from the stages' and `evaluations`' outputs. The
    total wall time is this invocation's, from `began` (the pipeline's start) to the report, plus the recorded wall
    time of the stages it skipped because they had finished before (`ran` names the ones it ran)."""
    began = time.time() if began is None else began
    stages = collect(plan)
    spans = [(j.began, j.began + j.wall_s) for j in evaluations if j.began]
    eval_s = max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0
    skipped = [s for s in plan.stages if s not in (ran or {}) and s in stages]
    total = time.time() - began + sum(float(stages[s].get("wall_s") or 0.0) for s in skipped)
    targets = check_targets(stages, total)
    plots = draw_plots(plan)
    summary = {"stages": stages, "targets": targets, "total_wall_s": round(total, 1), "eval_wall_s": round(eval_s, 1)}
    (plan.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    page = render_markdown(stages, targets, plots, plan.root, total)
    (plan.root / "report.md").write_text(page)
    (plan.root / "report.html").write_text(render_html(page, plan.root))
    echo("\n".join(line for line in page.splitlines() if line.startswith("|")))
    echo(f"pipeline: report in {plan.root / 'report.md'} (and report.html), summary in {plan.root / 'summary.json'}")
    return summary


def redraw(run_dir: Path) -> list[Path]:
    """`rlhf plot`: a pipeline directory gets its plots and report pages again; a stage's run dir its curves.png."""
    run_dir = Path(run_dir)
    if (run_dir / "pipeline.yaml").is_file():
        plan = Plan(run_dir, [])
        plots = draw_plots(plan)
        summary = _read(run_dir / "summary.json")
        if summary:
            page = render_markdown(summary["stages"], summary["targets"], plots, run_dir, summary["total_wall_s"])
            (run_dir / "report.md").write_text(page)
            (run_dir / "report.html").write_text(render_html(page, run_dir))
        return plots
    path = plot_run(run_dir)
    return [path] if path is not None else []
