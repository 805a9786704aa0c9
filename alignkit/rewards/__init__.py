"""Rewards for evaluation, online training and inference-time search, behind one interface:

    reward(prompts: list, completions: list[str], **columns) -> list[float]

`build_reward(spec)` is the one factory: a Python function with that signature
(`build_reward("my_rewards.py:exact_match")`), a trained reward model directory
(`build_reward("runs/rm/final", weights=...)`, several objectives combined by a direction), a
verifiable check from `alignkit.rewards.verifiable` (`build_reward("numeric_match")`, keywords,
regex, length limits), or a weighted list of those. `alignkit.rewards.transforms` combines rewards
through log-sigmoid transforms.
"""

from alignkit.rewards.build import build_reward
from alignkit.rewards.functions import RewardFunction, load_reward_function
from alignkit.rewards.model import RewardModel
from alignkit.rewards.transforms import combine_log_sigmoid, log_sigmoid_transform
from alignkit.rewards.verifiable import Keywords, LengthLimit, NumericMatch, RegexMatch, WeightedSum, final_answer

__all__ = [
    "Keywords",
    "LengthLimit",
    "NumericMatch",
    "RegexMatch",
    "RewardFunction",
    "RewardModel",
    "WeightedSum",
    "build_reward",
    "combine_log_sigmoid",
    "final_answer",
    "load_reward_function",
    "log_sigmoid_transform",
]
