"""Structured configs: one dataclass per Hydra group, a docstring under every field.

The field docstrings are read back (``field_docs``) to generate ``docs/configuration.md`` and the CLI help,
so the reference cannot drift from the code. The same key means the same thing in every stage.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from rlhf.errors import ConfigError


class Choice(str, Enum):
    """A config value chosen from a fixed set. OmegaConf refuses any other value when the config is composed, and a
    member is its string: `member == "value"`, dict lookups by the value, f-strings, json and to_yaml all see the
    plain value. OmegaConf converts a string by member name, so every name equals its value."""

    # Python 3.10 to 3.12 disagree on str() and format() of a str-mixin member ("Cls.name" or the value).
    __str__ = str.__str__
    __format__ = str.__format__


def _choices(name: str, values: str) -> type[Choice]:
    """An Enum whose members are named by their values (`raise` is a keyword, so a class body could not hold it)."""
    return Choice(name, [(v, v) for v in values.split()], module=__name__)  # type: ignore[return-value]


# One Enum per set of choices; a key's docstring says what each choice does.
Dtype = _choices("Dtype", "fp32 bf16 fp16")
Task = _choices("Task", "arithmetic")
DataFormat = _choices("DataFormat", "auto prompt_completion messages gsm8k prompt preference hh_rlhf ranked")
DropOrError = _choices("DropOrError", "drop error")
LRScheduler = _choices("LRScheduler", "cosine linear constant")
RMLoss = _choices("RMLoss", "pairwise listwise")
RMScore = _choices("RMScore", "last_token sum")
OnRewardError = _choices("OnRewardError", "raise score")
RewardAPI = _choices("RewardAPI", "auto trl verl openrlhf")
Advantage = _choices("Advantage", "grpo rloo reinforce_pp")
ScaleRewards = _choices("ScaleRewards", "group batch none")
GRPOLossType = _choices("GRPOLossType", "grpo bnpo dapo dr_grpo")
RatioLevel = _choices("RatioLevel", "token sequence")
ZeroVariance = _choices("ZeroVariance", "keep skip resample")
RolloutEngine = _choices("RolloutEngine", "hf vllm")
KLEstimator = _choices("KLEstimator", "k1 k2 k3")
KLIn = _choices("KLIn", "reward loss")
PPOLossType = _choices("PPOLossType", "token_mean seq_mean_token_mean")
Truncation = _choices("Truncation", "terminal bootstrap")
DPOLossType = _choices("DPOLossType", "sigmoid robust hinge ipo simpo")
CriticInit = _choices("CriticInit", "auto reward_model policy")
RMInit = _choices("RMInit", "sft config")
PipelineStage = _choices("PipelineStage", "sft train_rm ppo grpo sft_control dpo")
ForcedStage = _choices("ForcedStage", " ".join(PipelineStage) + " all")  # pipeline.force: stages, or all of them


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory. Default: outputs/<stage>/<YYYY-mm-dd_HH-MM-SS>."""
    seed: int = 0
    """Seed for model init, data order, sampling and dropout."""
    resume: Any = False
    """false: start fresh; true: continue from the latest checkpoint in run.dir; a path: continue from that checkpoint."""
    overwrite: bool = False
    """Allow starting fresh in a run.dir that already holds a run (its contents are replaced)."""


@dataclass
class TinyModelConfig:
    """Architecture of the embedded Llama-style model built when model.name_or_path is null."""

    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (key/value heads are the same number)."""
    intermediate_size: int = 384
    """Width of the MLP."""
    max_position_embeddings: int = 256
    """Longest sequence the model is built for (prompt + response)."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the model a stage trains, in place of updating its weights."""

    r: int = 0
    """Rank of each adapter; 0 = off (every weight trains)."""
    alpha: float = 16.0
    """Scale: an adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on each adapter's input."""
    target_modules: Optional[List[str]] = None
    """Names of the layers that get an adapter (e.g. [q_proj, v_proj]); null: every linear layer but the output head (peft's all-linear)."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """Hugging Face hub id or local directory of a causal LM. null: build the embedded tiny model (model.tiny)."""
    tokenizer: Optional[str] = None
    """Tokenizer hub id or directory. null: the one beside the model (or the embedded character tokenizer)."""
    dtype: Dtype = Dtype.fp32
    """Parameter dtype: fp32, bf16 or fp16 (bf16/fp16 also switch DeepSpeed mixed precision on)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to transformers (eager, sdpa, flash_attention_2). null: transformers' default."""
    trust_remote_code: bool = False
    """Allow model code from the model's repository (needed by some hub models)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture of the embedded model."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters: model.lora.r=8 trains adapters on a frozen base (the reference of dpo, ppo and grpo is that base, adapters off: no second copy); a reward model's score head trains whole."""


