"""Rewards for evaluation, online training and inference-time search, behind one interface:

    reward(prompts: list, completions: list[str], **columns) -> list[float]

A reward is a Python function with that signature (`load_reward("my_rewards.py:exact_match")`),
a trained reward model directory (`load_reward("runs/rm/final")`, several objectives combined by a
direction), or a combination of rewards through the transforms of `alignkit.rewards.transforms`.
"""

from alignkit.rewards.functions import RewardFunction, load_reward, load_reward_function
from alignkit.rewards.model import RewardModel
from alignkit.rewards.transforms import combine_log_sigmoid, log_sigmoid_transform

__all__ = ["RewardFunction", "RewardModel", "combine_log_sigmoid", "load_reward", "load_reward_function",
           "log_sigmoid_transform"]
