"""The documentation runs as written against this version.

- Every fenced code block of README.md and docs/ names its language (```bash, ```yaml, ...), so the
  checks below know what they are reading.
- README's quickstart runs as written, command by command, on a tiny model (seconds), and trains:
  DPO moves its implicit reward, GRPO logs its rewards, `alignkit eval` writes its metrics.
- Every other command of a ```bash block is parsed by the parser of the program it calls, without
  running it: `alignkit ...` by alignkit's own argparse parser (with the `key=value` overrides of
  `alignkit train` loaded by the config loader, against the page's own YAML block when it passes
  `--config NAME` and the page has a block starting `# NAME`), `python SCRIPT ...` by the options
  SCRIPT's parser declares, `torchrun ...` by torch's own launcher parser, `make X` by the
  Makefile's targets; each alignkit subcommand's `--help` runs. A program none of these knows
  (pip, apt-get, ...) must be in EXTERNAL, which says why it is not checked.
- Every ```yaml block loads with alignkit's config loader when it is a whole config (it has a
  `recipe`); a fragment must use only keys the config has.
- The site builds with `mkdocs build --strict` and no built page loads a script, style sheet, font
  or image from another host (it works offline).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alignkit.config import iter_fields, load_config
from alignkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"bash", "yaml", "python", "json", "text"}
# Programs the docs tell you to run that this test does not run or parse, and why.
EXTERNAL = {
    "pip": "installs packages (`make install` runs the same installs)",
    "sudo": "system package installs (`make sandbox` / `make browser` do them)",
    "source": "activates the virtual environment `make install` creates",
    "tensorboard": "third-party viewers of a run's tracker files",
    "wandb": "third-party viewers of a run's tracker files",
    "trackio": "third-party viewers of a run's tracker files",
    "mlflow": "third-party viewers of a run's tracker files",
    "hf": "the Hugging Face CLI (uploads a model)",
}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line + 1 + offset}"


def code_blocks(page: Path) -> list[Block]:
    """Fenced code blocks (also indented ones inside lists), with their language."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[j]):
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: a code block that is never closed"
        body = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j])
        out.append(Block(page, i + 1, lang, body))
        i = j + 1
    return out


BLOCKS = [b for page in PAGES for b in code_blocks(page)]


def commands(block: Block) -> list[tuple[int, str]]:
    """(line offset, command) of a bash block: continuation lines joined, comment-only lines and
    comments dropped."""
    out, current, start = [], "", 0
    for k, line in enumerate(block.text.splitlines()):
        if not current:
            start = k
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        words = shlex.split(current, comments=True)
        if words:
            out.append((start, current))
        current = ""
    return out


