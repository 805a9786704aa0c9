"""Typed run configuration: dataclasses, YAML files and `key=value` overrides.

The docstring line under each field is the single source of help: `alignkit train --help-config`
and the site's configuration reference (docs/config.md, rendered when the site is built) are both
generated from it (`python -m alignkit.config`).
Unknown keys are errors that suggest the nearest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from alignkit.errors import ConfigError
from alignkit.registries import recipes as registry
from alignkit.registries.health import check_rule_names
from alignkit.registries.trackers import check_names as check_trackers
from alignkit.suggest import closest


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local model directory, a Hugging Face hub id, or the bundled default `smollm2-135m-instruct`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype. `auto`: float32 weights for training (bf16 compute comes from `train.precision`)."""
    device: str = "auto"
    """`auto` (cuda > mps > cpu), `cpu`, `cuda`, `cuda:N` or `mps`."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`); default `sdpa`."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run (only for models you trust)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    freeze_layers: int = 0
    """Freeze the input embeddings and the first N transformer blocks: cheaper steps, fewer trained weights (tied output embeddings freeze too); with LoRA, adapters go in the blocks above N only."""
    chat_template: Optional[str] = None
    """A Jinja chat template (a file path, or the template text) used instead of the tokenizer's own: e.g. an append-only template for multi-turn episodes where the model's own cannot be continued turn by turn (docs/reasoning.md)."""
    train_vision: bool = False
    """Vision-language models: also train the vision tower (default: frozen; the projector and the language model train). An error for a text-only model (docs/vision.md)."""
    quantization: Optional[Literal["nf4", "int8"]] = None
    """QLoRA: keep the frozen base's transformer-block linears in 4-bit NormalFloat with double quantization (`nf4`) or in `int8` (torchao), training LoRA adapters in the compute dtype; needs `lora.enabled` (docs/fitting.md)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the base model then serves as the reference."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: Union[str, list] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer but the output head (of a vision-language model: of its language model only, see `vision_parts`)."""
    vision_parts: list = field(default_factory=list)
    """Vision-language models with `all-linear`: also adapt the linears of these parts, `projector` and/or `vision` (the vision tower); an error for a text-only model."""


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file, a `datasets` directory, or a hub dataset id."""
    eval: Optional[str] = None
    """Held-out data in the same forms; if unset, `eval_fraction` of `train` is held out."""
    eval_fraction: float = 0.05
    """Fraction of the training records held out for evaluation when `eval` is unset (0 disables)."""
    split: Optional[str] = None
    """Split to read from a `datasets` directory or hub dataset (default `train`)."""
    columns: dict = field(default_factory=dict)
    """Map canonical field names to your column names, e.g. `{prompt: question, chosen: good}`."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error` stops at the first invalid record; `skip` skips invalid records and reports how many."""
    max_length: int = 1024
    """Maximum tokens of prompt + completion; longer examples keep the prompt's end and the completion's start."""
    max_prompt_length: Optional[int] = None
    """Maximum prompt tokens kept when truncating (default: half of `max_length`)."""
    limit: Optional[int] = None
    """Use only the first N records of the training data (quick experiments)."""
    thinking: Literal["keep", "strip", "as_template"] = "keep"
    """Reasoning in the assistant turns of the data (`<think>...</think>` inline, or a message's `reasoning_content` field): `keep` trains on it (written inline before the answer), `strip` removes it, `as_template` gives it to the chat template as `reasoning_content` and trains on what the template renders (docs/reasoning.md)."""
    thinking_tags: list = field(default_factory=lambda: ["<think>", "</think>"])
    """The opening and closing tags of a reasoning block, in data and in sampled replies: rewards and evaluation read the answer after the block (the reasoning as the `reasoning` column), and `generation.max_thinking_tokens` closes it."""


