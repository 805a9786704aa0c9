"""Regenerate the docs that come from code: the README's config reference and loss table, and
docs/losses.md (one section per loss, from its docstring).

    python scripts/update_readme.py          # rewrite README.md and docs/losses.md in place
    python scripts/update_readme.py --check  # exit 1 if either is stale (the tests do this)
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
LOSS_DOCS = README.parent / "docs" / "losses.md"

DATA_NOTES = {
    "paired": "`recipe: dpo`, preference pairs",
    "sft": "`recipe: sft` (or a term in `losses` on pairs: the chosen completion)",
    "unpaired": "`recipe: unpaired`, records with `prompt`, `completion`, `label`",
    "masked": "`recipe: masked`, pairs with `chosen_sentences` / `rejected_sentences`",
    "negative": "`recipe: negative`, records with `prompt`, `rejected`; `generation.num_samples` replies per "
    "prompt are sampled from the initial model before training",
    "reward": "`recipe: reward`, preference pairs (optionally per-objective `labels`, a `margin`)",
    "rollout": "the policy loss of `recipe: grpo`, `rloo`, `reinforce_pp` or `ppo`: per-token log-probs of "
    "sampled completions",
    "distill": "`recipe: distill`: [positions, vocab] log-probs of the student, the teacher (and the teacher's "
    "reference) at the student's sampled positions",
    "value": "the value loss of `recipe: ppo` (`critic.value_clip`)",
}


def loss_docs() -> str:
    """docs/losses.md: every registered loss with its formula, paper and departures (docstrings)."""
    import inspect

    from alignkit import losses

    out = [
        "# Losses",
        "",
        "Generated from the loss docstrings by `python scripts/update_readme.py`; do not edit by hand.",
        "Every loss is a pure function of summed log-probs (`alignkit/losses/`), tested against an",
        "independent float64 formula and by a short training run (`tests/test_loss*.py`).",
        "",
        "Metrics every pair loss logs: `rewards/chosen`, `rewards/rejected` (implicit rewards, e.g.",
        "beta * (log pi - log pi_ref)), `rewards/margins` (their difference), `rewards/accuracies`",
        "(fraction of pairs with chosen reward above rejected), `logps/chosen`, `logps/rejected`.",
        "",
    ]
    for spec in losses.available():
        params = ", ".join(f"`{k}={v!r}`" for k, v in spec.params.items()) or "none"
        out += [
            f"## `{spec.name}`",
            "",
            spec.summary,
            "",
            f"- paper: {spec.citation}",
            f"- data: {DATA_NOTES.get(spec.data, spec.data)}; reference model: "
            f"{'yes' if spec.needs_reference else 'no'}",
            f"- inputs: {', '.join(f'`{i}`' for i in spec.inputs)}",
            f"- parameters: {params}",
            f"- usage: `loss: {{name: {spec.name}}}`",
            "",
            "```text",
            inspect.cleandoc(spec.fn.__doc__ or ""),
            "```",
            "",
        ]
    return "\n".join(out)


def sections() -> dict[str, str]:
    from alignkit.cli import main
    from alignkit.config import format_help, recipe_table

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["losses", "--markdown"])
    return {
        "config-reference": format_help(markdown=True),
        "loss-table": buf.getvalue().strip(),
        "recipe-table": recipe_table(),
    }


def render(text: str) -> str:
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    current, new = README.read_text(), render(README.read_text())
    docs_now = LOSS_DOCS.read_text() if LOSS_DOCS.is_file() else ""
    docs_new = loss_docs()
    if "--check" in sys.argv:
        sys.exit(0 if (new, docs_new) == (current, docs_now) else 1)
    README.write_text(new)
    LOSS_DOCS.parent.mkdir(exist_ok=True)
    LOSS_DOCS.write_text(docs_new)
