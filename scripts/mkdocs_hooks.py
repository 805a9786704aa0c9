"""MkDocs hooks (mkdocs.yml `hooks:`): what the site build does besides rendering docs/.

- Generated tables: a page's `<!-- generated:NAME -->` line becomes the table rendered from the
  code at build time (scripts/gen_docs.py: the recipe table, the loss table, the configuration
  reference from the config dataclasses' docstrings), so the site cannot show a stale one.
- README sections: `<!-- readme-section:Quickstart -->` becomes that `## ` section of README.md
  (its links into docs/ made relative to the site), so the quickstart a test runs from the README
  is the one the site shows, without a second copy to keep in step.
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
_README_SECTION = re.compile(r"^<!-- readme-section:(.+?) -->$", re.M)
_LINK = re.compile(r"\]\((" + "|".join(re.escape(k) for k in REPO_LINKS) + r")(#[^)]*)?\)")


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_section(title: str, where: str, depth: int = 0) -> str:
    """The body of README.md's `## title` section, its `docs/x.md` links made relative to a page
    `depth` directories below docs/."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        raise ValueError(f"{where}: README.md has no section `## {title}`")
    return re.sub(r"\]\(docs/", "](" + "../" * depth, m.group(1).strip("\n"))


def on_page_markdown(markdown: str, page, config, files) -> str:
    where = f"docs/{page.file.src_path}"
    depth = page.file.src_uri.count("/")
    markdown = _README_SECTION.sub(lambda m: readme_section(m.group(1), where, depth), markdown)
    markdown = _gen_docs().render(markdown, where=where)
    return _LINK.sub(lambda m: f"]({REPO_LINKS[m.group(1)]}{m.group(2) or ''})", markdown)
