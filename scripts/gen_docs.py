"""The documentation that comes from code.

- docs/losses.md, one section per registered loss from its docstring, is a file in the repository
  (GitHub shows it too): `python scripts/gen_docs.py` rewrites it, `--check` exits 1 when it is
  stale (tests/test_docs.py runs the check).
- The recipe table, the loss table and the configuration reference are not stored anywhere: a page
  holds a marker line `<!-- generated:NAME -->` and the MkDocs hook (scripts/mkdocs_hooks.py) puts
  the rendering in its place on every build, so the site cannot show a stale table.

    python scripts/gen_docs.py          # rewrite docs/losses.md
    python scripts/gen_docs.py --check  # exit 1 if docs/losses.md is stale
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_DOCS = ROOT / "docs" / "losses.md"
MARKER = re.compile(r"^<!-- generated:([\w-]+) -->$", re.M)

DATA_NOTES = {
    "paired": "`recipe: dpo`, preference pairs",
    "sft": "`recipe: sft` (or a term in `losses` on pairs: the chosen completion)",
    "unpaired": "`recipe: unpaired`, records with `prompt`, `completion`, `label`",
    "masked": "`recipe: masked`, pairs with `chosen_sentences` / `rejected_sentences`",
    "negative": "`recipe: negative`, records with `prompt`, `rejected`; `generation.num_samples` replies per "
    "prompt are sampled from the initial model before training",
    "reward": "`recipe: reward`, preference pairs (optionally per-objective `labels`, a `margin`, or a soft `prob`)",
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
        "Generated from the loss docstrings by `python scripts/gen_docs.py`; do not edit by hand.",
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
    """The generated tables by marker name, rendered from the code (the registries, the config
    dataclasses' docstring lines)."""
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


def render(text: str, where: str = "page") -> str:
    """`text` with every `<!-- generated:NAME -->` line replaced by that table; an unknown NAME is
    an error naming the page and the known names."""
    found = MARKER.findall(text)
    if not found:
        return text
    tables = sections()
    unknown = sorted(set(found) - set(tables))
    if unknown:
        raise ValueError(f"{where}: unknown generated section(s) {unknown}; known: {sorted(tables)}")
    return MARKER.sub(lambda m: tables[m.group(1)], text)


if __name__ == "__main__":
    now = LOSS_DOCS.read_text() if LOSS_DOCS.is_file() else ""
    new = loss_docs()
    if "--check" in sys.argv:
        if new != now:
            print("docs/losses.md is stale: run `python scripts/gen_docs.py`", file=sys.stderr)
        sys.exit(0 if new == now else 1)
    LOSS_DOCS.write_text(new)
