"""rlhf: SFT, Bradley-Terry reward models, PPO and GRPO from one command line."""

__version__ = "0.1.0"
