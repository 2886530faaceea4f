# Single entry point. `make book` builds the HTML book; `make test` runs every check (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test unit nbval html system-deps venv lock clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

system-deps:
	@bash tools/system-deps.sh

# The HTML book (outputs are committed; nothing is executed).
book: venv
	$(BIN)/jupyter-book build --keep-going .
	@echo "书已构建：用浏览器打开 file://$(CURDIR)/_build/html/index.html"

html: venv
	$(BIN)/jupyter-book build -W -n --keep-going .

# Every check: the book builds with warnings as errors, then unit tests, nbval on every notebook and the
# render check of the built book in headless Chromium. pytest runs last so its summary closes the log.
test: venv system-deps html
	COMPANION_REQUIRE_RENDER=1 $(BIN)/python -m pytest --nbval --durations=0 -q

unit: venv
	$(BIN)/python -m pytest tests -q

nbval: venv
	$(BIN)/python -m pytest --nbval book -q --durations=0

lock:
	$(BIN)/python -m pip install -q -r requirements.in && $(BIN)/python tools/lock.py

clean:
	rm -rf _build