@dataclass
class TrainConfig:
    learning_rate: float = 5e-6
    """Peak learning rate of AdamW."""
    batch_size: int = 8
    """Examples (pairs for preference losses) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is `batch_size * grad_accum`."""
    epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warmup from 0."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to 0, or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)."""
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: `auto` is bf16 autocast on GPUs that support it, else fp32."""
    activation_offload: bool = False
    """GPU only: keep the activations the backward needs in (pinned) CPU memory between the forward and the backward (PyTorch's `save_on_cpu`); with `model.gradient_checkpointing`, only the checkpointed block inputs are kept, so they move. Less GPU memory, slower steps."""
    disable_dropout: bool = True
    """Set dropout to 0 in the policy (as DPO implementations do: dropout makes log-ratios noisy)."""
    logprob_chunk_size: int = 1024
    """Completion positions per chunk when applying the LM head, so [tokens, vocab] logits never exist at once."""
    packing: bool = True
    """Lay each pair (or group) out once as [prompt][chosen][rejected] with a mask that hides chosen from rejected (prefix sharing), and pack several into each row, so no compute goes to padding or repeated prompts."""
    pack_tokens: int = 2048
    """Tokens per packed row (rows grow to fit one longer example). Larger rows waste more attention compute on masked-out blocks without a block-sparse kernel."""
    max_tokens_per_batch: Optional[int] = None
    """Form micro-batches by token budget instead of by count: examples are added while their non-pad tokens (each prompt once when packing) fit; `batch_size` and `eval_batch_size` are then not used. Steps per epoch vary with the data's lengths."""
    forward_tokens: Optional[int] = None
    """Run each micro-batch's forward and backward in pieces of at most this many tokens (whole examples; gradients add up, so the loss and the update are unchanged). Bounds activation memory; pieces of one or two pairs also avoid padding and attention across pairs."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only at the end)."""
    eval_batch_size: Optional[int] = None
    """Micro-batch size for evaluation and the reference pass (default: `batch_size`)."""
    safety_prompts: Optional[str] = None
    """Harmful requests (prompt records, or preference pairs such as HH-RLHF harmless: their prompts): at step 0 and at every held-out evaluation the share of the first `safety_num_prompts` that the policy complies with (greedy replies judged by `safety_judge`) is logged in the eval row as `safety/harmful_compliance`; the health rule harmful_compliance_rising watches it."""
    safety_num_prompts: int = 32
    """`safety_prompts`: how many of them to answer at each evaluation."""
    safety_judge: str = "rule"
    """`safety_prompts`: who labels a reply refusal or compliance: `rule` (alignkit.rewards.refusal) or file.py:function."""
    safety_max_new_tokens: int = 64
    """`safety_prompts`: tokens of each greedy reply."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Number of most recent step checkpoints kept on disk."""
    log_every: int = 1
    """Print and log metrics every N steps."""
    shuffle: bool = True
    """Shuffle the training examples each epoch (seeded)."""
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    """Trackers that also get the config, every metric, alerts and the report: any of `tensorboard`, `wandb`, `trackio`, `mlflow`, each writing offline under the run directory (docs/trackers.md); `[]`: only metrics.jsonl. A tracker whose package is missing is an error naming its extra."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A NaN or infinite loss or gradient norm: `stop` the run (no update applied, no weights written; the message names the step and the examples of the micro-batch), or `skip_step` (drop that update, count it in `skipped_steps`, go on)."""
    stop_on: list = field(default_factory=list)
    """Health rules (docs/health.md) whose alert stops the run cleanly: a checkpoint at that step, `summary.json` status `stopped_by_health` with the alert, no `final/`, exit code 2. E.g. `[over_optimisation, loss_stuck_at_ln2]`."""


@dataclass
class GenerationConfig:
    num_samples: int = 4
    """Completions sampled per prompt (D2O's K self-generated samples)."""
    max_new_tokens: int = 128
    """Longest sampled completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    batch_size: int = 16
    """Prompts generated for at once."""
    stop: list = field(default_factory=list)
    """Stop strings: a completion ends once its text contains one (it is kept)."""
    max_thinking_tokens: Optional[int] = None
    """Thinking budget: a reasoning block (`data.thinking_tags`) still open after this many tokens is closed by inserting the closing tag's tokens, which are context (not scored); the answer follows within `max_new_tokens`. Unset: no budget."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Online recipes: who samples. `transformers`: alignkit's KV-cache loop over the policy itself; `vllm`: a vLLM engine (in this process, or the server `vllm_server` names), loaded with the policy's weights before each rollout."""
    vllm_server: Union[str, list, None] = None
    """`backend: vllm`: the URL of an `alignkit vllm-serve` (e.g. http://10.0.0.5:8000), or a list of URLs the prompts are spread across; unset: an engine in the training process."""
    vllm_sync_dir: Optional[str] = None
    """`vllm_server`: the directory each weight update is written to for the server to read; for a server on another machine, a shared filesystem path both see (default: this machine's temporary directory)."""
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`backend: vllm`, in-process engine: its weight dtype; `auto` is bfloat16 on GPUs and float32 on CPUs (lower than the trainer's: consider `online.tis_cap`)."""
    vllm_token_file: Optional[str] = None
    """`vllm_server`: the file holding the server's secret (`alignkit vllm-serve` prints where it wrote it); default: `<vllm_sync_dir or the temporary directory>/alignkit-vllm-server-<port>.token`. The environment variable ALIGNKIT_VLLM_TOKEN overrides it."""
    vllm_kv_cache_gib: Optional[float] = None
    """`backend: vllm`, in-process engine: its KV cache in GiB. Default: 1 on CPUs (vLLM's CPU build would otherwise reserve a share of NUMA node 0's memory, which fails where that node reports little); on GPUs unset, and `vllm_gpu_memory_utilization` decides."""
    vllm_gpu_memory_utilization: Optional[float] = None
    """`backend: vllm`, in-process engine: the share of GPU memory it may take (default 0.4 on GPUs); on CPU a share of NUMA node 0's RAM, used only when set (prefer `vllm_kv_cache_gib` there). Set one of the two."""
    sampler_server: Union[str, list, None] = None
    """`backend: transformers`: the URL of an `alignkit sample-serve` (alignkit's own sampler in a process of its own, e.g. on another CPU core or machine), or a list of URLs the prompts are spread across, instead of sampling in the training process."""
    request_timeout_s: float = 600.0
    """`vllm_server` / `sampler_server`: the longest a sample request or a weight update may take; a server that dies or stops answering ends the run after at most this long, with a message naming it."""
    weight_transport: Literal["directory", "nccl"] = "directory"
    """`vllm_server`: how weights reach the server: `directory` (safetensors in `vllm_sync_dir`, which the server reloads; CPU and GPU) or `nccl` (a broadcast from the trainer's GPU to vLLM's workers through vLLM's weight-transfer API; needs CUDA on both sides and `alignkit vllm-serve --weight-transport nccl`)."""


@dataclass
class AsyncConfig:
    mode: Literal["sync", "one_step_off", "stream"] = "sync"
    """`sync`: sample, then train on the samples (lockstep). `one_step_off`: the rollout of step t is sampled with the weights of step t-1 while step t-1 trains (fixed schedule: deterministic). `stream`: the sampler generates continuously into a bounded buffer and weight updates reach generations in flight (docs/async.md)."""
    max_staleness: Optional[int] = None
    """`stream`: the most policy versions a sample may lag behind the trainer; older samples are dropped (counted) and their prompts sampled again. Default: 0 for `sync`, 1 for `one_step_off` (the only values they allow), 2 for `stream`."""
    buffer_size: Optional[int] = None
    """`stream`: rollouts (micro-batches) sampled ahead of the trainer at most; default `max_staleness` / `online.iterations` (at least 1) x `train.grad_accum`."""


@dataclass
class OnlineConfig:
    rewards: Union[str, list, dict, None] = None
    """Reward of each sampled completion: a built-in (`numeric_match`, `regex`, `length`, `keywords`, `reasoning_format`; each reads the answer after a reasoning block, docs/reasoning.md), a Python function (`file.py:fn` or `module:fn`), a reward-model directory, a mapping with parameters (`{name: keywords, required: [please]}`), or a list of these with `weight`s, summed."""
    kl_coef: float = 0.0
    """Weight of the KL(policy || reference) penalty: GRPO / RLOO add the per-token k3 estimate to the loss; PPO subtracts it from the reward (`kl_estimator`). 0 keeps no reference model (GRPO / RLOO)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """PPO and REINFORCE++: the per-token KL estimate folded into the reward: `k1` (log pi - log pi_ref, as InstructGPT) or `k3` (exp(r) - r - 1 with r = log pi_ref - log pi, non-negative)."""
    aggregation: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses become the batch loss: `grpo` (mean per sequence, then over sequences), `dapo` (mean over all tokens), `dr_grpo` (sum over tokens / (sequences x generation.max_new_tokens))."""
    scale_rewards: bool = True
    """GRPO: divide advantages by the group's reward std (Dr. GRPO sets false: centering only)."""
    iterations: int = 1
    """Optimizer steps on each batch of samples (GRPO's mu); above 1 the clipped ratio binds."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each token's policy loss by min(pi_trainer / pi_sampler, tis_cap), for a sampler that computes in lower precision than the trainer (vLLM in bf16); 0 disables."""
    is_mask_low: float = 0.0
    """Masked importance sampling: drop from the policy loss the tokens whose pi_trainer / pi_sampler is below is_mask_low (in (0, 1), e.g. 0.5; set with `is_mask_high`). With `tis_cap` too, the tokens are masked first and the kept ones weighted by min(ratio, tis_cap). Masked tokens still count in the `aggregation`'s normaliser; 0 disables."""
    is_mask_high: float = 0.0
    """Masked importance sampling: drop from the policy loss the tokens whose pi_trainer / pi_sampler is above is_mask_high (above 1, e.g. 2; set with `is_mask_low`); 0 disables."""
    dynamic_sampling: bool = False
    """GRPO / RLOO (DAPO's dynamic sampling): drop groups whose samples all got the same reward (zero advantage) and refill the batch with fresh training prompts, in up to `dynamic_sampling_rounds` more sampling rounds."""
    dynamic_sampling_rounds: int = 3
    """`dynamic_sampling`: extra sampling rounds per batch at most; a batch still short after them trains on the groups it has."""
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    overlong_buffer: int = 0
    """DAPO's soft over-length penalty: replies longer than generation.max_new_tokens - overlong_buffer tokens lose reward linearly, down to -1 at the limit (training reward only); 0 disables."""


@dataclass
class EnvConfig:
    name: Optional[str] = None
    """Multi-turn episodes instead of single completions: a built-in environment (`calculator`, `python`, `gsm8k_tools`) or your `file.py:Class`; the environment answers each model turn (tool results) and gives the rewards, so `online.rewards` stays unset. Unset: one completion per sample."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the environment class (one instance per episode)."""
    tools: Optional[list] = None
    """Tools offered to the model, replacing the environment's own: built-in names (`calculator`, `python`) or `file.py:function` (its JSON schema is read from its type hints and Google-style docstring). Unset: the environment's tools."""
    sandbox: str = "bwrap"
    """Where code tools (`python`) run model-written code: `bwrap` (a bubblewrap sandbox: no network, read-only system, scratch tmpfs, uid 65534, limits; `apt-get install bubblewrap`), `file.py:Class` (your executor, e.g. a remote code-execution service; see docs/security.md), or `none`: NO isolation, only for code you trust (warned at start)."""
    max_turns: int = 4
    """Model turns per episode at most; an episode still going after the last ends as `turn_limit`."""
    max_tokens: Optional[int] = None
    """Token budget per episode after the prompt (model and environment tokens); unset: what `data.max_length` leaves after the prompt. Each model turn also stops at `generation.max_new_tokens`."""
    gamma: float = 1.0
    """Discount per turn: an episode's reward is sum_t gamma^t r_t over its turn rewards; GRPO and RLOO also give the tokens of turn t that turn's own return sum_{t'>=t} gamma^(t'-t) r_t' against the group's baseline (1: every turn gets the episode's return)."""


@dataclass
class CriticConfig:
    init: str = "policy"
    """Where PPO's value model starts: `policy` (the policy's weights with a new scalar head) or a reward-model directory (the `final/` of `recipe=reward`), whose trunk and head it keeps."""
    learning_rate: float = 1e-5
    """Peak learning rate of the value model's own AdamW (same warmup and schedule as the policy)."""
    weight_decay: float = 0.0
    """The value model's AdamW weight decay (not applied to biases and norm weights)."""
    max_grad_norm: float = 1.0
    """Clip the value model's gradient norm to this value (0 disables clipping)."""
    freeze_layers: int = 0
    """Freeze the value model's embeddings and first N blocks; all of them: only the head trains."""
    lora: bool = False
    """Train LoRA adapters on the value model (rank, alpha and targets from `lora`) and its head in full."""
    value_clip: float = 0.2
    """PPO-max value clipping: a new value counts at most this far from the rollout's value (0 disables)."""


@dataclass
class PPOConfig:
    epochs: int = 2
    """Passes over each rollout; every pass is split into `minibatches` optimizer steps."""
    minibatches: int = 2
    """Optimizer steps per pass over a rollout, each on an equal share of its prompts."""
    gamma: float = 1.0
    """GAE discount over completion tokens (1: no discount, as in RLHF practice)."""
    lam: float = 0.95
    """GAE lambda: 1 gives Monte-Carlo returns minus the value, 0 the one-step TD error."""
    whiten_advantages: bool = True
    """Normalise the rollout's advantages to mean 0 and standard deviation 1 (PPO-max)."""
    normalize_rewards: bool = True
    """Divide rewards by the running standard deviation of all rewards seen (PPO-max reward scaling)."""
    reward_clip: float = 5.0
    """Clip the (normalised) rewards to [-reward_clip, reward_clip] (PPO-max); 0 disables."""
    ptx_coef: float = 0.0
    """Weight of an NLL term on `ptx_data` mixed into the policy loss (PPO-ptx, InstructGPT); 0 disables."""
    ptx_data: Optional[str] = None
    """SFT records (prompt/completion or messages) for the `ptx_coef` term; required when it is above 0."""


@dataclass
class TeacherConfig:
    name_or_path: Optional[str] = None
    """`recipe: distill`: the teacher, a causal LM with the student's tokenizer (a local directory or a hub id); it scores every sampled position with its full next-token distribution. Frozen: it is loaded for every run and never checkpointed."""
    reference: Optional[str] = None
    """`loss: adpa` (advantage-guided distillation): the model the teacher was DPO-trained from, with the same tokenizer; the teacher's per-token advantage is log pi_teacher - log pi_reference. Only read by losses that use it."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of the teacher and its reference: `auto` is bfloat16 on GPUs that support it, else float32."""


@dataclass
class RewardConfig:
    objectives: list = field(default_factory=lambda: ["reward"])
    """Names of the rewards a reward model outputs; more than one needs per-objective `labels` in the data."""
    use_margin: bool = False
    """Read a `margin` field (>= 0) from every record and require r(chosen) - r(rejected) to exceed it (Llama 2)."""
    disentangle: Optional[Literal["length"]] = None
    """ODIN (arXiv 2402.07319): train a `quality` and a `length` head on the trunk, their sum fitted to the preferences, the length head pushed to correlate with response length and the quality head not to; the quality head alone is the reward at use time (docs/reward-hacking.md)."""
    length_coef: float = 1.0
    """ODIN: weight of |corr(quality head, length)| (or its square: `correlation_penalty`) - sign x corr(length head, length) over each micro-batch's replies, or every training reply when only the head trains (the sign: `length_sign`)."""
    orthogonal_coef: float = 1.0
    """ODIN: weight of |w_quality . w_length|, the overlap of the two heads' weight vectors."""
    length_sign: Literal["auto", "positive", "negative"] = "auto"
    """ODIN: the sign of the correlation with length the length head is pushed to: `positive` is the paper's (longer replies preferred), `negative` for data that prefers shorter ones, `auto` the one the training pairs show (the chosen reply longer in most pairs whose lengths differ: positive)."""
    correlation_penalty: Literal["auto", "absolute", "squared"] = "auto"
    """ODIN: how the quality head's correlation with length is penalised: `absolute` |corr| (the paper's), `squared` corr^2 (smooth at zero, so Adam's steps for the preferences do not drown in its sign flips), `auto` squared when only the head trains (the correlations are exact there) and absolute otherwise (docs/reward-hacking.md)."""

    step_separator: str = "\n"
    """recipe prm: what separates the steps of a reply (a `completion` is split at it; `steps` are joined with it); saved with the model, which scores each step at its last token."""

    def head_names(self) -> list:
        """The outputs of the reward model's head: the objectives, or ODIN's quality and length."""
        return ["quality", "length"] if self.disentangle else list(self.objectives)


@dataclass
class DistConfig:
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    """With several processes (torchrun): `fsdp` shards parameters, gradients and optimizer state (FSDP2, each decoder block and the root); `ddp` replicates the model and averages gradients; `auto` is fsdp."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered parameters after its forward (less memory; the backward gathers them again)."""
    cpu_offload: bool = False
    """FSDP2: keep the sharded parameters, gradients and optimizer state in CPU memory (fits larger models on fewer GPUs; slower)."""
    timeout_s: float = 600.0
    """Seconds any collective may wait before the run stops with an error, so a lost process ends the run instead of hanging it."""
    context_parallel: int = 1
    """Split every sequence of a micro-batch along its length over this many processes (DeepSpeed-Ulysses: an all-to-all over attention heads around attention); the processes form groups of this size that train the same micro-batches, so data parallelism is the process count divided by it (docs/fitting.md). Recipes sft, dpo and grpo; SDPA attention; the head count must divide by it."""


@dataclass
class HealthConfig:
    enabled: bool = True
    """Run the health rules on every logged train and eval row; each alert is printed once and written to metrics.jsonl as an `alert` row (docs/health.md)."""
    warmup_steps: int = 50
    """loss_stuck_at_ln2: steps before a DPO-family loss still at ln 2 counts as stuck."""
    window: int = 20
    """Logged rows the trend rules fit (likelihood_displacement, loss_stuck_at_ln2) and the rows grad_norm_spike takes its median over."""
    smooth: int = 5
    """Logged rows averaged before a level is compared with its threshold (KL, entropy, length, zero-variance groups, log-prob mismatch); each such rule waits until it has that many."""
    clear_rows: int = 10
    """An alert is raised once; its rule re-arms after its condition has been false on this many consecutive rows it checked."""
    ln2_tolerance: float = 0.01
    """loss_stuck_at_ln2: the loss counts as at ln 2 when its mean over `window` rows is within this of ln 2 = 0.6931."""
    trend_corr: float = 0.5
    """likelihood_displacement: the Pearson r against step (in absolute value) that makes a fall of chosen log-probs and a rise of margins a trend."""
    displacement_drop: float = 2.0
    """likelihood_displacement: nats of summed chosen log-prob the fitted line must lose across the window."""
    kl_budget: float = 0.1
    """over_optimisation: the mean per-token KL to the reference (the `kl` metric, averaged over `smooth` rows) past which the run is over-optimising."""
    eval_trend: int = 3
    """eval_loss_rising and over_optimisation: evaluations in a row at which the held-out loss rose (or the held-out reward or accuracy fell)."""
    entropy_floor: float = 0.05
    """entropy_collapse: mean token entropy (nats) below which sampling has collapsed."""
    entropy_fall: float = 0.8
    """entropy_collapse: the fraction of its starting value the mean token entropy may lose before it counts as collapsed."""
    length_growth: float = 2.0
    """runaway_length: the factor by which the mean completion length may grow over its start."""
    disagreement_growth: float = 2.0
    """over_optimisation: the factor by which an ensemble reward's member disagreement (`reward/ensemble_std`) may grow over its start."""
    zero_variance_fraction: float = 0.5
    """zero_variance_groups: the share of prompts whose samples all score the same above which the run mostly learns nothing."""
    mismatch_threshold: float = 0.05
    """logprob_mismatch: the mean |sampler - trainer| log-prob per sampled token above which they disagree."""
    spike_factor: float = 10.0
    """grad_norm_spike: a step's gradient norm above this times the median of the `window` before it is a spike."""
    staleness_limit: float = 2.0
    """off_policy_drift: the mean policy versions a sampled token lags behind the trainer (`async/staleness_mean`) above which the run trains too far off-policy."""
    is_weight_drift: float = 0.2
    """off_policy_drift: how far the mean truncated importance weight (`tis/weight_mean`) may move from 1."""
    harmful_rise: float = 0.1
    """harmful_compliance_rising: the rise of `safety/harmful_compliance` over the run's first evaluation that counts (also beyond its 95% noise)."""
    masked_fraction_limit: float = 0.1
    """off_policy_drift: the share of tokens masked importance sampling drops (`mis/masked_fraction`) above which too much of the batch is discarded."""


@dataclass
class RunConfig:
    recipe: str = "dpo"
    """The training method; `alignkit train --help-config` lists them, with what each reads (the recipe table of docs/training.md)."""
    output_dir: str = "runs/alignkit"
    """Run directory: checkpoints, metrics.jsonl, the final model."""
    seed: int = 0
    """Seed for data order, initialisation of new weights and sampling."""
    reference: Literal["cached", "live"] = "cached"
    """`cached`: reference log-probs computed once before training and stored on disk; `live`: a frozen reference model stays in memory."""
    cache_dir: Optional[str] = None
    """Where cached reference log-probs and converted models go (default `$ALIGNKIT_CACHE` or `~/.cache/alignkit`)."""
    loss: dict = field(default_factory=lambda: {"name": "dpo"})
    """Loss name and hyper-parameters, e.g. `{name: dpo, beta: 0.1}`; `alignkit losses` lists them. Without a name, the recipe's default (the recipe table)."""
    losses: list = field(default_factory=list)
    """Weighted loss terms instead of `loss`, e.g. `[{name: dpo, weight: 1.0}, {name: sft, weight: 0.2}]`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


# ---------------------------------------------------------------------------------------------
# Field documentation: the string literal under each field, read from the source.


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring line} for a dataclass whose fields carry string docstrings."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)  # the source of a class is its class statement
    body = class_def.body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def config_key(name: str) -> str:
    """The config key of a dataclass field: a field named after a Python keyword carries a trailing
    underscore (`async_`) that the YAML key does not (`online.async`)."""
    return name[:-1] if name.endswith("_") else name


def field_name(cls: type, key: str) -> str | None:
    """The field of `cls` that config key `key` sets, or None."""
    return next((f.name for f in dataclasses.fields(cls) if config_key(f.name) == key), None)


def iter_fields(cls: type = RunConfig, prefix: str = ""):
    """Yield (dotted key, type, default, doc) for every leaf field, depth first."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + config_key(f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a hint is a class, never an instance
            yield from iter_fields(tp, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING  # every config field has a default
            default = f.default_factory()
        yield key, tp, default, docs.get(f.name, "")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        return name + " (optional)" if len(args) < len(typing.get_args(tp)) else name
    return getattr(tp, "__name__", str(tp))


def _read_by(key: str) -> str:
    names = registry.readers(key)
    return "" if len(names) == len(registry.RECIPES) else ", ".join(names) or "none"


def markdown_cell(text: str) -> str:
    """`text` as a Markdown table cell: a `|` outside code spans (a type's `a | b`, a norm's
    `|x|`) would end the cell, so it is escaped."""
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def format_help(markdown: bool = False) -> str:
    """The config reference, as terminal text or a Markdown table, with the recipes that read each
    key (from the recipe registry)."""
    rows = list(iter_fields())
    recipes = " | ".join(registry.RECIPES)
    if markdown:
        out = ["| key | type | default | read by | meaning |", "| --- | --- | --- | --- | --- |"]
        for key, tp, default, doc in rows:
            kind = recipes if key == "recipe" else _type_name(tp)
            cells = (f"`{key}`", markdown_cell(kind), f"`{default!r}`", _read_by(key) or "all", markdown_cell(doc))
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)
    out = ["Recipes:"]
    out += [
        f"  {s.name:<11} {s.summary} (data: {s.data}; default loss: {s.default_loss})"
        for s in registry.RECIPES.values()
    ]
    out.append("\nConfig keys (YAML nesting or dotted key=value overrides):")
    for key, tp, default, doc in rows:
        kind = recipes if key == "recipe" else _type_name(tp)
        readers = _read_by(key)
        out.append(
            f"  {key} ({kind}, default {default!r})" + (f"  [recipes: {readers}]" if readers else "") + f"\n      {doc}"
        )
    return "\n".join(out)


def recipe_table() -> str:
    """The recipe table of docs/training.md, from the registry."""
    out = [
        "| recipe | data | default loss | samples while training | what it trains |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in registry.RECIPES.values():
        out.append(f"| `{s.name}` | {s.data} | `{s.default_loss}` | {'yes' if s.samples else 'no'} | {s.summary} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, with type checks and suggestions.


def _valid_keys(cls: type = RunConfig) -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(config_key(f.name))
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{config_key(f.name)}.{k}" for k in _valid_keys(hints[f.name])]
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    if key in MOVED:
        return ConfigError(f"{where}`{key}` is now `{MOVED[key]}`.")
    near = closest(key, _valid_keys(), cutoff=0.5)
    if near is None:  # a misspelt leaf name under the right section, or the right leaf in another one
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _valid_keys()}
        leaf = closest(key.rsplit(".", 1)[-1], by_leaf)
        near = by_leaf[leaf] if leaf else None
    hint = f" Did you mean `{near}`?" if near else ""
    return ConfigError(
        f"{where}unknown config key `{key}`.{hint} Run `alignkit train --help-config` for the list of keys."
    )


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently coerce) one value against its annotation; raise ConfigError if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}`{key}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads `5e-6` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    expected = {str: str, int: int, float: float, bool: bool, dict: dict, list: list}.get(tp)
    if expected is None:
        return value
    if isinstance(value, bool) and expected is not bool:
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{where}`{key}` must be a {expected.__name__}; got {value!r} ({type(value).__name__}).")
    return value


def _build(cls: type, data: dict, prefix: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}`{prefix.rstrip('.') or 'config'}` must be a mapping; got {data!r}.")
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        name = field_name(cls, str(k))
        if name is None:
            raise _unknown_key_error(key, where)
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a hint is a class, never an instance
            kwargs[name] = _build(tp, v or {}, key + ".", where)
        else:
            kwargs[name] = _check_value(v, tp, key, where)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key.sub=value` override; the value is read as YAML (`3`, `1e-5`, `true`, `[a, b]`)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like `key=value` (for example `train.max_steps=10`).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({e}).") from None
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override `{key}`: `{p}` is not a section.")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | None = None, overrides: Sequence[str] = (), base: dict | None = None, saved: bool = False
) -> RunConfig:
    """Build a RunConfig from an optional YAML file, then `key=value` overrides applied in order.

    `base` holds defaults that sit under the file (recipes and the demo use it). `saved`: the file is
    one alignkit wrote (a run's config.yaml, a checkpoint's alignkit_config.yaml), possibly by an
    older version, so keys that moved since are carried to their new place (`upgrade_saved`)."""
    data: dict = dict(base or {})
    where = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found.")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values.")
        data = _merge(data, upgrade_saved(loaded) if saved else loaded)
        where = f"{path}: "
    for text in overrides:
        key, value = parse_override(text)
        if key == "loss" or key.startswith("loss."):
            _set_dotted(data, key, value)  # loss params are checked against the loss's signature later
            continue
        if key in MOVED:
            raise ConfigError(f"override: `{key}` is now `{MOVED[key]}`.")
        if key not in _valid_keys() or key in _SECTIONS:
            raise _unknown_key_error(key, "override: ")
        _set_dotted(data, key, value)
    recipe = data.get("recipe", RunConfig.recipe)
    spec = registry.get(recipe) if isinstance(recipe, str) else None
    if spec is not None:
        if "loss" not in data and not data.get("losses"):
            data["loss"] = {"name": spec.default_loss}
        elif isinstance(data.get("loss"), dict) and "name" not in data["loss"]:
            # `loss.beta=0.2` alone tunes the recipe's default loss rather than replacing the mapping.
            data["loss"] = {"name": spec.default_loss, **data["loss"]}
    cfg = _build(RunConfig, data, "", where)
    validate(cfg)
    check_reads(cfg, where)
    return cfg


