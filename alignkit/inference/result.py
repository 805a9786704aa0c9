"""What every inference-time strategy returns: the chosen completion per prompt, its reward, the
candidates it was chosen from, the cost, and how far the strategy may move from the model.

Cost counts what was computed, not what was kept: `new_tokens` includes discarded candidates,
lookahead and rollout tokens; `prompt_tokens` counts every prompt (or prefix) token prefilled,
once per prefill, however many samples shared it.

`kl` is KL(strategy || model's sampling distribution) in nats per completion, with `kl_kind`:
"exact" (plain sampling: 0), "estimate" (a Monte-Carlo average of log pi_strategy(y) - log
pi_model(y) over the strategy's own outputs, where pi_strategy is tractable), or "bound" (an upper
bound for strategies that select among samples, whose own likelihood is intractable).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Choice:
    """One prompt's answer and how it was chosen."""

    completion: str
    reward: float
    candidates: list = field(default_factory=list)  # texts of the finished candidates compared at the end
    candidate_rewards: list = field(default_factory=list)
    chosen: int = 0
    tokens: int = 0  # new tokens generated for this prompt (everything computed, kept or not)
    kl: float | None = None  # this completion's KL term (see the module docstring)


@dataclass
class StrategyResult:
    strategy: str
    choices: list
    seconds: float
    prompt_tokens: int  # prompt or prefix tokens prefilled
    kl: float | None = None
    kl_kind: str | None = None  # "exact", "estimate" or "bound"
    info: dict = field(default_factory=dict)  # strategy settings worth reporting

    @property
    def mean_reward(self) -> float:
        return sum(c.reward for c in self.choices) / max(1, len(self.choices))

    @property
    def new_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def summary(self) -> dict:
        n = max(1, len(self.choices))
        out = {
            "strategy": self.strategy,
            "prompts": len(self.choices),
            "mean_reward": self.mean_reward,
            "seconds": self.seconds,
            "seconds_per_prompt": self.seconds / n,
            "new_tokens": self.new_tokens,
            "new_tokens_per_prompt": self.new_tokens / n,
            "prompt_tokens": self.prompt_tokens,
        }
        if self.kl is not None:
            out.update(kl=self.kl, kl_kind=self.kl_kind)
        out.update(self.info)
        return out