def test_every_code_block_names_its_language():
    unnamed = [f"{b.where()} ```{b.lang}" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not unnamed, f"code blocks without a known language ({sorted(LANGUAGES)}):\n" + "\n".join(unnamed)
    assert sum(b.lang == "bash" for b in BLOCKS) > 40 and sum(b.lang == "yaml" for b in BLOCKS) > 10


def test_readme_is_an_entry_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    for heading in ("## Two commands", "## Quickstart", "## Methods", "## Where to go next"):
        assert heading in text, heading
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
    linked = set(re.findall(r"\]\(docs/methods/([\w-]+)\.md\)", text))
    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")} - {"index"}
    assert linked == pages, f"method pages the README's table does not link: {pages - linked}"


# -- the quickstart, run as written -------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S).group(1)


def test_the_readme_quickstart_runs_as_written(tmp_path):
    """Every bash command of README's Quickstart, in order, in a fresh directory that has the
    repository's examples/ (as a clone has), with `alignkit` and `python` from this environment."""
    section = readme_section("Quickstart")
    blocks = [b for b in code_blocks(ROOT / "README.md") if b.lang == "bash" and b.text in section]
    cmds = [c for b in blocks for _, c in commands(b)]
    assert len(cmds) >= 7, cmds
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `alignkit` as the console script would run it, importing this checkout; `python` this one
    for name, run in (("alignkit", f'"{sys.executable}" -m alignkit'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    for cmd in cmds:
        done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README quickstart: `{cmd}` failed:\n{done.stderr[-3000:]}"
    runs = tmp_path / "runs" / "quickstart"
    dpo = json.loads((runs / "dpo" / "summary.json").read_text())
    assert dpo["status"] == "finished" and dpo["steps"] == 8
    assert dpo["eval"]["loss"] < math.log(2) and dpo["eval"]["rewards/margins"] > 0  # DPO moved the policy
    grpo = json.loads((runs / "grpo" / "summary.json").read_text())
    assert grpo["status"] == "finished" and grpo["steps"] == 4
    assert {"reward/numeric_match", "reward/regex", "entropy", "logprob_mismatch"} <= set(grpo["train"])
    assert (runs / "dpo" / "eval" / "metrics.json").is_file() and (runs / "dpo" / "report.html").is_file()
    assert (runs / "grpo" / "final" / "config.json").is_file()


# -- every other command: parsed by its program's own parser ----------------------------------


def alignkit_parser():
    from alignkit.cli import build_parser

    return build_parser()


def parse_alignkit(argv: list[str]):
    """Parse as `alignkit` does (alignkit.cli._main: `key=value` overrides may follow options);
    returns the namespace, or raises AssertionError with argparse's message."""
    parser, err = alignkit_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(argv)
            if extra:
                if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                    args.overrides = list(args.overrides) + extra
                else:
                    parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        if e.code == 0:  # --help, --version
            return None
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None
    return args


def page_configs(page: Path) -> dict[str, str]:
    """YAML blocks of a page that start with `# NAME.yaml`: {NAME.yaml: text}."""
    out = {}
    for b in code_blocks(page):
        m = re.match(r"#\s*([\w.-]+\.ya?ml)\s*$", b.text.splitlines()[0]) if b.lang == "yaml" and b.text else None
        if m:
            out[m.group(1)] = b.text
    return out


def check_alignkit(argv: list[str], block: Block, tmp_path: Path) -> None:
    args = parse_alignkit(argv)
    if args is None:
        return
    config = getattr(args, "config", None)
    overrides = list(getattr(args, "overrides", None) or [])
    if argv[:1] != ["train"] or getattr(args, "help_config", False):
        return
    if config:
        text = page_configs(block.page).get(Path(config).name)
        if text is None:  # a config this page does not show (a run's saved config.yaml, ...)
            check_keys({o.split("=", 1)[0]: None for o in overrides}, "")
            return
        path = tmp_path / Path(config).name
        path.write_text(text)
        load_config(str(path), overrides)
    else:
        load_config(None, overrides)


def check_script(argv: list[str]) -> None:
    """`python SCRIPT args`: SCRIPT is in the repository and declares every option passed."""
    script = ROOT / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"
    declared = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            declared |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    for word in argv[1:]:
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            option = word.split("=", 1)[0]
            assert option in declared, f"{argv[0]} has no option {option} (it declares {sorted(declared)})"


def check_torchrun(argv: list[str], block: Block, tmp_path: Path) -> None:
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"torchrun: {err.getvalue().strip().splitlines()[-1]}") from None
    assert args.module and args.training_script == "alignkit", "torchrun commands in the docs run `-m alignkit`"
    check_alignkit(list(args.training_script_args), block, tmp_path)


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def check_command(cmd: str, block: Block, tmp_path: Path) -> None:
    words = shlex.split(cmd, comments=True)
    if words[-1] == "&":  # started in the background
        words = words[:-1]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    program, argv = words[0], words[1:]
    if program == "alignkit":
        check_alignkit(argv, block, tmp_path)
    elif program in ("python", "python3", ".venv/bin/python"):
        if argv[:2] == ["-m", "alignkit"]:
            check_alignkit(argv[2:], block, tmp_path)
        elif argv[:2] == ["-m", "pytest"]:
            assert all((ROOT / a).exists() for a in argv[2:] if a.startswith("tests/")), cmd
        else:
            check_script(argv)
    elif program == "torchrun":
        check_torchrun(argv, block, tmp_path)
    elif program == "make":
        assert set(argv) <= make_targets(), f"the Makefile has no target {set(argv) - make_targets()}"
    elif program == "bash":
        assert (ROOT / argv[0]).is_file(), f"{argv[0]} does not exist"
    else:
        assert program in EXTERNAL, f"`{program}`: a program this test does not know; check it or add it to EXTERNAL"


COMMANDS = [(b, off, c) for b in BLOCKS if b.lang == "bash" for off, c in commands(b)]
# Commands known to be wrong on a page this branch may not edit: {(page, text the command contains):
# the fix}. The test fails when one of them starts to pass, so the entry goes when the page is fixed.
KNOWN_WRONG: dict = {}  # (page, command text): why it is wrong, for a command not fixed yet


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_command_parses(page, tmp_path):
    failures, known = [], {k for k in KNOWN_WRONG if k[0] == page}
    for block, off, cmd in COMMANDS:
        if block.page.relative_to(ROOT).as_posix() != page:
            continue
        wrong = {k for k in known if k[1] in " ".join(cmd.split())}
        try:
            check_command(cmd, block, tmp_path)
        except (AssertionError, ConfigError) as e:
            if not wrong:
                failures.append(f"{block.where(off)}: `{' '.join(cmd.split())}`\n    {e}")
            known -= wrong
    assert not failures, "\n".join(failures)
    assert not known, f"fixed, so remove from KNOWN_WRONG: {sorted(known)}"


def test_the_commands_are_found_and_every_subcommand_help_runs():
    """Each alignkit subcommand the docs use prints its help; the extraction finds the commands."""
    used = set()
    for _, _, cmd in COMMANDS:
        words = shlex.split(cmd, comments=True)
        if words[0] == "alignkit":
            sub = [w for w in words[1:3] if re.fullmatch(r"[a-z][a-z-]*", w)]
            used.add(tuple(sub[:2] if sub[:1] in (["data"], ["steer"]) else sub[:1]))
    assert {("train",), ("eval",), ("generate",), ("data", "show"), ("steer", "fit")} <= used, used
    for sub in sorted(used):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            alignkit_parser().parse_args([*sub, "--help"])
        assert e.value.code == 0 and out.getvalue().startswith("usage: alignkit " + " ".join(sub)), sub


# -- YAML configs --------------------------------------------------------------------------------


def check_keys(data: dict, prefix: str) -> None:
    """Every key of a config fragment is a config key or a section holding config keys."""
    keys = {k for k, *_ in iter_fields()}
    for name, value in data.items():
        key = prefix + str(name)
        parts = key.split(".")
        if any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1)):  # a key, or inside a mapping one
            continue
        assert any(k.startswith(key + ".") for k in keys), f"`{key}` is not a config key"
        if value is not None:
            assert isinstance(value, dict), f"`{key}` is a section; it takes a mapping"
            check_keys(value, key + ".")


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.lang == "yaml"], ids=lambda b: f"{b.page.relative_to(ROOT)}:{b.line}"
)
def test_yaml_blocks_are_valid_configs(block, tmp_path):
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where()}: not a mapping"
    if "recipe" in data:
        path = tmp_path / "config.yaml"
        path.write_text(block.text)
        load_config(str(path))  # raises ConfigError naming the key and the fix
    else:
        check_keys(data, "")


