"""The recipe registry: every training method by name, with what it reads and trains.

Metadata only, with no heavy imports, so that `alignkit.config` can validate a config against it:
each `RecipeSpec` names its class as a `module:Class` string, imported when the recipe is built.
Config validation, `alignkit train --help-config`, the README's recipe table and `alignkit data
show` all read these specs; nothing else restates which recipe reads what.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from alignkit.errors import ConfigError

# Keys every recipe reads.
ALWAYS = ("recipe", "output_dir", "seed", "cache_dir", "model", "lora", "data", "train", "dist", "health")
# Batching keys that only offline recipes read: online recipes batch prompts by count and pack each
# prompt with its samples.
OFFLINE_BATCHING = ("train.packing", "train.max_tokens_per_batch", "train.forward_tokens", "train.eval_batch_size")
SAMPLING = ("generation.num_samples", "generation.max_new_tokens", "generation.temperature", "generation.top_p",
            "generation.top_k", "generation.batch_size", "generation.stop")
ONLINE = SAMPLING + ("generation.backend", "generation.vllm_server", "generation.vllm_sync_dir", "generation.vllm_dtype",
                     "generation.vllm_gpu_memory_utilization",
                     "generation.vllm_kv_cache_gib", "generation.vllm_token_file", "online.rewards", "online.overlong_buffer")
DYNAMIC = ("online.dynamic_sampling", "online.dynamic_sampling_rounds")
ENV = ("env",)  # multi-turn episodes (alignkit.train.episodes)


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    target: str  # "module:Class"
    summary: str  # one line, for the README table and --help-config
    data: str  # the records it reads: sft, paired, unpaired, masked, negative, reward, prompts
    loss_kind: str  # the `data` kind of the registered losses it accepts (alignkit losses)
    default_loss: str
    samples: bool  # samples completions from the model while it trains
    reads: tuple  # config keys or whole sections it reads, besides ALWAYS
    unread: tuple = ()  # keys inside ALWAYS's sections it does not read
    model_kind: str = "causal_lm"  # "causal_lm" or "reward_model": how the trained model is loaded
    combines_losses: bool = True  # accepts a weighted `losses` list

    def reads_key(self, key: str) -> bool:
        """Whether the recipe reads config key `key` (dotted)."""
        if key in self.unread or (key == "losses" and not self.combines_losses):
            return False
        for entry in ALWAYS + self.reads:
            if key == entry or key.startswith(entry + "."):
                return True
        return False

    def load(self):
        """The recipe class."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


_R = "alignkit.train.recipes."
_OFFLINE = ("loss", "losses", "reference")
_SPECS = [
    RecipeSpec("sft", _R + "sft:SFTRecipe", "supervised fine-tuning: NLL of the completion tokens", "sft", "sft", "sft",
               False, ("loss", "losses"), unread=()),
    RecipeSpec("dpo", _R + "dpo:PreferenceRecipe", "the DPO family: any paired loss (DPO, IPO, SimPO, ORPO, ...)",
               "paired", "paired", "dpo", False, _OFFLINE),
    RecipeSpec("unpaired", _R + "unpaired:UnpairedRecipe", "KTO and BCO on thumbs-up/down completions", "unpaired",
               "unpaired", "kto", False, _OFFLINE),
    RecipeSpec("masked", _R + "masked:MaskedRecipe", "Mask-DPO on sentence-labelled pairs", "masked", "masked",
               "mask_dpo", False, _OFFLINE),
    RecipeSpec("negative", _R + "negative:NegativeRecipe", "D2O: negatives only, against the model's own samples",
               "negative", "negative", "d2o", False, _OFFLINE + SAMPLING),
    RecipeSpec("reward", _R + "reward:RewardRecipe", "a Bradley-Terry reward model (one or several objectives)",
               "reward", "reward", "bradley_terry", False, ("loss", "losses", "reward"), model_kind="reward_model"),
    RecipeSpec("grpo", _R + "grpo:GRPORecipe", "GRPO: every sample, group-normalised advantages, clipped ratio",
               "prompts", "rollout", "ppo_clip", True,
               ONLINE + ENV + DYNAMIC + ("loss", "online.kl_coef", "online.aggregation", "online.scale_rewards",
                                   "online.iterations", "online.tis_cap"),
               unread=OFFLINE_BATCHING, combines_losses=False),
    RecipeSpec("rloo", _R + "rloo:RLOORecipe", "RLOO: every sample, leave-one-out baseline, clipped ratio",
               "prompts", "rollout", "ppo_clip", True,
               ONLINE + ENV + DYNAMIC + ("loss", "online.kl_coef", "online.aggregation", "online.iterations", "online.tis_cap"),
               unread=OFFLINE_BATCHING, combines_losses=False),
    RecipeSpec("reinforce_pp", _R + "reinforce_pp:ReinforcePPRecipe",
               "REINFORCE++: KL in the reward, returns normalised over the batch, clipped ratio, no critic",
               "prompts", "rollout", "ppo_clip", True,
               ONLINE + ENV + ("loss", "online.kl_coef", "online.kl_estimator", "online.aggregation", "online.iterations",
                         "online.tis_cap"),
               unread=OFFLINE_BATCHING, combines_losses=False),
    RecipeSpec("online_dpo", _R + "online_dpo:OnlineDPORecipe", "online DPO/IPO: best vs worst sample of each prompt",
               "prompts", "paired", "dpo", True, ONLINE + ENV + ("loss", "losses", "online.iterations"),
               unread=OFFLINE_BATCHING),
    RecipeSpec("raft", _R + "raft:RAFTRecipe", "RAFT: SFT on the best of k samples", "prompts", "sft", "sft", True,
               ONLINE + ENV + ("loss", "online.iterations"), unread=OFFLINE_BATCHING, combines_losses=False),
    RecipeSpec("ppo", _R + "ppo:PPORecipe", "PPO (PPO-max): a value model, GAE, KL in the reward, clipped ratio",
               "prompts", "rollout", "ppo_clip", True,
               ONLINE + ENV + ("loss", "online.kl_coef", "online.kl_estimator", "online.aggregation", "online.tis_cap", "critic",
                        "ppo"),
               unread=OFFLINE_BATCHING, combines_losses=False),
    RecipeSpec("distill", _R + "distill:DistillRecipe",
               "on-policy distillation (GKD): the student's samples, per-token divergence to a teacher; ADPA",
               "prompts", "distill", "reverse_kl", True,
               ONLINE + ("loss", "losses", "online.aggregation", "online.iterations", "teacher"),
               unread=OFFLINE_BATCHING),
]
RECIPES: dict[str, RecipeSpec] = {s.name: s for s in _SPECS}


def get(name: str) -> RecipeSpec:
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"`recipe` must be one of {', '.join(RECIPES)}; got {name!r}.{hint}")
    return RECIPES[name]


def readers(key: str) -> list[str]:
    """Names of the recipes that read `key`."""
    return [s.name for s in _SPECS if s.reads_key(key)]
