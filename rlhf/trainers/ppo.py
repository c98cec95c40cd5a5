"""`rlhf ppo`: PPO with a critic, GAE and a KL penalty to a frozen reference (InstructGPT, arXiv:2203.02155;
Ziegler et al. 2019, arXiv:1909.08593; Schulman et al. 2017, arXiv:1707.06347).

Each step: sample responses, score them (reward model or rules), take log-probs of policy and reference and
values of the critic over the sampled tokens, shape per-token rewards (the score on the last real token, minus
the KL penalty when algo.kl_in=reward), GAE advantages and returns, then ppo_epochs passes of mini-batch updates
of the clipped policy loss and the clipped value loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.algos.advantages import gae
from rlhf.algos.aggregation import aggregate, masked_sum, masked_whiten, whiten
from rlhf.algos.kl import AdaptiveKLController, FixedKLController, kl_penalty
from rlhf.algos.policy import clipped_value_loss
from rlhf.algos.reward_shaping import cut_response_scores, kl_shaped_rewards, place_sequence_rewards
from rlhf.engine import checkpoint as ckpt
from rlhf.engine import distributed as dist
from rlhf.engine.engine import backward, build_engine, optimizer_step
from rlhf.errors import ConfigError
from rlhf.models.critic import build_critic
from rlhf.models.zoo import training_model_config
from rlhf.models.dropout import disable_dropout
from rlhf.rollout.experience import Experience, batched_logprobs, batched_values, response_values
from rlhf.trainers.rl import RLTrainer, Samples
from rlhf.trainers.step_stats import PPOStepStats


class PPOTrainer(RLTrainer):
    stage = "ppo"

    def _check_sizes(self) -> None:
        # choices, ranges and the adaptive-KL settings are checked when the config is composed (rlhf.config)
        a = self.cfg.algo
        self.samples_per_prompt, self.passes, self.mini_batches = a.samples_per_prompt, a.ppo_epochs, a.mini_batches
        self.needs_reference = a.kl_coef > 0
        super()._check_sizes()

    def setup(self) -> None:
        super().setup()
        cfg, a = self.cfg, self.cfg.algo
        init = cfg.critic.init
        if init == "auto":
            init = "reward_model" if cfg.reward.model_path else "policy"
        if init == "reward_model" and not cfg.reward.model_path:
            raise ConfigError("critic.init=reward_model needs reward.model_path (a `rlhf train-rm` final/ "
                              "directory); with rule rewards use critic.init=policy")
        self.critic_init = init
        critic = build_critic(init, training_model_config(cfg.model), cfg.reward.model_path, self.tokenizer,
                              cfg.run.seed)
        if init == "reward_model" and self.rewards.model is not None:
            self._scale_critic_head(critic)
        if cfg.trainer.disable_dropout:  # the value loss clips around the rollout's values: same function
            disable_dropout(critic)
        self.critic = build_engine(critic, cfg, self.world, lr=cfg.critic.lr, grad_accum=self.grad_accum,
                                   optimizer_steps=cfg.trainer.max_steps * self.passes * self.mini_batches)
        self.engines["critic"] = self.critic
        self.kl_ctl = AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon) if a.adaptive_kl \
            else FixedKLController(a.kl_coef)

    def _scale_critic_head(self, critic) -> None:
        """A critic copied from the reward model predicts raw scores; the rewards it must predict are the model's
        scores x its weight in reward.funcs, standardised when reward.normalize is on. Rescale the head to that
        scale (the head has no bias in most decoders, so the mean offset is left for the critic to learn)."""
        model, weight = self.rewards.model, self.rewards.model_weight
        with torch.no_grad():
            critic.value_head.weight.mul_(weight / model.std)
            if critic.value_head.bias is not None:
                critic.value_head.bias.sub_(model.mean).mul_(weight / model.std)

    def batch_line(self) -> str:
        return f"{super().batch_line()}; critic from {self.critic_init}"

    # ---- experience --------------------------------------------------------------------------------
    def make_experience(self, stats: PPOStepStats) -> Experience:
        cfg, a = self.cfg, self.cfg.algo
        mb = cfg.trainer.micro_batch_size
        samples = self.draw(cfg.trainer.prompts_per_step, stats)
        exp = self.pack(samples)
        dense = self.dense_rewards(samples, exp) if cfg.reward.dense else None
        scores = exp.rewards if dense is None else exp.rewards - dense.sum(-1)
        mask = exp.action_mask
        with stats.timed("logprob_s"):
            exp.old_logprobs = batched_logprobs(self.engine.module, exp, mb, cfg.rollout.temperature,
                                                self.shared_prefix)
            exp.values, last_values = batched_values(self.critic.module, exp, mb)
            if self.reference is not None:
                exp.ref_logprobs = batched_logprobs(self.reference, exp, mb, cfg.rollout.temperature,
                                                    self.shared_prefix)
        if a.reward_clip is not None:
            scores = scores.clamp(-a.reward_clip, a.reward_clip)
        scores, bootstrap = cut_response_scores(scores, exp.truncated, last_values, a.truncation)
        scores = scores - a.missing_eos_penalty * exp.truncated.float()
        if a.whiten_rewards:
            scores = whiten(scores, shift_mean=False, reduce=dist.batch_reducer())
        kl = torch.zeros_like(mask)
        if self.reference is not None:
            kl = kl_penalty(exp.old_logprobs, exp.ref_logprobs, a.kl_estimator, mask)
            for name in self.kl_names():
                estimate = kl if name == a.kl_estimator else kl_penalty(exp.old_logprobs, exp.ref_logprobs, name, mask)
                setattr(stats, f"kl_{name}", getattr(stats, f"kl_{name}") + float(masked_sum(estimate, mask)))
        if a.kl_in == "reward":
            rewards = kl_shaped_rewards(scores, kl, self.kl_ctl.value, mask)
        else:
            rewards = place_sequence_rewards(scores, mask)
        if dense is not None:
            rewards = rewards + dense
        advantages, exp.returns = gae(rewards, exp.values, mask, a.gamma, a.lam, bootstrap)
        exp.advantages = masked_whiten(advantages, mask, reduce=dist.batch_reducer()) if a.whiten_advantages \
            else advantages
        residual = exp.returns - exp.values
        stats.score += float(scores.sum())
        stats.shaped += float(masked_sum(rewards, mask))
        stats.value += float(masked_sum(exp.values, mask))
        stats.returns += float(masked_sum(exp.returns, mask))
        stats.returns_sq += float(masked_sum(exp.returns ** 2, mask))
        stats.residual += float(masked_sum(residual, mask))
        stats.residual_sq += float(masked_sum(residual ** 2, mask))
        stats.advantage += float(masked_sum(advantages, mask))
        stats.action_tokens += float(mask.sum())
        return exp

    def kl_names(self) -> tuple[str, ...]:
        """The KL estimates logged per response: the one optimised, and k1 and k3 beside it (none without a
        reference)."""
        return tuple(sorted({self.cfg.algo.kl_estimator, "k1", "k3"})) if self.reference is not None else ()

    def dense_rewards(self, samples: Samples, exp: Experience) -> torch.Tensor:
        """The reward model's share of each response's reward spread over its tokens, [B, R]: weight x per-token
        reward / std, with -weight x mean / std on the last token, so a response's total reward is unchanged
        and only its credit assignment moves (Christiano et al. 2017's summed per-token form)."""
        model = self.rewards.model
        if model is None:
            raise ConfigError("reward.dense=true needs the reward model among reward.funcs (reward=model)")
        if model.info.score != "sum":
            raise ConfigError(f"reward.dense=true needs a reward model trained with algo.score=sum (its per-token "
                              f"rewards add up to its score); {self.cfg.reward.model_path} reads its "
                              f"{model.info.score} score")
        if not getattr(self, "_same_vocab", False):
            if model.tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError("reward.dense=true needs the reward model to share the policy's tokenizer (its "
                                  "rewards are read on the policy's tokens)")
            self._same_vocab = True
        weight = self.rewards.model_weight
        texts = self.tokenizer.batch_decode(samples.responses, skip_special_tokens=True)
        per_token = model.per_token_rewards([self.rows[i] for i in samples.rows], texts, samples.responses)
        dense = torch.zeros_like(exp.action_mask)
        for b, (values, response) in enumerate(zip(per_token, samples.responses)):
            n = len(response)
            row = torch.tensor(values[:n], dtype=dense.dtype)
            if n and len(values) == n + 1:  # the RM closes a truncated response with EOS: that reward goes last
                row[-1] += values[-1]
            row[-1:] -= model.mean if n else 0.0
            dense[b, :n] = weight * row / model.std
        return dense

    # ---- update --------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.cfg.algo
        stats = PPOStepStats()
        exp = self.make_experience(stats)
        train_policy = self.step >= cfg.critic.warmup_steps
        policy_norm = critic_norm = None
        with stats.timed("train_s"):
            for batch, mask, counts, _ in self.update_batches(exp, exp.action_mask):
                if train_policy:
                    kl_coef = self.kl_ctl.value if a.kl_in == "loss" else 0.0
                    loss = self.policy_loss(batch, mask, counts, stats, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                                            loss_type=a.loss_type, kl_coef=kl_coef, kl_estimator=a.kl_estimator,
                                            entropy_coef=a.entropy_coef, dual_clip=a.dual_clip)
                    norm = self.policy_backward(loss)
                    policy_norm = policy_norm if norm is None else norm
                values, _ = response_values(self.critic, batch)
                per_token, clip = clipped_value_loss(values, batch.values, batch.returns, mask, a.value_clip)
                value_loss = aggregate(per_token, mask, a.loss_type, num_tokens=max(counts["tokens"], 1.0),
                                       num_seqs=max(counts["seqs"], 1.0))
                backward(self.critic, a.vf_coef * value_loss * self.micro_batch_scale(a.loss_type), "value loss")
                norm = optimizer_step(self.critic)
                critic_norm = critic_norm if norm is None else norm
                n = float(mask.sum())
                stats.value_loss += value_loss.item()
                stats.value_clip += float(clip["value_clip_frac"]) * n
                stats.value_tokens += n
        s = self.reduce(stats)
        if self.reference is not None:
            n = max(s.samples, 1.0)
            self.kl_ctl.update(getattr(s, f"kl_{a.kl_estimator}") / n, int(n))
        out = s.metrics(self.mean_loss(s.loss, a.loss_type), self.mean_loss(s.value_loss, a.loss_type),
                        self.kl_names())
        if not train_policy:  # critic warm-up: no policy loss was computed
            out = {k: v for k, v in out.items() if not k.startswith(("loss", "clip_frac", "entropy", "policy/"))}
        out.update({"kl_coef": self.kl_ctl.value, "grad_norm": policy_norm, "grad_norm/critic": critic_norm})
        self.last_metrics = out
        return out

    # ---- state ---------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "kl_coef": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "kl_coef" in state:
            self.kl_ctl.load_state_dict(state["kl_coef"])

    def export(self, final_dir: Path) -> None:
        """The policy in final/, the critic (a one-label sequence classifier) in final/critic/."""
        super().export(final_dir)
        state = ckpt.full_state_dict(self.critic)
        if state is not None:  # ValueModel wraps the classifier: its keys carry a `classifier.` prefix
            state = {k.removeprefix("classifier."): v for k, v in state.items()}
        ckpt.save_pretrained(self.critic.module.classifier, self.tokenizer, final_dir / "critic", state_dict=state)

    def summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        last = getattr(self, "last_metrics", {})
        kl_key = f"kl/{self.cfg.algo.kl_estimator}"
        return {**super().summary(final_eval), "reward": last.get("reward/mean"),
                "kl": final_eval.get("eval/kl", last.get(kl_key))}

