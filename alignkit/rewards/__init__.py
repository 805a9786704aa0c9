"""Rewards for evaluation, online training and inference-time search, behind one interface:

    reward(prompts: list, completions: list[str], **columns) -> list[float]

A reward is a Python function with that signature (`load_reward("my_rewards.py:exact_match")`),
a trained reward model directory (`load_reward("runs/rm/final")`, several objectives combined by a
direction), a verifiable check from `alignkit.rewards.verifiable` (`build_reward("numeric_match")`,
keywords, regex, length limits, weighted sums), or a combination of rewards through the transforms of
`alignkit.rewards.transforms`.
"""

from alignkit.rewards.functions import RewardFunction, load_reward, load_reward_function
from alignkit.rewards.model import RewardModel
from alignkit.rewards.transforms import combine_log_sigmoid, log_sigmoid_transform
from alignkit.rewards.verifiable import (Keywords, LengthLimit, NumericMatch, RegexMatch, WeightedSum, build_reward,
                                         final_answer)

__all__ = ["Keywords", "LengthLimit", "NumericMatch", "RegexMatch", "RewardFunction", "RewardModel", "WeightedSum",
           "build_reward", "combine_log_sigmoid", "final_answer", "load_reward", "load_reward_function",
           "log_sigmoid_transform"]
