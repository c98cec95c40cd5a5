"""Throughput of every stage (sft, train-rm, dpo, ppo, grpo) on one fixed workload, side by side with TRL.

    .venv/bin/python scripts/bench.py [--steps 6 --batch 32 --prompts 8 --group 8 --dtype bf16 ...] [--no-trl]
    .venv/bin/python scripts/bench.py --stages dpo,grpo   # a subset (default: all five)

Every stage runs in its own process on the same saved model directory and the same synthetic data, so the peak RSS
reported is that stage's alone. Our phase times come from the stage's own metrics.jsonl (time/generate_s,
time/logprob_s, time/reward_s, time/train_s); TRL's from timers around its trainers' own methods. Model FLOP
utilisation divides the model's FLOPs (`forward_flops`) by the time and by a large matmul timed in the same run.
Each stage's settings that decide what is measured (gradient checkpointing, padding-free rows, the reward model's
language-modelling term, dynamic sampling, the reference precompute, ...) come from one table, `settings`, that our
command, TRL's config and the check for differences all read: a setting that differs between the two (by default,
or through --override) is printed as a warning and recorded in bench.json.
Writes <out>/bench.json and prints the table; docs/performance.md explains every column.

    .venv/bin/python scripts/bench.py --config-latency [--rounds 5]

times how long a config error takes to answer (it should not wait for torch to import) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

STAGES = ("sft", "train-rm", "dpo", "ppo", "grpo")
PHASES = ("generate", "logprob", "reward", "train")
TRL_STAGES = ("sft", "train-rm", "dpo", "grpo")  # TRL 1.x ships no PPO trainer
RL_STAGES = ("ppo", "grpo")
PAIR_STAGES = ("train-rm", "dpo")  # a sample is a preference pair: chosen and rejected both run
DATA = {"sft": "sft", "train-rm": "prefs", "dpo": "prefs"}  # the data kind of each stage (the rest: prompts)
EVAL_ROWS = 8  # held out for our stages' final evaluation, which runs after the timed steps


@dataclass
class Workload:
    """What every implementation runs; one token per character with the embedded tokenizer."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    batch: int = 32  # sft rows, train-rm / dpo pairs per step, and the RL micro-batch
    prompts: int = 8  # RL prompts per step (PPO: prompts x group prompts of one sample each)
    group: int = 8  # GRPO samples per prompt
    prompt_len: int = 16
    prompt_len_min: int = 0  # > 0 (at least 6): each prompt's length uniform in [prompt_len_min, prompt_len]
    response_len: int = 32  # SFT / RM response tokens (EOS added), RL max_new_tokens
    response_len_min: int = 0  # > 0: each SFT / RM response's length uniform in [response_len_min, response_len]
    steps: int = 6
    warmup: int = 1  # first steps left out of the averages (lazy initialisation, allocator growth)
    dtype: str = "fp32"  # or bf16 (mixed precision in both implementations)
    lr: float = 1e-4
    kl_coef: float = 0.02  # GRPO beta and PPO kl_coef: both load and run a frozen reference
    dpo_beta: float = 0.1  # DPO's beta (ours and TRL's default); DPO always runs a frozen reference
    vocab_size: int = 0  # above the tokenizer's 107: the model's embedding and output head padded to this many rows
    seed: int = 0

    @property
    def samples(self) -> int:
        """RL responses per step."""
        return self.prompts * self.group

    @property
    def micro(self) -> int:
        return min(self.batch, self.samples)

    @property
    def mean_prompt_len(self) -> float:
        return (self.prompt_len + (self.prompt_len_min or self.prompt_len)) / 2

    @property
    def supervised_response_len(self) -> float:
        """Mean SFT / RM response tokens, EOS included."""
        return (self.response_len + (self.response_len_min or self.response_len)) / 2 + 1


# ---- model FLOPs ----------------------------------------------------------------------------------------------
def matmul_params(w: Workload, head_outputs: int) -> int:
    """Weights that multiply every token (norms and the embedding lookup do not): q, k, v, o and the SwiGLU MLP's
    three matrices per layer, and the output head (the tied embedding of a causal LM, one score for a reward model)."""
    d = w.hidden_size
    return w.num_layers * (4 * d * d + 3 * d * w.intermediate_size) + d * head_outputs