@dataclass
class ArithmeticConfig:
    """The built-in arithmetic task: prompts like `47+38=`, answers `<think>...</think><answer>85</answer>`."""

    digits: int = 2
    """Digits per operand."""
    num_train: int = 300
    """Training rows (demonstrations for SFT, prompts for RL, pairs for reward modelling)."""
    num_eval: int = 200
    """Held-out rows, disjoint from the training ones."""
    wrong_rate: float = 0.0
    """Share of demonstrations whose answer is replaced by a wrong one."""
    carry_drop_rate: float = 0.7
    """Share of demonstrations that systematically drop carries (a flawed teacher)."""
    pairs_per_problem: int = 1
    """Preference pairs per training problem, each with a different kind of rejection (held-out problems keep one)."""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Hub dataset name, or a local .json/.jsonl/.parquet/.csv file or directory. null: the built-in task (data.task)."""
    task: Task = Task.arithmetic
    """Built-in task used when data.path is null."""
    subset: Optional[str] = None
    """Hub dataset configuration name (the second argument of datasets.load_dataset)."""
    split: str = "train"
    """Split used for training."""
    eval_split: Optional[str] = None
    """Split used for held-out evaluation. null: the built-in task's test set, or data.eval_size rows held out from the training split."""
    eval_size: Optional[int] = None
    """Rows held out from the training split when there is no eval_split. null: 10% of the rows, at least 1 and at
    most 200 (none from a one-row file), said in one line; 0: no held-out set; N: exactly N (an error if that leaves
    no training rows)."""
    format: DataFormat = DataFormat.auto
    """Row layout: auto, prompt_completion, messages, gsm8k, prompt, preference, hh_rlhf, ranked. auto: inferred from the columns."""
    columns: Dict[str, str] = field(default_factory=dict)
    """Column renames, canonical name -> name in the data, e.g. {prompt: question}."""
    prompt_template: str = "{prompt}"
    """Python format string wrapped around string prompts ({prompt} and any other column). Ignored for chat prompts."""
    chat_template: Optional[bool] = None
    """Render prompts with the tokenizer's chat template. null: only prompts given as message lists."""
    max_prompt_length: int = 64
    """Longest prompt in tokens."""
    max_length: int = 256
    """Longest prompt + response in tokens (longer training rows are truncated at the end)."""
    on_long_prompt: DropOrError = DropOrError.drop
    """What to do with prompts longer than max_prompt_length: drop (and count) or error."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    """Settings of the built-in arithmetic task."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    max_time_s: Optional[float] = None
    """Stop training after this many seconds of the training loop, then evaluate, save and export as at max_steps (a wall-clock budget: a scheduler slot, an equal-time control run); null = no limit."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_scheduler: LRScheduler = LRScheduler.cosine
    """Learning-rate shape after warm-up: cosine, linear or constant."""
    warmup_steps: int = 10
    """Steps of linear warm-up from 0 to trainer.lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of trainer.lr (cosine and linear)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off)."""
    micro_batch_size: int = 16
    """Rows per forward/backward pass on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    padding_free: bool = True
    """Run each micro-batch's rows as one packed sequence of their real tokens, each prompt once for the rows that continue it (a preference pair, a GRPO group): no work on padding, the same loss as padded rows. Every stage's training and log-prob passes (PPO's critic runs padded), on models with sdpa attention (transformers' default); others run padded."""
    group_by_length: bool = True
    """Sort each step's rows by length before cutting micro-batches, so they carry less padding; train-rm also runs each micro-batch's responses in up to 4 passes of similar length (not under ZeRO-3)."""
    eval_every: int = 50
    """Evaluate on the held-out set every N steps (0 = only at the end)."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in run.dir/checkpoints (older ones are deleted)."""
    log_every: int = 1
    """Write metrics every N steps."""


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    """Tokens generated per held-out prompt (greedy)."""
    batch_size: int = 100
    """Prompts per generation batch."""
    num_examples: Optional[int] = None
    """Held-out rows to score (null: all)."""


@dataclass
class DeepSpeedConfig:
    config: Dict[str, Any] = field(default_factory=dict)
    """DeepSpeed config fragment (zero_optimization, ...). Batch sizes, clipping, precision, optimizer and scheduler are filled in from the run config."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys merged last, over everything else."""


