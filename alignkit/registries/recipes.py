"""The recipe registry: every training method by name, with what it reads and trains.

Metadata only, with no heavy imports, so that `alignkit.config` (which sits below `train/`) can
validate a config against it: each `RecipeSpec` names what builds the recipe as a `module:name`
string, imported when the recipe is built, and carries the recipe's own config checks. Config
validation, `alignkit train --help-config`, the recipe table of docs/training.md and `alignkit data show` all
read these specs; nothing else restates which recipe reads what.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from alignkit.errors import ConfigError
from alignkit.suggest import did_you_mean

# Keys every recipe reads.
ALWAYS = ("recipe", "output_dir", "seed", "cache_dir", "model", "lora", "data", "train", "dist", "health")
# Batching keys that only offline recipes read: online recipes batch prompts by count and pack each
# prompt with its samples.
OFFLINE_BATCHING = ("train.packing", "train.max_tokens_per_batch", "train.forward_tokens", "train.eval_batch_size")
SAMPLING = (
    "generation.num_samples",
    "generation.max_new_tokens",
    "generation.temperature",
    "generation.top_p",
    "generation.top_k",
    "generation.batch_size",
    "generation.stop",
    "generation.max_thinking_tokens",
)
ONLINE = SAMPLING + (
    "generation.backend",
    "generation.vllm_server",
    "generation.vllm_sync_dir",
    "generation.vllm_dtype",
    "generation.vllm_gpu_memory_utilization",
    "generation.vllm_kv_cache_gib",
    "generation.vllm_token_file",
    "generation.sampler_server",
    "generation.request_timeout_s",
    "generation.weight_transport",
    "online.async",
    "online.rewards",
    "online.overlong_buffer",
)
DYNAMIC = ("online.dynamic_sampling", "online.dynamic_sampling_rounds")
ENV = ("env",)  # multi-turn episodes (alignkit.train.episodes)


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    target: str  # "module:name" of what builds the recipe from (cfg, tokenizer): a class or a function
    summary: str  # one line, for the docs' recipe table and --help-config
    data: str  # the records it reads: sft, paired, unpaired, masked, negative, reward, prompts
    loss_kind: str  # the `data` kind of the registered losses it accepts (alignkit losses)
    default_loss: str
    samples: bool  # samples completions from the model while it trains
    reads: tuple  # config keys or whole sections it reads, besides ALWAYS
    unread: tuple = ()  # keys inside ALWAYS's sections it does not read
    model_kind: str = "causal_lm"  # "causal_lm" or "reward_model": how the trained model is loaded
    combines_losses: bool = True  # accepts a weighted `losses` list
    needs_reward: bool = False  # samples and learns from `online.rewards` (or an environment's rewards)
    min_samples: int = 1  # `generation.num_samples` at least (methods that compare a prompt's samples: 2)
    checks: tuple = ()  # functions(cfg) raising ConfigError for settings only this recipe has
    context_parallel: bool = False  # its losses are over sequence log-probs: `dist.context_parallel` works (tested)

    def reads_key(self, key: str) -> bool:
        """Whether the recipe reads config key `key` (dotted)."""
        if key in self.unread or (key == "losses" and not self.combines_losses):
            return False
        if key == "dist.context_parallel":
            return self.context_parallel
        for entry in ALWAYS + self.reads:
            if key == entry or key.startswith(entry + "."):
                return True
        return False

    def load(self) -> Callable:
        """What builds the recipe: a callable (cfg, tokenizer) -> Recipe."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, cfg) -> None:
        """The recipe's own cross-field checks (`config.validate` calls them; it names no recipe)."""
        if self.needs_reward and cfg.online.rewards is None and cfg.env.name is None:
            raise ConfigError(
                f"recipe {self.name} samples completions and needs a reward: set `online.rewards`, e.g. "
                "`online.rewards=numeric_match` or `online.rewards=my_rewards.py:score`."
            )
        if cfg.generation.num_samples < self.min_samples:
            raise ConfigError(
                f"recipe {self.name} compares samples of the same prompt: `generation.num_samples` must "
                f"be >= {self.min_samples}; got {cfg.generation.num_samples}."
            )
        for check in self.checks:
            check(cfg)