def upgrade_saved(data: dict) -> dict:
    """A config alignkit saved before keys moved, in today's spelling, so old runs still resume,
    export and evaluate. A user's own file is not rewritten: its moved keys are errors (MOVED)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    train, online = data.get("train") or {}, data.get("online") or {}
    if "tensorboard" in train:  # a bool until trackers came (train.report_to)
        on = train.pop("tensorboard")
        train.setdefault("report_to", ["tensorboard"] if on else [])
    clip = {k: online.pop(k) for k in ("clip_low", "clip_high") if k in online}
    loss = data.get("loss")
    if clip and isinstance(loss, dict) and loss.get("name") == "ppo_clip":  # the only loss that read them
        data["loss"] = {**clip, **loss}
    return data


# Keys that moved; naming the new place beats "unknown key".
MOVED = {
    "online.clip_low": "loss.clip_low",
    "online.clip_high": "loss.clip_high",
    "train.tensorboard": "train.report_to",
}
_SECTIONS = (
    "model",
    "lora",
    "data",
    "train",
    "generation",
    "reward",
    "online",
    "critic",
    "ppo",
    "teacher",
    "dist",
    "health",
)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict (sections and mappings such as `loss` are walked)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_reads(cfg: RunConfig, where: str = "") -> None:
    """A setting the recipe does not read, set to anything but its default, is an error: it would
    have no effect. (A key left at its default passes, so a saved config, which lists every key,
    loads back.)"""
    spec = registry.get(cfg.recipe)
    defaults = flat_dict(to_dict(RunConfig(recipe=cfg.recipe, loss={"name": spec.default_loss})))
    given = flat_dict(to_dict(cfg))
    unread = [k for k, v in given.items() if v != defaults.get(k, v) and not spec.reads_key(k)]
    unread += [k for k in given if k not in defaults and not spec.reads_key(k)]  # e.g. loss.beta where unread
    if unread:
        keys = sorted(set(unread))
        lines = "; ".join(f"`{k}` ({', '.join(registry.readers(k)) or 'no recipe'} read it)" for k in keys)
        raise ConfigError(
            f"{where}recipe {cfg.recipe} does not read {lines}. Remove {'them' if len(keys) > 1 else 'it'}: "
            "a setting with no effect would make the run look like something it is not."
        )


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    t = cfg.train
    positive = {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.logprob_chunk_size": t.logprob_chunk_size,
        "train.pack_tokens": t.pack_tokens,
        "data.max_length": cfg.data.max_length,
        "generation.num_samples": cfg.generation.num_samples,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "generation.batch_size": cfg.generation.batch_size,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"`{key}` must be positive; got {v}.")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"`train.max_steps` must be positive; got {t.max_steps}.")
    check_trackers(t.report_to)  # names only: whether their packages are installed is checked when training starts
    _check_ranges(cfg)
    _check_health(cfg)
    spec = registry.get(cfg.recipe)
    if spec.samples:
        _check_env(cfg)
        _check_async(cfg)
        if cfg.online.iterations < 1:
            raise ConfigError(f"`online.iterations` must be >= 1; got {cfg.online.iterations}.")
    spec.check(cfg)  # what only this recipe needs (its spec says; this function names no recipe)
    if t.forward_tokens is not None and t.forward_tokens <= 0:
        raise ConfigError(f"`train.forward_tokens` must be positive (or unset); got {t.forward_tokens}.")
    if t.max_tokens_per_batch is not None and t.max_tokens_per_batch <= 0:
        raise ConfigError(
            f"`train.max_tokens_per_batch` must be positive (or unset to batch by count); got {t.max_tokens_per_batch}."
        )
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"`train.warmup_ratio` must be in [0, 1); got {t.warmup_ratio}.")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"`data.eval_fraction` must be in [0, 1); got {cfg.data.eval_fraction}.")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"`train.adam_betas` must be two numbers; got {t.adam_betas}.")
    mpl = cfg.data.max_prompt_length
    if mpl is not None and not 0 < mpl < cfg.data.max_length:
        raise ConfigError(
            f"`data.max_prompt_length` ({mpl}) must be positive and below `data.max_length` ({cfg.data.max_length})."
        )
    rw = cfg.reward
    if rw.disentangle and list(rw.objectives) != ["reward"]:
        raise ConfigError(
            f"`reward.disentangle: {rw.disentangle}` splits one reward into a quality and a length head; it "
            f"cannot be combined with several reward.objectives ({rw.objectives}). Use one of them."
        )
    odin_keys = (rw.length_coef, rw.orthogonal_coef, rw.length_sign, rw.correlation_penalty)
    if not rw.disentangle and odin_keys != (1.0, 1.0, "auto", "auto"):
        raise ConfigError(
            "`reward.length_coef`, `reward.orthogonal_coef`, `reward.length_sign` and `reward.correlation_penalty` "
            "set ODIN's terms and have no effect without `reward.disentangle: length`; set it, or remove them."
        )
    if rw.length_coef < 0 or rw.orthogonal_coef < 0:
        raise ConfigError(
            f"`reward.length_coef` and `reward.orthogonal_coef` must be >= 0; got {rw.length_coef}, {rw.orthogonal_coef}."
        )
    if rw.disentangle and cfg.train.forward_tokens:
        raise ConfigError(
            "`reward.disentangle: length` estimates its correlations over a whole micro-batch, and "
            f"`train.forward_tokens` ({cfg.train.forward_tokens}) would cut it into pieces, each with its own "
            "estimate from fewer replies. Unset `train.forward_tokens` (to save memory, use "
            "`model.gradient_checkpointing: true`)."
        )
    bad_parts = [x for x in cfg.lora.vision_parts if x not in ("projector", "vision")]
    if bad_parts or not isinstance(cfg.lora.vision_parts, list):
        raise ConfigError(f"`lora.vision_parts` takes `projector` and/or `vision`; got {cfg.lora.vision_parts!r}.")
    if cfg.lora.vision_parts and not (cfg.lora.enabled and cfg.lora.target_modules == "all-linear"):
        raise ConfigError(
            "`lora.vision_parts` adds a vision-language model's projector or vision tower to LoRA's `all-linear` "
            "targets; it has no effect without lora.enabled=true and lora.target_modules=all-linear."
        )
    if cfg.model.quantization and not cfg.lora.enabled:
        raise ConfigError(
            f"`model.quantization: {cfg.model.quantization}` stores the frozen base of a LoRA run (QLoRA); "
            "a quantized model cannot be trained in full. Set lora.enabled=true, or remove model.quantization."
        )
    if cfg.model.freeze_layers < 0:
        raise ConfigError(f"`model.freeze_layers` must be >= 0; got {cfg.model.freeze_layers}.")
    objectives = cfg.reward.objectives
    if (
        not objectives
        or not all(isinstance(o, str) and o for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise ConfigError(
            f"`reward.objectives` must be distinct non-empty names, e.g. [helpful, harmless]; got {objectives!r}."
        )
    g = cfg.generation
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError(
            f"`generation`: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got temperature={g.temperature}, "
            f"top_p={g.top_p}, top_k={g.top_k}."
        )
    if not isinstance(cfg.loss, dict) or "name" not in cfg.loss:
        raise ConfigError("`loss` must be a mapping with a `name`, e.g. `loss: {name: dpo, beta: 0.1}`.")
    tags = cfg.data.thinking_tags
    if not (isinstance(tags, list) and len(tags) == 2 and all(isinstance(x, str) and x for x in tags)) or (
        tags[0] == tags[1]
    ):
        raise ConfigError(f"`data.thinking_tags` must be two different non-empty strings [open, close]; got {tags!r}.")
    budget = g.max_thinking_tokens
    if budget is not None and not 0 < budget < g.max_new_tokens:
        raise ConfigError(
            f"`generation.max_thinking_tokens` ({budget}) must be positive and below `generation.max_new_tokens` "
            f"({g.max_new_tokens}): the answer comes after the reasoning, within max_new_tokens."
        )


ASYNC_STALENESS = {"sync": 0, "one_step_off": 1, "stream": 2}  # online.async.max_staleness by mode


def max_staleness(a: AsyncConfig) -> int:
    """The policy versions a sample may lag behind the trainer under `online.async`."""
    return a.max_staleness if a.max_staleness is not None else ASYNC_STALENESS[a.mode]


def _check_async(cfg: RunConfig) -> None:
    """`online.async` and the sampler servers: settings that contradict the mode, or a mode the
    placement cannot run."""
    a, g = cfg.online.async_, cfg.generation
    if g.request_timeout_s <= 0:
        raise ConfigError(f"`generation.request_timeout_s` must be positive; got {g.request_timeout_s}.")
    for key, urls in (("generation.sampler_server", g.sampler_server), ("generation.vllm_server", g.vllm_server)):
        if isinstance(urls, list) and (not urls or not all(isinstance(u, str) and u for u in urls)):
            raise ConfigError(f"`{key}` must be a URL or a non-empty list of URLs; got {urls!r}.")
    if g.weight_transport == "nccl" and not (g.backend == "vllm" and g.vllm_server):
        raise ConfigError(
            "`generation.weight_transport=nccl` sends weights to an `alignkit vllm-serve --weight-transport nccl` "
            "server: set generation.backend=vllm and generation.vllm_server (the colocated engine and alignkit's "
            "samplers take weights in memory or from the sync directory)."
        )
    if g.weight_transport == "nccl" and cfg.lora.enabled:
        raise ConfigError(
            "`generation.weight_transport=nccl` broadcasts full weights, and a LoRA run sends only its adapters "
            "(a few MB), which vLLM reads from the sync directory: leave generation.weight_transport at directory."
        )
    if g.sampler_server and g.backend != "transformers":
        raise ConfigError(
            "`generation.sampler_server` names an `alignkit sample-serve` (alignkit's own sampler), which "
            "goes with generation.backend=transformers; for a vLLM server set generation.vllm_server."
        )
    if a.mode in ("sync", "one_step_off") and a.max_staleness not in (None, ASYNC_STALENESS[a.mode]):
        raise ConfigError(
            f"`online.async.max_staleness` is {ASYNC_STALENESS[a.mode]} in mode {a.mode} (got {a.max_staleness}); "
            "for another bound set online.async.mode=stream."
        )
    if a.mode == "stream" and a.max_staleness is not None and a.max_staleness < 1:
        raise ConfigError(
            f"`online.async.max_staleness` must be at least 1 in mode stream; got {a.max_staleness} "
            "(0 is online.async.mode=sync)."
        )
    if a.buffer_size is not None and (a.mode != "stream" or a.buffer_size < 1):
        raise ConfigError(
            "`online.async.buffer_size` is read in mode stream only and must be at least 1; "
            f"got {a.buffer_size} with mode {a.mode}."
        )


def _check_env(cfg: RunConfig) -> None:
    """Multi-turn settings that cannot work together, or that have no effect without `env.name`."""
    e, g = cfg.env, cfg.generation
    if e.name is None:
        defaults = dataclasses.asdict(EnvConfig())
        changed = [f"env.{k}" for k, v in dataclasses.asdict(e).items() if k != "name" and v != defaults[k]]
        if changed:
            raise ConfigError(
                f"`{changed[0]}` has no effect without `env.name`: set env.name (e.g. env.name=calculator) "
                "or drop the key."
            )
        return
    if cfg.online.rewards is not None:
        raise ConfigError(
            "`online.rewards` has no effect with `env.name` set: the environment rewards each episode. "
            "Drop online.rewards (or score inside your environment's step)."
        )
    for key, bad, why in (
        (
            "online.overlong_buffer",
            cfg.online.overlong_buffer,
            "a multi-turn episode's length is bounded by env.max_tokens",
        ),
        ("generation.stop", bool(g.stop), "a model turn ends at its end-of-turn token"),
    ):
        if bad:
            raise ConfigError(f"`{key}` cannot be used with `env.name`: {why}. Drop the key.")
    if e.sandbox not in ("bwrap", "none") and ":" not in str(e.sandbox):
        raise ConfigError(
            f"`env.sandbox` must be `bwrap`, `none` (no isolation) or `file.py:Class`; got {e.sandbox!r}."
        )
    if e.max_turns < 1:
        raise ConfigError(f"`env.max_turns` must be >= 1; got {e.max_turns}.")
    if e.max_tokens is not None and not 0 < e.max_tokens < cfg.data.max_length:
        raise ConfigError(
            f"`env.max_tokens` ({e.max_tokens}) must be positive and below `data.max_length` "
            f"({cfg.data.max_length}): the episode and its prompt are trained as one sequence."
        )
    if not 0 < e.gamma <= 1:
        raise ConfigError(f"`env.gamma` must be in (0, 1]; got {e.gamma}.")
    if e.tools is not None and (not isinstance(e.tools, list) or not all(isinstance(t, str) and t for t in e.tools)):
        raise ConfigError(f"`env.tools` must be a list of tool names or file.py:function entries; got {e.tools!r}.")


def _check_ranges(cfg: RunConfig) -> None:
    """Numbers outside their meaningful range, caught here rather than deep inside a run (after
    the model load and the reference pass) as a library traceback."""
    t, lo, o = cfg.train, cfg.lora, cfg.online
    mis_off = o.is_mask_low == 0 and o.is_mask_high == 0  # masked importance sampling off
    rules = [
        (
            "train.learning_rate",
            t.learning_rate,
            t.learning_rate > 0 and math.isfinite(t.learning_rate),
            "a positive number, e.g. 5e-6",
        ),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("train.epochs", t.epochs, t.epochs > 0, "positive"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: only at the end)"),
        ("train.save_every", t.save_every, t.save_every >= 0, ">= 0 (0: only at the end)"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1 (resuming needs one)"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        (
            "train.eval_batch_size",
            t.eval_batch_size,
            t.eval_batch_size is None or t.eval_batch_size > 0,
            "positive (or unset)",
        ),
        ("lora.r", lo.r, lo.r > 0, "positive"),
        ("lora.alpha", lo.alpha, lo.alpha > 0, "positive"),
        ("lora.dropout", lo.dropout, 0 <= lo.dropout < 1, "in [0, 1)"),
        ("online.kl_coef", o.kl_coef, o.kl_coef >= 0, ">= 0"),
        ("critic.learning_rate", cfg.critic.learning_rate, cfg.critic.learning_rate > 0, "a positive number"),
        ("critic.max_grad_norm", cfg.critic.max_grad_norm, cfg.critic.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("critic.freeze_layers", cfg.critic.freeze_layers, cfg.critic.freeze_layers >= 0, ">= 0"),
        ("data.limit", cfg.data.limit, cfg.data.limit is None or cfg.data.limit > 0, "positive (or unset)"),
        ("dist.timeout_s", cfg.dist.timeout_s, cfg.dist.timeout_s > 0, "positive"),
        ("dist.context_parallel", cfg.dist.context_parallel, cfg.dist.context_parallel >= 1, ">= 1 (1: off)"),
        ("online.tis_cap", o.tis_cap, o.tis_cap == 0 or o.tis_cap >= 1, "0 (off) or at least 1"),
        (
            "online.is_mask_low",
            o.is_mask_low,
            mis_off or 0 < o.is_mask_low < 1,
            "in (0, 1) with online.is_mask_high above 1 (both 0: off)",
        ),
        (
            "online.is_mask_high",
            o.is_mask_high,
            mis_off or o.is_mask_high > 1,
            "above 1 with online.is_mask_low in (0, 1) (both 0: off)",
        ),
        ("online.dynamic_sampling_rounds", o.dynamic_sampling_rounds, o.dynamic_sampling_rounds >= 0, ">= 0"),
        (
            "online.overlong_buffer",
            o.overlong_buffer,
            0 <= o.overlong_buffer <= cfg.generation.max_new_tokens,
            f"between 0 (off) and generation.max_new_tokens ({cfg.generation.max_new_tokens})",
        ),
        (
            "generation.vllm_kv_cache_gib",
            cfg.generation.vllm_kv_cache_gib,
            cfg.generation.vllm_kv_cache_gib is None
            or (cfg.generation.vllm_kv_cache_gib > 0 and cfg.generation.vllm_gpu_memory_utilization is None),
            "a positive size in GiB, and not together with generation.vllm_gpu_memory_utilization (set one)",
        ),
        (
            "generation.vllm_gpu_memory_utilization",
            cfg.generation.vllm_gpu_memory_utilization,
            cfg.generation.vllm_gpu_memory_utilization is None or 0 < cfg.generation.vllm_gpu_memory_utilization < 1,
            "between 0 and 1 (or unset)",
        ),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"`{key}` must be {want}; got {value!r}.")
    safety_keys = ("safety_num_prompts", "safety_judge", "safety_max_new_tokens")
    changed = [k for k in safety_keys if getattr(t, k) != getattr(TrainConfig, k)]
    if changed and not t.safety_prompts:
        raise ConfigError(
            f"`train.{changed[0]}` has no effect without `train.safety_prompts` (harmful prompt records)."
        )
    if t.safety_num_prompts < 1 or t.safety_max_new_tokens < 1:
        raise ConfigError("`train.safety_num_prompts` and `train.safety_max_new_tokens` must be >= 1.")
    if o.dynamic_sampling_rounds != OnlineConfig.dynamic_sampling_rounds and not o.dynamic_sampling:
        raise ConfigError(
            "`online.dynamic_sampling_rounds` has no effect while `online.dynamic_sampling` is false; "
            "set online.dynamic_sampling=true or drop the key."
        )
    if len(t.adam_betas) == 2 and not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"`train.adam_betas` must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {t.adam_betas}.")


def _check_health(cfg: RunConfig) -> None:
    """`train.stop_on` names registered health rules; `health.*` thresholds are in range."""
    h, stop_on = cfg.health, cfg.train.stop_on
    check_rule_names(stop_on)
    if stop_on and not h.enabled:
        raise ConfigError(
            f"`train.stop_on` is {stop_on} but `health.enabled` is false, so no rule would run; "
            "set health.enabled=true or empty train.stop_on."
        )
    rules = [
        ("health.warmup_steps", h.warmup_steps, h.warmup_steps >= 0, ">= 0"),
        ("health.window", h.window, h.window >= 3, ">= 3 (a trend needs points)"),
        ("health.smooth", h.smooth, h.smooth >= 1, ">= 1"),
        ("health.clear_rows", h.clear_rows, h.clear_rows >= 1, ">= 1"),
        ("health.ln2_tolerance", h.ln2_tolerance, h.ln2_tolerance > 0, "positive"),
        ("health.trend_corr", h.trend_corr, 0 <= h.trend_corr <= 1, "in [0, 1]"),
        ("health.displacement_drop", h.displacement_drop, h.displacement_drop >= 0, ">= 0"),
        ("health.kl_budget", h.kl_budget, h.kl_budget > 0, "positive"),
        ("health.eval_trend", h.eval_trend, h.eval_trend >= 1, ">= 1"),
        ("health.entropy_floor", h.entropy_floor, h.entropy_floor >= 0, ">= 0"),
        ("health.entropy_fall", h.entropy_fall, 0 < h.entropy_fall < 1, "in (0, 1)"),
        ("health.length_growth", h.length_growth, h.length_growth > 1, "above 1"),
        ("health.disagreement_growth", h.disagreement_growth, h.disagreement_growth > 1, "above 1"),
        ("health.zero_variance_fraction", h.zero_variance_fraction, 0 <= h.zero_variance_fraction < 1, "in [0, 1)"),
        ("health.mismatch_threshold", h.mismatch_threshold, h.mismatch_threshold > 0, "positive"),
        ("health.staleness_limit", h.staleness_limit, h.staleness_limit > 0, "positive"),
        ("health.is_weight_drift", h.is_weight_drift, h.is_weight_drift > 0, "positive"),
        ("health.masked_fraction_limit", h.masked_fraction_limit, 0 < h.masked_fraction_limit < 1, "in (0, 1)"),
        ("health.spike_factor", h.spike_factor, h.spike_factor > 1, "above 1"),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"`{key}` must be {want}; got {value!r}.")


def to_dict(cfg) -> dict:
    """The config as nested dicts under its config keys (`online.async`, not the field `async_`)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {config_key(k): v for k, v in items})


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":  # python -m alignkit.config  -> the configuration reference (docs/config.md)
    print(format_help(markdown=True))