def forward_flops(params: int, layers: int, hidden: int, seq_len: float) -> float:
    """One forward pass over a sequence: 2 FLOPs (multiply, add) per weight per token, plus attention's scores and
    weighted sum, 2 x 2 x hidden per layer for each position a token attends to (t positions for token t, causal).
    Backward costs twice the forward (Kaplan et al. 2020, PaLM appendix B); a KV-cached generation of a sequence
    costs one forward of it."""
    return 2 * params * seq_len + 2 * layers * hidden * seq_len * (seq_len + 1)


def step_flops(stage: str, w: Workload, vocab: int, response_len: float) -> dict[str, float]:
    """Model FLOPs of one step by phase (padding not counted); response_len: the mean generated length (RL) or
    the mean response length with its EOS (SFT, RM)."""
    lm, rm = matmul_params(w, vocab), matmul_params(w, 1)

    def fwd(params: int, n: float) -> float:
        return forward_flops(params, w.num_layers, w.hidden_size, n)

    if stage == "sft":
        return {"train": 3 * w.batch * fwd(lm, w.mean_prompt_len + response_len)}
    if stage == "train-rm":  # chosen and rejected each go through the model
        return {"train": 3 * 2 * w.batch * fwd(rm, w.mean_prompt_len + response_len)}
    if stage == "dpo":  # chosen and rejected through the policy (forward and backward) and the frozen reference
        responses = 2 * w.batch * fwd(lm, w.mean_prompt_len + response_len)
        return {"logprob": responses, "train": 3 * responses}
    seq, n = w.mean_prompt_len + response_len, w.samples
    reference = n * fwd(lm, seq) if w.kl_coef else 0.0
    if stage == "grpo":  # one pass per step: the old log-probs are the current ones, not recomputed
        return {"generate": n * fwd(lm, seq), "logprob": reference, "train": 3 * n * fwd(lm, seq)}
    # PPO: old log-probs of the policy and values of the critic (a one-score model) too; both models train
    return {"generate": n * fwd(lm, seq), "logprob": reference + n * (fwd(lm, seq) + fwd(rm, seq)),
            "train": 3 * n * (fwd(lm, seq) + fwd(rm, seq))}


