"""Inference-time alignment: spend compute at generation time instead of training.

    from alignkit.inference import run_strategy, StrategyOptions
    result = run_strategy("deal", model, tokenizer, reward, prompts, columns, sampling_params, StrategyOptions())

Strategies (`STRATEGIES`): sample, best-of-n, soft-best-of-n (`best_of_n`), deal and transfer-q
(`search`), controlled-decoding (`controlled`, with a value from `value`), urial (`urial`).
"""

from alignkit.inference.result import Choice, StrategyResult
from alignkit.inference.strategies import STRATEGIES, StrategyOptions, run_strategy
from alignkit.inference.value import ValueHead, fit_value_head

__all__ = ["STRATEGIES", "Choice", "StrategyOptions", "StrategyResult", "ValueHead", "fit_value_head", "run_strategy"]
