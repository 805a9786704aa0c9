"""MkDocs hooks (mkdocs.yml `hooks:`): what the site build does besides rendering docs/.

- Generated tables: a page's `<!-- generated:NAME -->` line becomes the table rendered from the
  code at build time (scripts/gen_docs.py: the recipe table, the loss table, the configuration
  reference from the config dataclasses' docstrings), so the site cannot show a stale one.
- Links to repository files that are pages of the site: a page written to be read on GitHub too
  may link `../BENCHMARKS.md#section`; on the site that is `benchmarks.md#section`. Any other link
  out of docs/ is left alone, and `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# repository files (relative to docs/) -> the page of the site that holds their content
REPO_LINKS = {"../BENCHMARKS.md": "benchmarks.md", "../README.md": "index.md"}
_LINK = re.compile(r"\]\((" + "|".join(re.escape(k) for k in REPO_LINKS) + r")(#[^)]*)?\)")


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _gen_docs().render(markdown, where=f"docs/{page.file.src_path}")
    return _LINK.sub(lambda m: f"]({REPO_LINKS[m.group(1)]}{m.group(2) or ''})", markdown)
