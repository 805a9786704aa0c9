"""URIAL: aligning a base model in context (Lin et al. 2024, arXiv 2312.01552).

The paper finds that alignment tuning mostly changes style tokens, and that a base model given a
system text and a few stylistic examples answers much like its aligned version. The prompt is
plain text, no chat template: the template's system text and examples, then the user's query in
the same format, ending where an answer starts. The answer ends at the closing fence.

Two templates ship in `alignkit/inference/templates/`: `default` (urial.txt, three examples, about
500 tokens) and `short` (urial_short.txt, one example, about 190 tokens, for when prompt cost
matters). They are meant to be edited: copy one, change the system text or examples, and pass it
with `--urial-template FILE`. A template must contain `{query}` once, where the query goes; earlier
turns of a multi-turn prompt are written before it as query/answer pairs.

KL: the model's own likelihood of the answer is known under both prompts, so the reported KL is
an estimate, the mean of log p(y | URIAL prompt) - log p(y | chat prompt) over URIAL's answers
(the chat prompt is the tokenizer's template; this needs one extra scoring pass).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.generation.decode import SamplingParams, sample
from alignkit.inference.result import Choice, StrategyResult
from alignkit.logprob_passes import sample_logps
from alignkit.rewards.functions import score_ragged

FENCE = "```"


SHIPPED = {"default": "urial.txt", "short": "urial_short.txt"}


def load_template(path: str | None = None) -> str:
    """The URIAL template: a shipped one by name (`default`, `short`; None is `default`) or a file."""
    name = path or "default"
    if name in SHIPPED:
        text = resources.files("alignkit.inference").joinpath(f"templates/{SHIPPED[name]}").read_text(encoding="utf-8")
    else:
        file = Path(name)
        if not file.is_file():
            raise ConfigError(
                f"--urial-template {path}: no such file, and not a shipped template ({', '.join(SHIPPED)})."
            )
        text = file.read_text(encoding="utf-8")
    if text.count("{query}") != 1:
        raise ConfigError(
            f"URIAL template {path} must contain {{query}} exactly once (where the query goes); "
            f"it has {text.count('{query}')}."
        )
    return text


def render(template: str, prompt) -> str:
    """A prompt (string or message list) in the template's query/answer format."""
    if isinstance(prompt, str):
        return template.replace("{query}", prompt.strip())
    turns = [m for m in prompt if m["role"] in ("user", "assistant")]
    if not turns or turns[-1]["role"] != "user":
        raise ConfigError("a URIAL prompt must end with a user message.")
    system = " ".join(m["content"].strip() for m in prompt if m["role"] == "system")
    earlier = []
    for m in turns[:-1]:
        head = "# Query:" if m["role"] == "user" else "# Answer:"
        earlier.append(f"{head}\n{FENCE}\n{m['content'].strip()}\n{FENCE}\n\n")
    query = turns[-1]["content"].strip()
    if system:
        query = f"{system}\n\n{query}"
    body = template.replace("{query}", query)
    if earlier:  # earlier turns go before the final query block
        cut = body.rindex("# Query:")
        body = body[:cut] + "".join(earlier) + body[cut:]
    return body


def answer_of(text: str) -> str:
    """The answer inside its fence: everything before the closing fence."""
    return text.split(FENCE)[0].strip()


def urial(
    model,
    tokenizer,
    reward,
    prompts: list,
    columns: dict,
    params: SamplingParams,
    *,
    template: str | None = None,
    seed: int = 0,
    batch_size: int = 8,
    kl_max_length: int = 1024,
    progress: bool = False,
) -> StrategyResult:
    start = time.perf_counter()
    tpl = load_template(template)
    texts = [render(tpl, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    p = params.but(n=1, stop=tuple(params.stop) + (FENCE,))
    groups = sample(
        model,
        ids,
        p,
        eos_ids=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
        progress=progress,
        desc="urial",
    )
    answers = [answer_of(g[0].text) for g in groups]
    scores, _ = score_ragged(reward, prompts, [[a] for a in answers], columns)
    kl, kl_kind, per = None, None, [None] * len(prompts)
    if tokenizer.chat_template is not None:
        chat = sample_logps(model, tokenizer, [_messages(x) for x in prompts], answers, kl_max_length, batch_size)
        per = [sum(g[0].logprobs) - float(c) for g, c in zip(groups, chat)]
        kl, kl_kind = sum(per) / max(1, len(per)), "estimate"
    choices = [
        Choice(a, s[0], [a], s, 0, len(g[0].token_ids), kl=k) for a, s, g, k in zip(answers, scores, groups, per)
    ]
    seconds = time.perf_counter() - start
    return StrategyResult(
        "urial", choices, seconds, sum(len(x) for x in ids), kl, kl_kind, {"template": template or "default"}
    )


def _messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