def test_a_wrong_command_or_key_is_caught(tmp_path):
    """The checks above fail on what they are meant to catch."""
    block = Block(ROOT / "README.md", 1, "bash", "")
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        check_command("alignkit eval --model M --no-such-flag", block, tmp_path)
    with pytest.raises(ConfigError, match="train.learning_rat"):
        check_command("alignkit train recipe=dpo train.learning_rat=1", block, tmp_path)
    with pytest.raises(AssertionError, match="has no option --no-such-flag"):
        check_command("python bench/grpo_vs_trl.py --no-such-flag", block, tmp_path)
    with pytest.raises(AssertionError, match="no target"):
        check_command("make docz", block, tmp_path)
    with pytest.raises(AssertionError, match="not a config key"):
        check_keys({"online": {"reward": "x"}}, "")


# -- the site ----------------------------------------------------------------------------------


def test_the_site_builds_strictly_and_loads_nothing_from_other_hosts(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 40
    external = re.compile(r"""^(https?:)?//""")
    loads = re.compile(r"""<(script|link|img|iframe|source|embed)\b[^>]*?\b(src|href)=["']([^"']+)["']""", re.I)
    found = []
    for page in pages:
        html = page.read_text()
        for tag, _, url in loads.findall(html):
            if external.match(url):
                found.append(f"{page.relative_to(site)}: <{tag}> {url}")
        for pattern in ("fonts.googleapis", "fonts.gstatic", "googletagmanager", 'class="mermaid"'):
            if pattern in html:
                found.append(f"{page.relative_to(site)}: {pattern}")
    for sheet in site.rglob("*.css"):
        css = sheet.read_text()
        found += [f"{sheet.relative_to(site)}: {u}" for u in re.findall(r"url\(\s*['\"]?(?:https?:)?//[^)]*\)", css)]
        found += [f"{sheet.relative_to(site)}: @import" for _ in re.findall(r"@import", css)]
    assert not found, "the site loads resources from other hosts:\n" + "\n".join(found)
    config = (site / "config" / "index.html").read_text()
    assert "train.learning_rate" in config and "generated:" not in config  # rendered at build time
    quickstart = (site / "quickstart" / "index.html").read_text()
    assert "examples/quickstart_data.py" in quickstart
