# The two commands of the quick start: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build; on a CUDA machine pass e.g. TORCH_SPEC="torch" to get the default build.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=
PYTEST_ARGS ?=

.PHONY: install browser serve test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/zomni serve $(if $(MODEL),--model $(MODEL)) --host $(HOST) --port $(PORT)

# The browser test (tests/test_browser_playground.py) drives Debian's chromium through its
# chromedriver; installing them needs root (apt-get), else this stops saying what to run.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    apt-get install -y -qq chromium chromium-driver; \
	  else echo "make test: chromium and chromedriver are missing (the browser test" \
	    "needs them); run 'sudo apt-get install chromium chromium-driver', then" \
	    "make test again" >&2; exit 1; fi

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