def _check_ppo(cfg) -> None:
    p, t = cfg.ppo, cfg.train
    if p.epochs < 1 or p.minibatches < 1:
        raise ConfigError(f"`ppo.epochs` and `ppo.minibatches` must be >= 1; got {p.epochs} and {p.minibatches}.")
    if p.minibatches > t.batch_size:
        raise ConfigError(
            f"`ppo.minibatches` ({p.minibatches}) splits the prompts of a rollout: it cannot exceed "
            f"`train.batch_size` ({t.batch_size})."
        )
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ConfigError(f"`ppo.gamma` and `ppo.lam` must be in [0, 1]; got {p.gamma} and {p.lam}.")
    if p.ptx_coef > 0 and not p.ptx_data:
        raise ConfigError(
            "`ppo.ptx_coef` > 0 mixes in an NLL term on SFT data: set `ppo.ptx_data` to a file of "
            "prompt/completion records."
        )
    if p.reward_clip < 0 or cfg.critic.value_clip < 0 or p.ptx_coef < 0:
        raise ConfigError("`ppo.reward_clip`, `ppo.ptx_coef` and `critic.value_clip` must be >= 0.")


_R = "alignkit.train.recipes."
_OFFLINE = ("loss", "losses", "reference")
_SPECS = [
    RecipeSpec(
        "sft",
        _R + "sft:SFTRecipe",
        "supervised fine-tuning: NLL of the completion tokens",
        "sft",
        "sft",
        "sft",
        False,
        ("loss", "losses"),
        unread=(),
        context_parallel=True,
    ),
    RecipeSpec(
        "dpo",
        _R + "dpo:PreferenceRecipe",
        "the DPO family: any paired loss (DPO, IPO, SimPO, ORPO, ...)",
        "paired",
        "paired",
        "dpo",
        False,
        _OFFLINE,
        context_parallel=True,
    ),
    RecipeSpec(
        "unpaired",
        _R + "unpaired:UnpairedRecipe",
        "KTO and BCO on thumbs-up/down completions",
        "unpaired",
        "unpaired",
        "kto",
        False,
        _OFFLINE,
    ),
    RecipeSpec(
        "masked",
        _R + "masked:MaskedRecipe",
        "Mask-DPO on sentence-labelled pairs",
        "masked",
        "masked",
        "mask_dpo",
        False,
        _OFFLINE,
    ),
    RecipeSpec(
        "negative",
        _R + "negative:NegativeRecipe",
        "D2O: negatives only, against the model's own samples",
        "negative",
        "negative",
        "d2o",
        False,
        _OFFLINE + SAMPLING,
    ),
    RecipeSpec(
        "reward",
        _R + "reward:RewardRecipe",
        "a Bradley-Terry reward model (one or several objectives)",
        "reward",
        "reward",
        "bradley_terry",
        False,
        ("loss", "losses", "reward"),
        unread=("reward.step_separator",),
        model_kind="reward_model",
    ),
    RecipeSpec(
        "prm",
        _R + "prm:PRMRecipe",
        "a process reward model: a score per reasoning step (Math-Shepherd, PRM800K)",
        "steps",
        "steps",
        "step_bce",
        False,
        ("loss", "losses", "reward.step_separator"),
        model_kind="reward_model",
        combines_losses=False,
    ),
    RecipeSpec(
        "grpo",
        _R + "grpo:build",
        "GRPO: every sample, group-normalised advantages, clipped ratio",
        "prompts",
        "rollout",
        "ppo_clip",
        True,
        ONLINE
        + ENV
        + DYNAMIC
        + (
            "loss",
            "online.kl_coef",
            "online.aggregation",
            "online.scale_rewards",
            "online.iterations",
            "online.tis_cap",
            "online.is_mask_low",
            "online.is_mask_high",
        ),
        unread=OFFLINE_BATCHING,
        combines_losses=False,
        needs_reward=True,
        min_samples=2,
        context_parallel=True,
    ),
    RecipeSpec(
        "rloo",
        _R + "rloo:build",
        "RLOO: every sample, leave-one-out baseline, clipped ratio",
        "prompts",
        "rollout",
        "ppo_clip",
        True,
        ONLINE
        + ENV
        + DYNAMIC
        + (
            "loss",
            "online.kl_coef",
            "online.aggregation",
            "online.iterations",
            "online.tis_cap",
            "online.is_mask_low",
            "online.is_mask_high",
        ),
        unread=OFFLINE_BATCHING,
        combines_losses=False,
        needs_reward=True,
        min_samples=2,
    ),
    RecipeSpec(
        "reinforce_pp",
        _R + "reinforce_pp:build",
        "REINFORCE++: KL in the reward, returns normalised over the batch, clipped ratio, no critic",
        "prompts",
        "rollout",
        "ppo_clip",
        True,
        ONLINE
        + ENV
        + (
            "loss",
            "online.kl_coef",
            "online.kl_estimator",
            "online.aggregation",
            "online.iterations",
            "online.tis_cap",
            "online.is_mask_low",
            "online.is_mask_high",
        ),
        unread=OFFLINE_BATCHING,
        combines_losses=False,
        needs_reward=True,
    ),
    RecipeSpec(
        "online_dpo",
        _R + "online_dpo:build",
        "online DPO/IPO: best vs worst sample of each prompt",
        "prompts",
        "paired",
        "dpo",
        True,
        ONLINE + ENV + ("loss", "losses", "online.iterations"),
        unread=OFFLINE_BATCHING,
        needs_reward=True,
        min_samples=2,
    ),
    RecipeSpec(
        "raft",
        _R + "raft:build",
        "RAFT: SFT on the best of k samples",
        "prompts",
        "sft",
        "sft",
        True,
        ONLINE + ENV + ("loss", "online.iterations"),
        unread=OFFLINE_BATCHING,
        combines_losses=False,
        needs_reward=True,
    ),
    RecipeSpec(
        "ppo",
        _R + "ppo:build",
        "PPO (PPO-max): a value model, GAE, KL in the reward, clipped ratio",
        "prompts",
        "rollout",
        "ppo_clip",
        True,
        ONLINE
        + ENV
        + (
            "loss",
            "online.kl_coef",
            "online.kl_estimator",
            "online.aggregation",
            "online.tis_cap",
            "online.is_mask_low",
            "online.is_mask_high",
            "critic",
            "ppo",
        ),
        unread=OFFLINE_BATCHING,
        combines_losses=False,
        needs_reward=True,
        checks=(_check_ppo,),
    ),
    RecipeSpec(
        "distill",
        _R + "distill:build",
        "on-policy distillation (GKD): the student's samples, per-token divergence to a teacher; ADPA",
        "prompts",
        "distill",
        "reverse_kl",
        True,
        ONLINE + ENV + ("loss", "losses", "online.aggregation", "online.iterations", "teacher"),
        unread=OFFLINE_BATCHING,
    ),
]
RECIPES: dict[str, RecipeSpec] = {s.name: s for s in _SPECS}


def get(name: str) -> RecipeSpec:
    if name not in RECIPES:
        raise ConfigError(f"`recipe` must be one of {', '.join(RECIPES)}; got {name!r}.{did_you_mean(name, RECIPES)}")
    return RECIPES[name]


def readers(key: str) -> list[str]:
    """Names of the recipes that read `key`."""
    return [s.name for s in _SPECS if s.reads_key(key)]
