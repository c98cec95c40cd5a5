"""Reward functions the end-to-end tests load by dotted path (tests.integration.rewards_for_tests:name)."""


def varied(prompts, completions, **columns):
    """Rewards that differ within a group even for an untrained model: a hash of the text, in 0..6."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def raises(prompts, completions, **columns):
    """A user reward function with a bug: it fails on every completion."""
    raise ValueError("this reward function has a bug")