def matmul_peak(device: str, dtype: str, size: Optional[int] = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` square matmuls: the ceiling MFU is measured against."""
    import torch

    size = size or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=torch_dtype(dtype)) for _ in range(2))
    inner = 10 if device == "cuda" else 1  # GPU kernels are too short to time one by one
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        began = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - began) / inner)
    return 2 * size ** 3 / best


def model_rates(model_dir: str, w: Workload, vocab: int, device: str, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of the workload's model in a plain Hugging Face forward pass without gradient, and in a forward and
    backward pass, over one micro-batch of prompt + response tokens: the rates each stage's floor is counted at."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    length = w.prompt_len + w.response_len
    ids = torch.randint(vocab, (w.micro, length), device=device)
    flops = w.micro * forward_flops(matmul_params(w, vocab), w.num_layers, w.hidden_size, length)
    autocast = torch.autocast(device, dtype=torch_dtype(w.dtype), enabled=w.dtype != "fp32")

    def best(work) -> float:
        fastest = float("inf")
        for _ in range(repeats + 1):  # the first one warms up
            sync(device)
            began = time.perf_counter()
            work()
            sync(device)
            fastest = min(fastest, time.perf_counter() - began)
        return fastest

    with autocast:
        with torch.no_grad():
            forward = best(lambda: model(input_ids=ids).logits)
        train = best(lambda: model(input_ids=ids, labels=ids).loss.backward())
    return {"forward": flops / forward, "train": 3 * flops / train}


def floor_s(flops: dict[str, float], rates: dict[str, float]) -> float:
    """A step's floor: each phase's model FLOPs at the rate a plain batched pass reaches on this machine (training
    at the forward-and-backward rate; generation, log-prob and value passes at the forward rate, as if decoding
    token by token cost no more than one pass over the whole sequence)."""
    return sum(f / (rates["train"] if phase == "train" else rates["forward"]) for phase, f in flops.items())


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- inputs: one model directory, one data set per kind ---------------------------------------------------------
def synthetic_rows(n: int, w: Workload) -> dict[str, list[dict]]:
    """Prompts `0...47+38=` of prompt_len characters, or of a length uniform in [prompt_len_min, prompt_len] drawn
    for each prompt (answer 85, for the accuracy reward), and responses of
    response_len random digits, or of a length uniform in [response_len_min, response_len] drawn for each response
    (chosen and rejected alike); what the responses say does not matter to a throughput benchmark."""
    if w.prompt_len < 6:
        raise SystemExit(f"--prompt-len {w.prompt_len}: prompts need at least 6 characters (`47+38=`)")
    rng = random.Random(w.seed)

    def digits() -> str:
        length = rng.randint(w.response_len_min, w.response_len) if w.response_len_min else w.response_len
        return "".join(rng.choice("0123456789") for _ in range(length))

    kinds: dict[str, list[dict]] = {"sft": [], "prefs": [], "prompts": []}
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"{a}+{b}=".rjust(rng.randint(w.prompt_len_min, w.prompt_len) if w.prompt_len_min else w.prompt_len,
                                   "0")
        kinds["sft"].append({"prompt": prompt, "completion": digits()})
        kinds["prefs"].append({"prompt": prompt, "chosen": digits(), "rejected": digits()})
        kinds["prompts"].append({"prompt": prompt, "answer": str(a + b)})
    return kinds


def write_inputs(out: Path, w: Workload) -> dict[str, Any]:
    """The tiny model and its tokenizer saved by the project's zoo, and one jsonl file per data kind."""
    from rlhf.config import ModelConfig, TinyModelConfig
    from rlhf.engine.checkpoint import save_pretrained
    from rlhf.models.zoo import load_policy, load_tokenizer

    arch = TinyModelConfig(hidden_size=w.hidden_size, num_layers=w.num_layers, num_heads=w.num_heads,
                           intermediate_size=w.intermediate_size,
                           max_position_embeddings=max(256, w.prompt_len + w.response_len + 1))
    cfg = ModelConfig(tiny=arch)
    tokenizer = load_tokenizer(cfg)
    model_dir = out / "model"
    model = load_policy(cfg, tokenizer, w.seed)
    if w.vocab_size > len(tokenizer):  # a hub model's vocabulary size, to see what memory and time do with it
        model.resize_token_embeddings(w.vocab_size)
    save_pretrained(model, tokenizer, model_dir)
    rows = max(w.steps * w.batch, w.steps * w.samples) + EVAL_ROWS
    paths = {}
    for kind, data in synthetic_rows(rows, w).items():
        paths[kind] = out / "data" / f"{kind}.jsonl"
        paths[kind].parent.mkdir(parents=True, exist_ok=True)
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in data))
    vocab = max(len(tokenizer), model.get_input_embeddings().num_embeddings)  # what the stages load: grown to fit
    return {"model": str(model_dir), "vocab": vocab, **{k: str(p) for k, p in paths.items()}}


# ---- the settings that decide what is measured, as each side is told them --------------------------------------
@dataclass(frozen=True)
class Setting:
    """One setting of a stage and the value each side runs with: ours through our config key `ours_key`, TRL's
    through its config field `trl_field`; a side without such a knob (None) always runs the value given."""

    name: str
    ours_key: Optional[str]
    ours: Any
    trl_field: Optional[str]
    trl: Any

    @property
    def differs(self) -> bool:
        return comparable(self.ours) != comparable(self.trl)


def comparable(value: Any) -> Any:
    """A value from the table or from an --override string, in one form: `false`, `False` and False alike."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "false"):
            return text == "true"
        if text in ("null", "none"):
            return None
        try:
            return float(text)
        except ValueError:
            return text
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def settings(stage: str, w: Workload, overrides: Sequence[str] = ()) -> list[Setting]:
    """`stage`'s settings that change what a step does or costs, ours beside TRL's: our command and TRL's config
    are built from this table, and the bench warns where the two sides' values differ. An --override of one of our
    keys replaces our value, so the warning sees it."""
    # Every stage of ours runs a micro-batch's rows as one sequence of their real tokens (trainer.padding_free, the
    # default; PPO's critic excepted). TRL's padding-free needs FlashAttention (SFT), is switched off in 1.16 (DPO)
    # or absent (reward, GRPO).
    table = [Setting("gradient checkpointing", "model.gradient_checkpointing", False, "gradient_checkpointing", False),
             Setting("padding-free rows", "trainer.padding_free", True,
                     "padding_free" if stage in ("sft", "dpo") else None, False)]
    if stage == "sft":
        table.append(Setting("packing rows into full-length sequences", None, False, "packing", False))
    if stage == "train-rm":  # TRL's reward loss is the Bradley-Terry one alone
        table.append(Setting("reward model's language-modelling term", "algo.lm_coef", 0.0, None, 0.0))
    if stage == "grpo":
        table += [Setting("dynamic sampling (resampling zero-variance groups)", "algo.zero_variance", "keep", None,
                          "keep"),
                  Setting("loss", "algo.loss_type", "dapo", "loss_type", "dapo"),
                  Setting("KL beta (a frozen reference when above 0)", "algo.beta", w.kl_coef, "beta", w.kl_coef)]
    if stage == "dpo":
        table += [Setting("loss", "algo.loss_type", "sigmoid", "loss_type", "sigmoid"),
                  Setting("beta", "algo.beta", w.dpo_beta, "beta", w.dpo_beta),
                  Setting("reference log-probs precomputed (else a frozen reference runs every step)",
                          "algo.precompute_reference", False, "precompute_ref_log_probs", False)]
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return [replace(s, ours=given[s.ours_key]) if s.ours_key in given else s for s in table]


def hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def differences(stage: str, table: list[Setting]) -> list[str]:
    """One warning line per setting whose value differs between ours and TRL's."""
    def side(key: Optional[str], value: Any) -> str:
        return f"{key}={hydra_value(value)}" if key else f"{hydra_value(value)} (no such setting)"

    return [f"{stage}: {s.name} differs: ours {side(s.ours_key, s.ours)}, TRL {side(s.trl_field, s.trl)}"
            for s in table if s.differs]


def settings_report(stages: Sequence[str], w: Workload, overrides: Sequence[str], with_trl: bool) -> dict[str, Any]:
    """bench.json's record of each stage's settings, both sides' values, and a warning for each one that differs
    where TRL runs the stage too."""
    tables = {stage: settings(stage, w, overrides) for stage in stages}
    return {"settings": {stage: [{**asdict(s), "differs": s.differs} for s in table]
                         for stage, table in tables.items()},
            "setting_warnings": [line for stage, table in tables.items() if with_trl and stage in TRL_STAGES
                                 for line in differences(stage, table)]}


# ---- our stages -----------------------------------------------------------------------------------------------
def our_command(stage: str, w: Workload, inputs: dict[str, Any], run_dir: Path,
                overrides: Sequence[str] = ()) -> list[str]:
    """`rlhf <stage>` on the workload: no evaluation or checkpoint inside the timed steps, constant learning rate,
    the settings table's values, then the user's overrides."""
    p, r = w.prompt_len, w.response_len
    args = [f"run.dir={run_dir}", "run.overwrite=true", f"run.seed={w.seed}",
            f"model.name_or_path={inputs['model']}", f"model.dtype={w.dtype}",
            "data=local", f"data.path={inputs[DATA.get(stage, 'prompts')]}", f"data.eval_size={EVAL_ROWS}",
            f"data.max_prompt_length={p}", f"data.max_length={p + r + 1}", f"trainer.max_steps={w.steps}",
            f"trainer.lr={w.lr}",
            "trainer.lr_scheduler=constant", "trainer.warmup_steps=0", "trainer.weight_decay=0",
            "trainer.eval_every=0", "trainer.save_every=0", f"eval.num_examples={EVAL_ROWS}",
            f"eval.max_new_tokens={r}", "logger.progress=false"]
    args += [f"{s.ours_key}={hydra_value(s.ours)}" for s in settings(stage, w, overrides) if s.ours_key]
    if stage in ("sft", *PAIR_STAGES):
        args += [f"trainer.micro_batch_size={w.batch}", "trainer.grad_accum=1"]
    if stage == "train-rm":
        args.append(f"algo.stats_rows={EVAL_ROWS}")
    if stage in RL_STAGES:
        args += [f"trainer.micro_batch_size={w.micro}", f"rollout.max_new_tokens={r}",
                 f"rollout.batch_size={w.samples}"]
    if stage == "grpo":
        args += [f"trainer.prompts_per_step={w.prompts}", f"algo.group_size={w.group}", "algo.num_iterations=1"]
    if stage == "ppo":
        args += [f"trainer.prompts_per_step={w.samples}", "algo.samples_per_prompt=1", "algo.ppo_epochs=1",
                 "algo.mini_batches=1", f"algo.kl_coef={w.kl_coef}"]
    return [sys.executable, "-m", "rlhf.cli", stage, *args, *overrides]


def run_child(argv: list[str], log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run argv to its end, output to log_path: its exit code, peak RSS (MiB), wall seconds, and the share of the
    machine's CPU time that other processes took meanwhile (what makes a shared machine's numbers noisy)."""
    began, busy = time.perf_counter(), busy_cpu_s()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4 gives this child's own peak; RUSAGE_CHILDREN would be the maximum over every child so far.
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    others = busy_cpu_s() - busy - usage.ru_utime - usage.ru_stime
    return {"exit_code": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: ru_maxrss is in KiB
            "wall_s": wall, "others_cpu": max(others, 0.0) / (wall * (os.cpu_count() or 1))}


def busy_cpu_s() -> float:
    """Seconds all CPUs have been busy since boot (Linux /proc/stat; 0 where there is none)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def step_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """The training steps of a metrics.jsonl (evaluation rows carry no samples_seen)."""
    if not metrics_path.exists():
        return []
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "samples_seen" in r and "time/step_s" in r]


# ---- config-error latency -----------------------------------------------------------------------------------
CONFIG_ERROR = ("grpo", "algo.loss_type=nope")  # a typo in a choice: the config composes, then is refused


def median_wall_s(argv: list[str], runs: int, expect_exit: int = 0) -> float:
    """Median wall seconds of `argv` over `runs` runs. Another exit code is an error: what ran is not what was meant
    to be timed."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - began)
        if proc.returncode != expect_exit:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}, expected {expect_exit}:\n"
                             f"{proc.stderr[-2000:]}")
    return statistics.median(times)


def config_latency(runs: int = 5) -> dict[str, float]:
    """How long a config error takes to answer, beside the import of torch alone (what it should not wait for)."""
    return {"config_error_s": median_wall_s([sys.executable, "-m", "rlhf.cli", *CONFIG_ERROR], runs, expect_exit=2),
            "import_torch_s": median_wall_s([sys.executable, "-c", "import torch"], runs)}


# ---- summary ------------------------------------------------------------------------------------------------
def summarise(stage: str, impl: str, rows: list[dict[str, Any]], w: Workload, vocab: int,
              peak_flops: float, rates: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Per-step means over the steps after the warm-up: throughput, phase seconds, FLOPs, MFU and, given the
    measured model rates, the step's floor."""
    timed = rows[w.warmup:] or rows

    def mean(key: str) -> float:
        return statistics.fmean(float(r.get(key, 0.0)) for r in timed)

    step_s = mean("time/step_s")
    phase_s = {p: mean(f"time/{p}_s") for p in PHASES}
    if stage in RL_STAGES:
        response = mean("response/length_mean")
        samples, seq = w.samples, w.mean_prompt_len + response
        generated, trained = samples * response, samples * seq
    else:
        phase_s["train"] = step_s  # a supervised step is all training
        response = w.supervised_response_len
        seq = w.mean_prompt_len + response
        samples, generated = w.batch, 0.0
        trained = w.batch * seq * (2 if stage in PAIR_STAGES else 1)
    phase_s["other"] = max(step_s - sum(phase_s.values()), 0.0)
    flops = step_flops(stage, w, vocab, response)
    floor = floor_s(flops, rates) if rates else None
    return {"floor_s": floor, "step_over_floor": step_s / floor if floor else None,
            "stage": stage, "impl": impl, "steps_timed": len(timed), "step_s": step_s, "phase_s": phase_s,
            "samples_per_s": samples / step_s,
            "gen_tokens_per_s": generated / phase_s["generate"] if phase_s["generate"] else None,
            "train_tokens_per_s": trained / phase_s["train"] if phase_s["train"] else None,
            "response_len_mean": response, "flops_per_step": sum(flops.values()),
            "mfu": sum(flops.values()) / step_s / peak_flops,
            "train_mfu": flops["train"] / phase_s["train"] / peak_flops if phase_s["train"] else None}


RATIO_KEYS = ("samples_per_s", "gen_tokens_per_s", "train_tokens_per_s", "peak_rss_mb", "mfu")


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ours / TRL per stage for every key both measured (above 1: ours is faster, or uses more memory). With several
    rounds, the median over rounds of each round's ratio: ours and TRL of one round ran back to back, so a machine
    that speeds up or slows down between rounds moves both."""
    by = {(r["stage"], r["impl"], r.get("round", 0)): r for r in results if "error" not in r}
    out = {}
    for stage in STAGES:
        per_round: dict[str, list[float]] = {}
        for (s, impl, n), ours in by.items():
            trl = by.get((stage, "trl", n))
            if s != stage or impl != "ours" or not trl:
                continue
            for k in RATIO_KEYS:
                if ours.get(k) and trl.get(k):
                    per_round.setdefault(k, []).append(ours[k] / trl[k])
        if per_round:
            out[stage] = {k: statistics.median(v) for k, v in per_round.items()}
    return out


def median_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per stage and implementation, the one of median seconds per step over its rounds (the table's row;
    bench.json keeps every round), with every round's samples/s beside it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["stage"], r["impl"]), []).append(r)
    out = []
    for runs in groups.values():
        done = sorted((r for r in runs if "error" not in r), key=lambda r: r["step_s"])
        if not done:
            out.append(runs[0])
            continue
        chosen = dict(done[(len(done) - 1) // 2])
        chosen["rounds_samples_per_s"] = [r["samples_per_s"] for r in runs if "error" not in r]
        out.append(chosen)
    return out


def fmt(value: Any, digits: int = 3) -> str:
    """`digits` significant digits, and whole numbers from there up (1,234 rather than 1.23e+03)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10 ** (digits - 1) else f"{value:.{digits}g}"
    return str(value)


def render_table(results: list[dict[str, Any]], ratio: dict[str, dict[str, float]]) -> str:
    """Markdown tables: one row per stage and implementation, then ours / TRL."""
    head = ["stage", "impl", "samples/s", "gen tok/s", "train tok/s", "s/step", "generate s", "logprob s",
            "reward s", "train s", "floor s", "x floor", "peak RSS MiB", "MFU %", "others' CPU %"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['impl']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        p = r["phase_s"]
        cells = [r["stage"], r["impl"], fmt(r["samples_per_s"]), fmt(r["gen_tokens_per_s"]),
                 fmt(r["train_tokens_per_s"]), fmt(r["step_s"]), *(fmt(p[k]) for k in PHASES),
                 fmt(r.get("floor_s")), fmt(r.get("step_over_floor")), fmt(r.get("peak_rss_mb"), 4), fmt(100 * r["mfu"], 2), fmt(100 * r.get("others_cpu", 0.0), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    if ratio:
        lines += ["", "| stage | " + " | ".join(f"{k} ours/TRL" for k in RATIO_KEYS) + " |",
                  "|" + " --- |" * (len(RATIO_KEYS) + 1)]
        for stage, values in ratio.items():
            cells = (f"{values[k]:.2f}" if k in values else "-" for k in RATIO_KEYS)
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> str:
    """bench.json (everything) and bench.md (the tables); returns the tables."""
    table = render_table(median_runs(report["results"]), report["ratios"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(table + "\n")
    return table


# ---- TRL: the same workload through its trainers, in a process of its own ----------------------------------------
def trl_worker(stage: str, spec_path: str) -> None:
    """Run `stage` with TRL as the spec says and write its steps in our metrics.jsonl layout."""
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from rlhf.rewards.rules import REWARD_FUNCS

    spec = json.loads(Path(spec_path).read_text())
    w, model, run_dir, device = Workload(**spec["workload"]), spec["model"], Path(spec["run_dir"]), spec["device"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    # as many rows as our stages train on (they hold EVAL_ROWS out for their final evaluation)
    rows = [json.loads(line) for line in Path(spec[DATA.get(stage, "prompts")]).read_text().splitlines()][EVAL_ROWS:]
    dataset = datasets.Dataset.from_list(rows)

    class Steps(TrainerCallback):
        """Wall time between optimizer-step ends, and the seconds spent in wrapped trainer methods during it."""

        def __init__(self):
            self.rows: list[dict[str, Any]] = []
            self.phase: dict[str, float] = {}
            self.last = time.perf_counter()

        def wrap(self, trainer, name: str, phase: str, only_without_grad: bool = False) -> None:
            method = getattr(trainer, name)

            def timed(*args, **kwargs):
                if only_without_grad and torch.is_grad_enabled():
                    return method(*args, **kwargs)
                began = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    sync(device)
                    self.phase[phase] = self.phase.get(phase, 0.0) + time.perf_counter() - began

            setattr(trainer, name, timed)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            now = time.perf_counter()
            row = {"step": state.global_step, "time/step_s": now - self.last,
                   **{f"time/{k}_s": v for k, v in self.phase.items()}}
            if "experience" in self.phase:  # training is what the step did besides making experience
                row["time/train_s"] = row["time/step_s"] - row.pop("time/experience_s")
            self.rows.append(row)
            self.phase, self.last = {}, now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs and self.rows:
                self.rows[-1]["response/length_mean"] = logs["completions/mean_length"]

    steps = Steps()
    common = dict(output_dir=str(run_dir), max_steps=w.steps, learning_rate=w.lr, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1,
                  save_strategy="no", report_to=[], bf16=w.dtype == "bf16", use_cpu=device == "cpu", seed=w.seed,
                  disable_tqdm=True, dataloader_num_workers=0,
                  **{s.trl_field: s.trl for s in settings(stage, w) if s.trl_field})
    supervised = dict(per_device_train_batch_size=w.batch, max_length=w.prompt_len + w.response_len + 1, **common)
    if stage == "sft":
        trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[steps],
                                 args=trl.SFTConfig(**supervised))
    elif stage == "train-rm":
        trainer = trl.RewardTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[steps],
                                    args=trl.RewardConfig(**supervised))
    elif stage == "dpo":  # the reference: a second copy of the model loaded from its directory, as ours loads one
        trainer = trl.DPOTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[steps],
                                 args=trl.DPOConfig(**supervised))
    else:
        # Our rule rewards take TRL's signature as they are; weights as conf/reward/rules.yaml.
        config = trl.GRPOConfig(per_device_train_batch_size=w.micro, gradient_accumulation_steps=w.samples // w.micro,
                                num_generations=w.group, max_completion_length=w.response_len, temperature=1.0,
                                top_p=1.0, epsilon=0.2, scale_rewards="group", num_iterations=1,
                                reward_weights=[1.0, 0.2], log_completions=False, **common)
        trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[steps],
                                  reward_funcs=[REWARD_FUNCS.get("accuracy"), REWARD_FUNCS.get("format")], args=config)
        steps.wrap(trainer, "_generate_and_score_completions", "experience")
        steps.wrap(trainer, "_generate", "generate")
        steps.wrap(trainer, "_calculate_rewards", "reward")
        steps.wrap(trainer, "_get_per_token_logps_and_entropies", "logprob", only_without_grad=True)
    trainer.train()
    samples = w.samples if stage == "grpo" else w.batch
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({**r, "samples_seen": r["step"] * samples}) + "\n" for r in steps.rows))


# ---- the run ----------------------------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = f"{models[0] if models else platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    return {"device": device, "device_name": name, "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "deepspeed", "trl", "accelerate"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Workload):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"default {f.default}")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (default: torch's, one per core); 1 keeps a CPU shared with "
                             "other work measurable, where several threads wait on each other's stolen time slices")
    parser.add_argument("--out", default=None, help="output directory (default outputs/bench/<timestamp>)")
    parser.add_argument("--no-trl", action="store_true", help="our stages only")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each stage this many times, ours and TRL alternating; the table shows each one's "
                             "median run and the median of the rounds' ratios (a noisy machine: 3 or more)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for our stages (repeatable), e.g. trainer.shared_prefix=false to "
                             "measure a fast path against its absence; a stage whose config lacks the key fails")
    parser.add_argument("--config-latency", action="store_true",
                        help=f"only time a config error (rlhf {' '.join(CONFIG_ERROR)}) against python -c 'import "
                             "torch', median of --rounds runs each (at least 3)")
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker, args.spec)
    if args.config_latency:
        latency = config_latency(max(args.rounds, 3))
        print(f"config error (rlhf {' '.join(CONFIG_ERROR)}): {latency['config_error_s']:.2f} s; "
              f"python -c 'import torch': {latency['import_torch_s']:.2f} s (medians)")
        return
    import importlib.util

    import torch

    w = Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if (unknown or w.dtype not in ("fp32", "bf16") or w.samples % w.micro or w.response_len_min > w.response_len
            or w.prompt_len_min > w.prompt_len or 0 < w.prompt_len_min < 6):
        raise SystemExit(f"bad arguments: stages must be among {STAGES}, dtype fp32 or bf16, the RL samples "
                         f"(prompts x group = {w.samples}) a multiple of min(batch, samples) = {w.micro}, "
                         f"--response-len-min at most --response-len, and --prompt-len-min 0 or in [6, --prompt-len]")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out or Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": device, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        torch.set_num_threads(args.threads)  # the matmul peak is measured with the stages' thread count
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    note = ("TRL skipped (--no-trl)" if args.no_trl else
            "TRL is not installed (pip install -e '.[bench]'): our stages only" if not with_trl else
            f"TRL {versions()['trl']} ships no PPO trainer: ppo is ours only" if "ppo" in stages else None)
    checked = settings_report(stages, w, args.override, with_trl)
    for line in checked["setting_warnings"]:
        print(f"WARNING: {line}", flush=True)

    peaks = {"fp32": matmul_peak(device, "fp32")}
    if w.dtype != "fp32":
        peaks[w.dtype] = matmul_peak(device, w.dtype)
    print(f"matmul peak on {device}: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    inputs = write_inputs(out, w)
    rates = model_rates(inputs["model"], w, inputs["vocab"], device)
    print(f"model rates: forward {rates['forward'] / 1e9:.1f}, forward+backward {rates['train'] / 1e9:.1f} GFLOP/s",
          flush=True)
    results = []
    for stage, n in ((stage, n) for stage in stages for n in range(max(args.rounds, 1))):
        impls = ["ours"] + (["trl"] if with_trl and stage in TRL_STAGES else [])
        for impl in impls:
            run_dir = out / impl / stage / (f"round{n + 1}" if args.rounds > 1 else "")
            run_dir.mkdir(parents=True, exist_ok=True)
            if impl == "ours":
                argv = our_command(stage, w, inputs, run_dir, args.override)
            else:
                spec = run_dir / "spec.json"
                spec.write_text(json.dumps({"workload": asdict(w), "run_dir": str(run_dir), "device": device,
                                            **inputs}))
                argv = [sys.executable, __file__, "--trl-worker", stage, "--spec", str(spec)]
            print(f"{stage} ({impl}{f', round {n + 1}' if args.rounds > 1 else ''}) ...", end=" ", flush=True)
            child = run_child(argv, run_dir / "log.txt", env)
            rows = step_rows(run_dir / "metrics.jsonl")
            if child["exit_code"] != 0 or not rows:
                result = {"stage": stage, "impl": impl,
                          "error": f"exit code {child['exit_code']}, see {run_dir / 'log.txt'}"}
            else:
                result = summarise(stage, impl, rows, w, inputs["vocab"], peaks[w.dtype], rates)
            result.update(child, run_dir=str(run_dir), round=n)
            print(result.get("error") or f"{child['wall_s']:.0f}s, other processes took "
                  f"{100 * child['others_cpu']:.0f}% of the CPUs", flush=True)
            results.append(result)
    report = {"machine": machine(device), "dtype": w.dtype, "versions": versions(),
              "matmul_peak_flops": peaks, "model_rates_flops": rates, "workload": asdict(w), "overrides": args.override,
              **checked, "note": note, "rounds": max(args.rounds, 1), "results": results, "ratios": ratios(results)}
    table = write_report(out, report)
    d = report["machine"]
    print(f"\n{d['device_name']} ({device}, threads per process: {d['torch_threads']}), {w.dtype}; "
          f"steps {w.warmup + 1}-{w.steps} of {w.steps} averaged")
    print(table)
    if note:
        print(f"\n{note}")
    for line in checked["setting_warnings"]:
        print(f"WARNING: {line}")
    print(f"\nwrote {out / 'bench.json'}")


if __name__ == "__main__":
    main()
