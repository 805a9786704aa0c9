"""A trained reward model as a reward: scores (prompt, completion) pairs exactly as training did.

Several named objectives (a multi-objective model) are combined by a direction, a weight per
objective, as in directional preference alignment (Wang et al., Arithmetic Control of LLMs for
Diverse User Preferences: Directional Preference Alignment with Multi-Objective Rewards,
arXiv 2402.18571): score = sum_k w_k r_k, with w usually a unit vector the user picks at use time.
"""

from __future__ import annotations

import torch

from alignkit.data.tokenize import as_messages, encode_reply
from alignkit.data.vision import collate_vision, has_images
from alignkit.errors import ConfigError

STEP_AGGREGATES = ("min", "prod", "last")


class RewardModel:
    def __init__(
        self,
        path,
        *,
        weights: dict | None = None,
        device=None,
        batch_size: int = 16,
        model=None,
        tokenizer=None,
        aggregate: str | None = None,
        per_step: bool = False,
    ):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from alignkit.config import ModelConfig
        from alignkit.data.vision import is_vision_config
        from alignkit.errors import ModelError
        from alignkit.models import load_tokenizer, resolve_device, vision_classifier

        self.path, self.batch_size = str(path), batch_size
        self.device = resolve_device(device or "auto") if model is None else next(model.parameters()).device
        try:
            if model is None:
                config = AutoConfig.from_pretrained(self.path)
                if is_vision_config(config):  # a vision-language reward model: its family's classifier
                    vision_classifier(config)
                model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
                model.to(self.device)
            self.model = model
            # a vision-language model's tokenizer carries its processor, for the prompts' images
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ModelConfig(name_or_path=self.path))
        except (OSError, ValueError, ModelError) as e:
            raise ConfigError(
                f"reward model {self.path}: cannot load a sequence classifier and its tokenizer "
                f"({e}); give a directory written by `alignkit train recipe=reward` or a hub id."
            ) from None
        self.model.eval()
        k = self.model.config.num_labels
        self.names = [self.model.config.id2label.get(i, str(i)) for i in range(k)]
        self.weights = self._direction(weights)
        # a process reward model (`recipe: prm`) scores each step; its steps' scores are aggregated
        self.step_separator = getattr(self.model.config, "alignkit_step_separator", None)
        if aggregate is not None and self.step_separator is None:
            raise ConfigError(
                f"reward model {self.path}: `aggregate` combines the step scores of a process reward model "
                "(recipe: prm); this one scores whole replies. Drop it."
            )
        if aggregate not in (None, *STEP_AGGREGATES):
            raise ConfigError(
                f"reward {self.path}: `aggregate` must be one of {', '.join(STEP_AGGREGATES)}; got {aggregate!r}."
            )
        self.aggregate = aggregate or "min"
        # per-step rewards for GRPO, RLOO and PPO: a reply's reward is the sum of its step scores, and
        # each token is credited with the steps from its own on (`train.online.step_returns`)
        self.per_step = bool(per_step)
        if self.per_step and (self.step_separator is None or aggregate is not None):
            raise ConfigError(
                f"reward {self.path}: `per_step` rewards each step of a process reward model (recipe: prm) "
                + (
                    "and a reply by their sum: drop `aggregate`."
                    if aggregate is not None
                    else "; this one scores whole replies."
                )
            )

    def _direction(self, weights: dict | None) -> torch.Tensor:
        if weights is None and getattr(self.model.config, "alignkit_disentangle", None) == "length":
            weights = {"quality": 1.0}  # ODIN: the length head is left out at use time (arXiv 2402.07319)
        if weights is None:
            if len(self.names) > 1:
                raise ConfigError(
                    f"{self.path} has {len(self.names)} rewards ({', '.join(self.names)}); give a "
                    "direction, e.g. weights {" + ", ".join(f"{n}: 0.5" for n in self.names) + "}"
                )
            return torch.ones(1)
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ConfigError(f"weights name {unknown}, not rewards of {self.path} (it has {', '.join(self.names)})")
        return torch.tensor([float(weights.get(n, 0.0)) for n in self.names])

    @torch.no_grad()
    def step_scores(self, prompts: list, completions: list) -> list[list[float]]:
        """A process reward model's score of each step of each reply: sigmoid of its output at the
        step's last token, the reply split at the model's step separator as training split it."""
        from alignkit.data.steps import encode_steps, split_steps
        from alignkit.heads import reward_trunk_and_head

        sep = self.step_separator
        rows, ends = [], []
        for prompt, completion in zip(prompts, completions):
            if has_images(as_messages(prompt)[0]):
                raise ConfigError(
                    f"reward {self.path}: process reward models do not score prompts with images yet (docs/vision.md)."
                )
            steps = split_steps(completion, sep) or [completion]
            p_ids, c_ids, step_ends = encode_steps(self.tokenizer, prompt, steps, sep)
            rows.append(p_ids + c_ids)
            ends.append([len(p_ids) + e for e in step_ends])
        trunk, head = reward_trunk_and_head(self.model)
        out: list = [None] * len(rows)
        for idx, ids, mask in self._batches(rows):
            hidden = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
            scores = torch.sigmoid(head(hidden).float()[..., 0]).cpu()  # [b, T]
            for r, i in enumerate(idx):
                out[i] = [float(scores[r, e]) for e in ends[i]]
        return out

    def _aggregate(self, scores: list) -> float:
        """Min (the weakest step; Lightman et al.), product (every step right) or the last step's
        score; with `per_step`, their sum (the return of the reply's first token)."""
        if self.per_step:
            return float(sum(scores))
        if self.aggregate == "min":
            return min(scores)
        if self.aggregate == "prod":
            return float(torch.tensor(scores, dtype=torch.float64).prod())
        return scores[-1]

    @torch.no_grad()
    def score_all(self, prompts: list, completions: list) -> torch.Tensor:
        """[N, K] rewards, one column per objective (a process reward model: its steps' aggregate)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.step_separator is not None:
            steps = self.step_scores(prompts, completions)
            return torch.tensor([[self._aggregate(s)] for s in steps], dtype=torch.float32)
        rows, pixels = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            p_ids, c_ids, vision = encode_reply(self.tokenizer, prompt, completion, f"reward {self.path}, prompt {i}")
            rows.append(p_ids + c_ids)
            pixels.append(vision)
        out = torch.zeros(len(rows), len(self.names))
        for idx, ids, mask in self._batches(rows):
            images = collate_vision([pixels[i] for i in idx])  # the batch's images, in row order
            images = {k: v.to(self.device) for k, v in (images or {}).items()}
            out[idx] = self.model(input_ids=ids, attention_mask=mask, **images).logits.float().cpu()
        return out

    def _batches(self, rows: list):
        """(row indices, padded ids, mask) on the device, `batch_size` rows at a time, longest first
        (rows of similar length pad little)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(rows[i])] = torch.tensor(rows[i])
                mask[r, : len(rows[i])] = 1
            yield idx, ids.to(self.device), mask.to(self.device)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        return (self.score_all(prompts, completions) @ self.weights).tolist()

    def __repr__(self) -> str:
        return f"RewardModel({self.path})"