@dataclass
class LoggerConfig:
    wandb: bool = False
    """Also log to Weights & Biases (offline when WANDB_MODE=offline)."""
    project: str = "rlhf"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user)."""
    name: Optional[str] = None
    """wandb run name (default: the run directory's name)."""
    tags: List[str] = field(default_factory=list)
    """wandb tags."""
    progress: bool = True
    """Show a progress bar with live metrics."""


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    """Processes per node. Above 1 (or with a hostfile) the stage re-launches itself under the deepspeed launcher."""
    num_nodes: int = 1
    """Nodes to use from the hostfile."""
    hostfile: Optional[str] = None
    """DeepSpeed hostfile (`host slots=N` per line) for multi-node runs."""
    master_addr: Optional[str] = None
    """Address of rank 0 (multi-node)."""
    master_port: int = 29500
    """Port of rank 0."""
    include: Optional[str] = None
    """DeepSpeed --include filter, e.g. `host1:0,1@host2`."""
    dry_run: bool = False
    """Print the launch command and exit."""
    connect_timeout_s: float = 300.0
    """Seconds every process waits for the others to join before the run fails, naming this host and rank 0's address, instead of hanging in the first collective."""


@dataclass
class SFTAlgoConfig:
    loss_on_prompt: bool = False
    """Also train on prompt tokens (default: completion tokens only)."""


@dataclass
class RewardModelAlgoConfig:
    """How `rlhf train-rm` trains a Bradley-Terry reward model and how a sequence's score is read."""

    loss: RMLoss = RMLoss.pairwise
    """pairwise: Bradley-Terry -log sigmoid(r_chosen - r_rejected - margin), averaged over the ordered pairs of a ranked list (InstructGPT); listwise: Plackett-Luce NLL of the whole ranking. The two are equal for two responses."""
    score: Optional[RMScore] = None
    """Where a sequence's score comes from: last_token (the head's output at the last real token) or sum (a reward per response token, summed; Christiano et al. 2017). null: last_token for a new model, the saved choice of a trained one."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped, in [0, 0.5) (pairwise loss only)."""
    use_margin: bool = True
    """Subtract the data's per-pair `margin` column inside the sigmoid when present (Llama 2); false ignores it."""
    center_coef: float = 0.0
    """Weight of the centring term coef * (r_chosen + r_rejected)^2 that keeps rewards near 0 (0 = off)."""
    lm_coef: Optional[float] = None
    """Weight of a language-modelling loss on the best (chosen) response, read through the input embeddings as output head, added to the preference loss (the hidden-state regulariser of GRM, Yang et al. 2024). Its next-token targets teach the backbone the task's text densely, where a preference pair gives one bit. Needs a decoder backbone and ZeRO 0-2. null: 2.0 where it can run, else off (said at start); 0: off."""
    on_invalid: DropOrError = DropOrError.drop
    """Preference rows with identical or empty responses: drop (and count) or error."""
    stats_rows: Optional[int] = None
    """Training rows scored for the reward mean/std saved with the model for reward.normalize (null: all of them)."""


@dataclass
class GuardConfig:
    max_bad_steps: int = 3
    """Consecutive optimizer steps with a non-finite loss or gradient that are skipped (counted in guard/skipped) before the run stops with an error; 0 stops at the first."""


@dataclass
class StageConfig:
    stage: str = MISSING
    """Which stage this config drives (set by the entry config)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class SFTConfig(StageConfig):
    algo: SFTAlgoConfig = field(default_factory=SFTAlgoConfig)


@dataclass
class RewardTrainerConfig(TrainerConfig):
    """Trainer keys of train-rm."""

    shared_prefix: bool = True
    """Run each preference row's prompt once for all of its responses (chosen and rejected), its keys and values
    reused by each: the same scores and gradients for less work. For padded micro-batches only (trainer.padding_free
    shares the prompt itself). Off under ZeRO-3 (every forward is a collective there), with gradient checkpointing
    and for encoder classifiers."""


@dataclass
class TrainRMConfig(StageConfig):
    trainer: RewardTrainerConfig = field(default_factory=RewardTrainerConfig)
    algo: RewardModelAlgoConfig = field(default_factory=RewardModelAlgoConfig)


@dataclass
class RLTrainerConfig(TrainerConfig):
    """Trainer keys of the RL stages. Their micro-batches hold samples (prompt + response) and grad_accum is
    derived: (prompts_per_step / world size) x samples per prompt / mini-batches / micro_batch_size."""

    prompts_per_step: int = 16
    """Prompts per step over all processes (each sampled algo.group_size times in GRPO, algo.samples_per_prompt in PPO)."""
    shared_prefix: bool = True
    """Run a prompt that several samples of a micro-batch share (a GRPO group) once in the log-prob passes and the
    update, its keys and values reused by each sample: the same numbers for less work. For padded micro-batches only
    (trainer.padding_free shares the prompt itself). Off under ZeRO-3 (every forward is a collective there, and
    ranks could differ in how many they run) and with gradient checkpointing."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy (and critic) to 0, as TRL's disable_dropout: the rollout's old
    log-probs and the update's new ones then come from the same function, so the ratio is exactly 1 at the first
    update. false keeps the checkpoint's dropout in the update (the ratio then carries dropout noise)."""


@dataclass
class RolloutConfig:
    max_new_tokens: int = 64
    """Longest response sampled per prompt (responses that reach it without EOS are truncated)."""
    temperature: float = 1.0
    """Sampling temperature (also used for the log-probs of the update, so ratios are consistent)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    batch_size: int = 256
    """Sequences generated per generate() call."""
    seeded: bool = True
    """Draw each response from its own seed (run.seed, its position in the data stream, its index in the group),
    so the samples do not depend on batch size or the number of processes (resume on another process count sees
    the same ones); false = torch's sampler on the global RNG."""
    engine: RolloutEngine = RolloutEngine.hf
    """What samples the RL rollouts: hf (the policy itself, with a KV cache) or vllm (a vLLM engine in each process on
    its GPU, given the policy's weights after every update; `pip install 'rlhf[vllm]'`, for GPUs). Evaluation
    always decodes with the policy itself."""
    vllm_gpu_memory_utilization: float = 0.3
    """rollout.engine=vllm: share of the GPU's memory vLLM may take for its weights and KV cache (the rest is the
    training's)."""


@dataclass
class CodeSandboxConfig:
    """Limits of the sandboxed process each test of the `code` reward runs in."""

    timeout_s: float = 5.0
    """Wall-clock limit of one test program."""
    memory_mb: int = 1024
    """Address-space limit of one test program."""
    max_procs: int = 32
    """Most processes one test program may run (a fork bomb stops there)."""
    max_workers: Optional[int] = None
    """Test programs run at once; null = min(4, CPU count)."""


@dataclass
class RewardConfig:
    funcs: List[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions by registry name (accuracy, format) or dotted path `my_pkg.my_mod:my_reward`."""
    weights: List[float] = field(default_factory=lambda: [1.0, 0.2])
    """Weight of each function in the summed reward (same order as reward.funcs)."""
    on_error: OnRewardError = OnRewardError["raise"]
    """A reward function that raises: raise (stop with the function and sample named) or score (give error_score, count it)."""
    error_score: float = 0.0
    """Score of a sample whose reward function raised, when reward.on_error=score."""
    time_limit_s: float = 60.0
    """Longest a reward function may take for one batch of completions."""
    api: RewardAPI = RewardAPI.auto
    """How dotted-path reward functions are called, so TRL, veRL and OpenRLHF reward code runs unchanged: trl (f(prompts, completions, **columns) -> list), verl (compute_score(data_source, solution_str, ground_truth, extra_info) per completion), openrlhf (reward_func(queries, prompts, labels)), or auto (picked from each function's parameter names; trl when unsure). Built-in functions are unaffected."""
    model_path: Optional[str] = None
    """Reward model directory written by `rlhf train-rm` (or any one-label sequence classifier), scored by the
    function named `model` in reward.funcs (reward=model; mix with rules: reward.funcs=[model,format])."""
    normalize: bool = False
    """Standardise reward-model scores with the mean/std saved beside the model (an error if it has none)."""
    dense: bool = False
    """PPO: credit each response token with the reward model's per-token reward (a model trained with algo.score=sum, sharing the policy's tokenizer) instead of the whole score on the last token."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: responses longer than rollout.max_new_tokens - overlong_buffer tokens lose up
    to overlong_penalty, linearly over the buffer (0 = off)."""
    overlong_penalty: float = 1.0
    """Largest overlong penalty, reached at rollout.max_new_tokens."""
    code: CodeSandboxConfig = field(default_factory=CodeSandboxConfig)
    """Sandbox limits of the `code` reward."""


@dataclass
class GRPOAlgoConfig:
    group_size: int = 8
    """Responses sampled per prompt (G); advantages are normalised within each group."""
    advantage: Advantage = Advantage.grpo
    """Advantage estimator: grpo (group mean/std), rloo (leave-one-out baseline), reinforce_pp (batch whitening)."""
    scale_rewards: Optional[ScaleRewards] = None
    """Divide centred rewards by the std of the group, of the whole batch, or none (Dr. GRPO). null: the estimator's
    own default: group for grpo, none for rloo, batch for reinforce_pp (which takes batch or none)."""
    beta: float = 0.02
    """KL coefficient (the KL to the reference is a loss term). 0: no reference model is loaded at all."""
    kl_estimator: KLEstimator = KLEstimator.k3
    """KL estimator of the loss term: k3 (exp(-x) + x - 1, GRPO's) or k2 (half squared log-ratio). k1 is refused:
    as a loss term its gradient has zero mean and regularises nothing."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient: - entropy_coef x the policy's entropy at each response token is added to the
    loss (0 = off)."""
    epsilon: float = 0.2
    """Lower clip range of the ratio: clip(ratio, 1 - epsilon, ...)."""
    epsilon_high: Optional[float] = None
    """Upper clip range (DAPO's clip-higher); null = epsilon."""
    loss_type: GRPOLossType = GRPOLossType.dapo
    """Token-loss aggregation: grpo (per-response mean, then mean), bnpo (micro-batch token mean), dapo (token mean over the whole step), dr_grpo (sum / (responses x max_new_tokens))."""
    num_iterations: int = 1
    """Optimizer updates per batch of samples (mu); old log-probs are computed once and reused."""
    ratio_level: RatioLevel = RatioLevel.token
    """Importance ratio per token (PPO/GRPO) or per sequence (GSPO, length-normalised; the paper pairs it with
    loss_type=grpo and clip ranges epsilon=3e-4, epsilon_high=4e-4)."""
    mask_truncated: bool = False
    """Leave responses that hit rollout.max_new_tokens without EOS out of the loss (DAPO's overlong filtering)."""
    zero_variance: ZeroVariance = ZeroVariance.keep
    """Groups whose rewards all agree (std ~ 0) carry no signal: keep them (advantage 0), skip them from the loss, or resample (DAPO's dynamic sampling: sample more prompts until the step's groups all carry signal)."""
    resample_rounds: int = 4
    """zero_variance=resample: most extra sampling rounds per step; groups still short are filled with flat groups, skipped from the loss."""
    oversample: float = 1.0
    """zero_variance=resample: prompts drawn per sampling round as a multiple of trainer.prompts_per_step (veRL's gen_batch_size over its train batch): one larger generation call instead of several rounds; groups beyond the step's quota are not used."""


@dataclass
class PPOAlgoConfig:
    samples_per_prompt: int = 1
    """Responses sampled per prompt each step."""
    gamma: float = 1.0
    """Discount of GAE (1.0: a response is one undiscounted episode)."""
    lam: float = 0.95
    """GAE lambda: 1.0 = Monte-Carlo returns, 0.0 = one-step TD."""
    epsilon: float = 0.2
    """Lower clip range of the ratio: clip(ratio, 1 - epsilon, ...)."""
    epsilon_high: Optional[float] = None
    """Upper clip range; null = epsilon."""
    dual_clip: Optional[float] = None
    """Dual-clip bound c > 1 on -A * ratio for negative advantages (Ye et al. 2020); null = off."""
    value_clip: Optional[float] = 0.2
    """Clip range of the new values around the rollout's values in the value loss; null = unclipped."""
    vf_coef: float = 0.5
    """Weight of the value loss (the critic has its own optimizer; this scales its gradient)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off)."""
    kl_coef: float = 0.05
    """KL coefficient beta (the initial one when adaptive_kl is on)."""
    kl_in: KLIn = KLIn.reward
    """Where the KL to the reference goes: reward (per-token penalty in the reward, InstructGPT) or loss (a loss term, as GRPO)."""
    kl_estimator: KLEstimator = KLEstimator.k1
    """KL estimator: k1 (log-ratio), k2 (half squared log-ratio), k3 (exp(-x) + x - 1, non-negative). With
    kl_in=loss k1 is refused: as a loss term its gradient has zero mean and regularises nothing."""
    adaptive_kl: bool = False
    """Steer kl_coef towards kl_target (Ziegler et al. 2019's controller)."""
    kl_target: float = 6.0
    """Adaptive KL: target KL per response (summed over its tokens)."""
    kl_horizon: float = 10000.0
    """Adaptive KL: horizon in samples."""
    ppo_epochs: int = 1
    """Passes over each step's samples."""
    mini_batches: int = 1
    """Optimizer updates per pass (the step's samples split into this many mini-batches)."""
    loss_type: PPOLossType = PPOLossType.token_mean
    """Token-loss aggregation of the policy and value losses: token_mean (over the mini-batch's tokens) or seq_mean_token_mean (per response, then over responses)."""
    whiten_advantages: bool = True
    """Standardise advantages over the step's response tokens."""
    whiten_rewards: bool = False
    """Standardise the sequence scores over the step before the KL penalty is added."""
    reward_clip: Optional[float] = None
    """Clip sequence scores to [-reward_clip, reward_clip]; null = off."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit rollout.max_new_tokens without EOS."""
    truncation: Truncation = Truncation.terminal
    """terminal (default, as TRL, veRL and OpenRLHF): a response cut off by rollout.max_new_tokens is scored at its
    last generated token and ends there (V after it is 0); bootstrap: a cut response gets no score at the cut and its
    return continues with the critic's value of the state after its last token, a state the critic is trained near
    but never on (an extrapolation)."""


@dataclass
class CriticConfig:
    init: CriticInit = CriticInit.auto
    """Critic initialisation: reward_model (its backbone and head), policy (its backbone, a zero value head), or auto (reward_model when reward.model_path is set, else policy)."""
    lr: Optional[float] = None
    """Critic learning rate; null = trainer.lr."""
    warmup_steps: int = 0
    """Steps during which only the critic learns (the policy waits for useful values)."""


@dataclass
class DPOTrainerConfig(TrainerConfig):
    """Trainer keys of `rlhf dpo`. Its rows are preference pairs (a ranked list gives its best response against
    each other one)."""

    disable_dropout: bool = True
    """Set every dropout probability of the policy to 0 (as TRL's DPO): the reference's log-probs and the policy's
    are then the same function at the start, so every implicit reward starts at 0."""
    shared_prefix: bool = True
    """Run each pair's prompt once for its chosen and rejected responses (the same log-probs for less work). For
    padded micro-batches only (trainer.padding_free shares the prompt itself). Off under ZeRO-3 and with gradient
    checkpointing."""


@dataclass
class DPOAlgoConfig:
    """Direct preference optimisation and its relatives (rlhf.algos.dpo)."""

    loss_type: DPOLossType = DPOLossType.sigmoid
    """sigmoid (DPO, Rafailov et al. 2023; with label_smoothing: conservative DPO), robust (Chowdhury et al. 2024),
    hinge (SLiC), ipo (Azar et al. 2023), or simpo (reference-free, length-normalised: Meng et al. 2024; no
    reference model is loaded)."""
    beta: float = 0.1
    """Temperature of the implicit reward beta * (log pi - log pi_ref)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped, in [0, 0.5) (sigmoid, robust and simpo)."""
    simpo_gamma_beta_ratio: float = 0.5
    """simpo: the target margin gamma as a multiple of beta."""
    precompute_reference: bool = False
    """Compute the reference's log-probs of every training and held-out pair once, before the first step, keep them with the run (reference_logps.pt, read again on resume) and free the reference: one model in memory while training (TRL's precompute_ref_log_probs)."""
    on_invalid: DropOrError = DropOrError.drop
    """Preference rows with identical or empty responses: drop (and count) or error."""


@dataclass
class DPOConfig(StageConfig):
    trainer: DPOTrainerConfig = field(default_factory=DPOTrainerConfig)
    algo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)


@dataclass
class EvalStageConfig(StageConfig):
    algo: RewardModelAlgoConfig = field(default_factory=RewardModelAlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    """How a policy's greedy answers are scored (eval/reward; eval/reward/<name> per function when several)."""
    reference: Optional[str] = None
    """A policy's reference model directory (e.g. the SFT checkpoint): eval/kl is the exact KL(policy || reference) summed over each greedy answer (nats)."""


@dataclass
class PPOConfig(StageConfig):
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)


@dataclass
class GRPOConfig(StageConfig):
    trainer: RLTrainerConfig = field(default_factory=RLTrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)


@dataclass
class PipelineOptions:
    stages: List[PipelineStage] = field(default_factory=lambda: [PipelineStage[s] for s in ("sft", "train_rm", "ppo",
                                                                                             "grpo", "sft_control")])
    """Stages to run, in this order: sft, train_rm, ppo, grpo, sft_control (SFT continued from the SFT checkpoint for GRPO's wall time); dpo (DPO from the SFT checkpoint on the preference pairs) when listed."""
    force: List[ForcedStage] = field(default_factory=list)
    """Stages to run again even if finished ([all] for every one); stages that read a re-run stage run again too."""
    rm_init: RMInit = RMInit.sft
    """Where train-rm starts: sft (the SFT checkpoint's backbone, a new score head) or config (train_rm's own model.*)."""
    report: bool = True
    """Evaluate every policy checkpoint on the held-out set and write summary.json, report.md and report.html."""
    workers: Optional[int] = None
    """Stages (and the report's evaluations) run at once when they do not read each other's output, each in a
    process of its own with cores / workers torch threads, its output in <stage>/stage.log. 1: one after another in
    this process (always so under a multi-process launcher). null: 2 on a machine with 2 cores or more, else 1."""


@dataclass
class PipelineConfig:
    stage: str = "pipeline"
    """Always pipeline."""
    run: RunConfig = field(default_factory=RunConfig)
    """run.dir is the pipeline directory (each stage runs in a sub-directory); run.seed goes to every stage."""
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    recipe_stages: Dict[str, Any] = field(default_factory=dict)
    """The recipe's settings of each stage (conf/recipe/<recipe>.yaml, chosen with `recipe=demo` or `recipe=full`), keyed by stage; `common.*` and the stage's own section go on top of them."""
    common: Dict[str, Any] = field(default_factory=dict)
    """Overrides for every stage, as nested keys or dotted ones (`common.deepspeed: zero2`, `common.launcher.nproc_per_node: 2`)."""
    sft: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the sft stage (any key of `rlhf sft`, e.g. sft.trainer.max_steps=100)."""
    train_rm: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the train_rm stage."""
    ppo: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the ppo stage (its reward model is train_rm's; its policy starts from sft's)."""
    grpo: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the grpo stage (its policy starts from sft's)."""
    dpo: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the optional dpo stage (pipeline.stages=[sft,dpo]; its policy starts from sft's)."""
    sft_control: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the control: SFT from the SFT checkpoint on the same demonstrations, for GRPO's wall time."""
    report: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the held-out evaluation of every policy for the report (any key of `rlhf eval`)."""


STAGE_SCHEMAS: dict[str, type] = {"sft": SFTConfig, "train_rm": TrainRMConfig, "eval": EvalStageConfig, "grpo": GRPOConfig,
                                 "ppo": PPOConfig, "dpo": DPOConfig, "pipeline": PipelineConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for stage, schema in STAGE_SCHEMAS.items():
        cs.store(name=f"schema_{stage}", node=schema)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (the string literal after each annotated field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def conf_dir() -> Path:
    """conf/ inside an installed wheel (rlhf/conf), else the repository's top-level conf/."""
    packaged = Path(__file__).parent / "conf"
    if (packaged / "sft.yaml").exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def group_options() -> dict[str, list[str]]:
    """Config groups and their options, read from conf/ (for help texts and error messages)."""
    root = conf_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def load_config(stage: str, overrides: list[str]) -> DictConfig:
    """Compose conf/<stage>.yaml with Hydra overrides; every failure becomes one ConfigError line."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="rlhf"):
            cfg = compose(config_name=stage, overrides=list(overrides), return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
        _check_missing(cfg)
        _check_known(cfg, STAGE_SCHEMAS[stage])
        _weights_follow_funcs(cfg, overrides)
        _check_values(cfg)
        _check_combinations(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(exc, stage)) from None
    if choices.get("model") == "hf" and not cfg.model.name_or_path:
        raise ConfigError("model=hf needs model.name_or_path=<hub id or local directory>")
    return cfg


# Value ranges every stage shares: (key, test, what is expected). A stage checks its own algorithm's keys.
_RANGES = (
    ("trainer.lr", lambda v: v > 0, "> 0"),
    ("trainer.max_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.max_time_s", lambda v: v is None or v >= 0, ">= 0 or null"),
    ("trainer.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("trainer.max_grad_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    ("trainer.micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("trainer.grad_accum", lambda v: v >= 1, ">= 1"),
    ("trainer.eval_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("trainer.save_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("trainer.keep_last", lambda v: v >= 1, ">= 1"),
    ("trainer.prompts_per_step", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("model.lora.r", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("model.lora.alpha", lambda v: v > 0, "> 0"),
    ("model.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("guard.max_bad_steps", lambda v: v >= 0, ">= 0"),
    ("pipeline.workers", lambda v: v is None or v >= 1, ">= 1 or null"),
    ("launcher.connect_timeout_s", lambda v: v > 0, "> 0"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("rollout.temperature", lambda v: v > 0, "> 0"),
    ("algo.epsilon", lambda v: v > 0, "> 0 (the clip range)"),
    ("algo.group_size", lambda v: v >= 1, ">= 1"),
    ("algo.lm_coef", lambda v: v is None or v >= 0, ">= 0 (0 = off) or null"),
    ("algo.label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("algo.simpo_gamma_beta_ratio", lambda v: v >= 0, ">= 0"),
    ("algo.epsilon_high", lambda v: v is None or v > 0, "> 0 or null (= algo.epsilon)"),
    ("algo.dual_clip", lambda v: v is None or v > 1, "> 1 (a bound on -A x ratio) or null"),
    ("algo.value_clip", lambda v: v is None or v > 0, "> 0 or null (unclipped)"),
    ("rollout.vllm_gpu_memory_utilization", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("algo.entropy_coef", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("algo.beta", lambda v: v >= 0, ">= 0 (0 = no KL term)"),
    ("algo.kl_coef", lambda v: v >= 0, ">= 0 (0 = no KL penalty)"),
    ("algo.oversample", lambda v: v >= 1, ">= 1 (prompts drawn per round at least trainer.prompts_per_step)"),
    ("algo.num_iterations", lambda v: v >= 1, ">= 1"),
    ("algo.ppo_epochs", lambda v: v >= 1, ">= 1"),
    ("algo.mini_batches", lambda v: v >= 1, ">= 1"),
    ("algo.samples_per_prompt", lambda v: v >= 1, ">= 1"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    ("rollout.top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("reward.code.timeout_s", lambda v: v > 0, "> 0"),
    ("reward.code.memory_mb", lambda v: v > 0, "> 0"),
    ("reward.code.max_procs", lambda v: v > 0, "> 0"),
    ("reward.code.max_workers", lambda v: v is None or v >= 1, ">= 1 or null"),
)


def _check_values(cfg: DictConfig) -> None:
    for key, ok, expected in _RANGES:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if isinstance(value, str) and value == "<absent>":
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value}: expected {expected}")


def _overridden(overrides: list[str], key: str) -> bool:
    """Whether an override sets or deletes `key` (key=..., +key=..., ++key=..., ~key)."""
    return any(item.split("=", 1)[0].lstrip("+~") == key for item in overrides)


def _weights_follow_funcs(cfg: DictConfig, overrides: list[str]) -> None:
    """Weights the user did not set follow the functions: the reward group's weights were written for its own
    functions, so `reward.funcs=[...]` alone weighs each function 1.0 (TRL's default). Explicit weights are checked."""
    reward = cfg.get("reward")
    if not isinstance(reward, DictConfig):
        return
    if not reward.weights or (_overridden(overrides, "reward.funcs") and not _overridden(overrides, "reward.weights")):
        reward.weights = [1.0] * len(reward.funcs)
    if len(reward.weights) != len(reward.funcs):
        funcs, weights = ", ".join(map(str, reward.funcs)), ", ".join(map(str, reward.weights))
        raise ConfigError(f"reward.weights=[{weights}] gives {len(reward.weights)} weight(s) for the "
                          f"{len(reward.funcs)} functions of reward.funcs=[{funcs}]: set reward.weights with "
                          f"{len(reward.funcs)} values, one per function")


def _check_combinations(cfg: DictConfig) -> None:
    """Rules between keys that need no model or data."""
    a = cfg.get("algo")
    k1 = "k1 as a loss term has a zero-mean gradient and regularises nothing: use k3 or k2"
    if cfg.stage == "ppo":
        if a.kl_in == KLIn.loss and a.kl_estimator == KLEstimator.k1:
            raise ConfigError(f"algo.kl_in=loss with algo.kl_estimator=k1: {k1}")
        if a.adaptive_kl and (a.kl_coef <= 0 or a.kl_target <= 0 or a.kl_horizon <= 0):
            raise ConfigError(f"algo.adaptive_kl=true steers algo.kl_coef multiplicatively towards algo.kl_target "
                              f"over algo.kl_horizon: all three must be > 0, got kl_coef={a.kl_coef}, "
                              f"kl_target={a.kl_target}, kl_horizon={a.kl_horizon}")
        if cfg.reward.dense and a.truncation == Truncation.bootstrap:
            raise ConfigError("reward.dense=true spreads the score over the tokens, algo.truncation=bootstrap "
                              "withholds it at the cut: use algo.truncation=terminal with dense rewards")
    if cfg.stage == "dpo" and a.beta <= 0:
        raise ConfigError(f"algo.beta={a.beta}: DPO's implicit reward is beta * (log pi - log pi_ref), beta must be > 0")
    if cfg.stage == "grpo":
        if a.kl_estimator == KLEstimator.k1 and a.beta > 0:
            raise ConfigError(f"algo.kl_estimator=k1 with algo.beta={a.beta}: {k1} (or algo.beta=0 for no KL term)")
        if a.advantage == Advantage.reinforce_pp and a.scale_rewards == ScaleRewards.group:
            raise ConfigError("algo.scale_rewards=group with algo.advantage=reinforce_pp: REINFORCE++ normalises "
                              "over the batch; it supports algo.scale_rewards=batch or none (null: batch)")
        if a.advantage != Advantage.reinforce_pp and a.group_size < 2:
            raise ConfigError(f"algo.group_size={a.group_size} with algo.advantage={a.advantage}: group-relative "
                              "advantages need at least 2 responses per prompt (algo.group_size>=2, or "
                              "algo.advantage=reinforce_pp)")


def _check_missing(cfg: DictConfig, prefix: str = "") -> None:
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{full} is required: set it on the command line, e.g. `{full}=...`")
        value = cfg[key]
        if isinstance(value, DictConfig):
            _check_missing(value, f"{full}.")


def _check_known(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse keys the schema does not define: `+trainer.lrr=1e-4` would otherwise be added and silently ignored.
    Free-form mappings (Dict fields such as data.columns) take any key."""
    hints = typing.get_type_hints(schema)
    for key in cfg:
        full = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=3)
            hint = f" Did you mean {', '.join(f'{prefix}{c}' for c in close)}?" if close else ""
            under = f" under {prefix[:-1]!r}" if prefix else ""
            raise ConfigError(f"unknown config key {full!r}.{hint} Valid keys{under}: {', '.join(hints)}.")
        if dataclasses.is_dataclass(hints[key]) and isinstance(cfg[key], DictConfig):
            _check_known(cfg[key], hints[key], f"{full}.")


def _valid_keys(stage: str, parent: str) -> list[str]:
    node: Any = OmegaConf.structured(STAGE_SCHEMAS[stage])
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _explain(exc: Exception, stage: str) -> str:
    """Turn Hydra/OmegaConf exception text into one actionable line."""
    causes = [exc]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    text = "\n".join(str(c) for c in causes)
    full_key = next((c.full_key for c in causes if getattr(c, "full_key", None)), None) or _search(r"full_key: (\S+)", text)
    missing_option = _search(r"Could not find '([^']+)'", text)
    if missing_option and "/" in missing_option:
        group, option = missing_option.split("/", 1)
        options = group_options().get(group, [])
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return f"unknown option {option!r} for config group {group!r}.{hint} Valid: {', '.join(options)}."
    not_in = re.search(r"Key '([^']+)' (?:not in|is not in) '?([^'\n]*)'?", text)
    if full_key and (not_in or "not in struct" in text or "ConfigKeyError" in type(exc).__name__):
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys(stage, parent)
        close = difflib.get_close_matches(leaf, valid, n=3)
        hint = f" Did you mean {', '.join(f'{parent}.{c}'.lstrip('.') for c in close)}?" if close else ""
        listing = f" Valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}." if valid else ""
        return f"unknown config key {full_key!r}.{hint}{listing}"
    invalid = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", text)
    if invalid and full_key:
        value, valid = invalid.group(1), invalid.group(2).split(", ")
        close = difflib.get_close_matches(value, valid, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"{full_key}={value!r}: expected one of {', '.join(valid)}.{hint}"
    converted = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", text)
    if converted and full_key:
        return f"{full_key}: expected {converted.group(3).lower()}, got {converted.group(1)!r}."
    if isinstance(exc, OverrideParseException):
        return f"{text.splitlines()[0]}: overrides are key=value, group=option, +new.key=value or ~key."
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"{first}{f' (key {full_key})' if full_key and full_key not in first else ''}"


def _search(pattern: str, text: str) -> Optional[str]:
    match = re.search(pattern, text)
    return match.group(1) if match else None
