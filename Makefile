# LSLPN: two commands for users.
#   make demo   set up, then run the end-to-end demo on the synthetic phantom
#   make test   set up, then run the test suite
#   make lint   set up, then run ruff (pyproject.toml: pycodestyle, pyflakes, import order, line length 110)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256

.PHONY: setup test demo clean-demo gpu-check bench-chaos lint

# Idempotent: re-installs only when requirements.txt or pyproject.toml changed (their hash is stamped).
# Byte-compiled on every core after the install (pip compiles on one core; README gives the install time).
# The repository itself is installed in editable mode, so its packages import from any folder.
setup:
	@want=$$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1); \
	have=$$(cat $(STAMP) 2>/dev/null); \
	if [ -x "$(PY)" ] && [ "$$want" = "$$have" ]; then \
		echo "setup: $(VENV) is up to date with requirements.txt and pyproject.toml"; \
	else \
		echo "setup: installing requirements.txt into $(VENV) (first time: a few minutes)"; \
		[ -x "$(PY)" ] || $(PYTHON) -m venv $(VENV) || exit 1; \
		$(PY) -m pip install --disable-pip-version-check -q --no-compile -r requirements.txt || exit 1; \
		$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
			> /dev/null || true; \
		$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . || exit 1; \
		echo "$$want" > $(STAMP); \
	fi

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m demo

# CHAOS-T2 MRI under SSL-ALPNet's protocol (writes docs/bench_chaos.md); DATA=your copy (report under
# runs/bench_chaos/), ARGS=e.g. --folds 0
bench-chaos: setup
	$(PY) scripts/bench_chaos.py $(if $(DATA),--data $(DATA),--publish) $(ARGS)

# On a GPU machine (no `make setup` needed there; docs/gpu_check.md). ARGS=--dry-run on a CPU.
gpu-check:
	tools/gpu_check.sh $(ARGS)

clean-demo:
	rm -rf runs/demo data/phantom data/prepared_phantom
