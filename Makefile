# Single entry point. `make book` builds the HTML book; `make test` runs every check (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test unit nbval nbval-foreign colab colab-foreign html system-deps venv lock clean

# A CPU unlike this one: PyTorch's portable kernels, MKL and oneDNN held to SSE4. Notebooks must reproduce
# under it too (another laptop, CI, Colab); conftest.py refuses to run if torch did not take it.
FOREIGN_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41

venv: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
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

# Every check (what CI runs), in two passes that each end with their summary. 1: the book builds with warnings as
# errors; unit tests and the render check of the built book in headless Chromium. 2: nbval on every notebook,
# installed as the Colab setup cell installs it (tools/colab_like.py) and on a simulated foreign CPU, so one
# execution checks both ways a reader's run differs from the checkout's. Each notebook runs once: the foreign
# kernels are up to 3.4x slower than native, and a second (native) nbval pass of the book does not fit CI's 90 minutes
# with margin; `make nbval` is that pass, run before committing a notebook. Each phase prints its clock time.
test: venv system-deps html
	@date -u +"== %H:%M:%S pass 1: unit tests, render check =="
	COMPANION_REQUIRE_RENDER=1 $(BIN)/python -m pytest tests --durations=20 -q
	@date -u +"== %H:%M:%S pass 2 =="
	$(MAKE) --no-print-directory colab-foreign
	@date -u +"== %H:%M:%S done =="

unit: venv
	$(BIN)/python -m pytest tests -q

nbval: venv
	$(BIN)/python -m pytest --nbval book -q --durations=0

nbval-foreign: venv
	@echo "== nbval on a simulated foreign CPU: $(FOREIGN_CPU) =="
	@$(FOREIGN_CPU) $(BIN)/python -c "import torch; print('torch CPU capability:', torch.backends.cpu.get_cpu_capability())"
	$(FOREIGN_CPU) $(BIN)/python -m pytest --nbval book -q --durations=5

colab: venv
	@echo "== Colab-like run: the setup cell's install in a clean venv, notebooks outside the checkout =="
	$(BIN)/python tools/colab_like.py

colab-foreign: venv
	@echo "== Colab-like run on a simulated foreign CPU: $(FOREIGN_CPU) =="
	$(FOREIGN_CPU) $(BIN)/python tools/colab_like.py

lock:
	$(BIN)/python -m pip install -q -r requirements.in && $(BIN)/python tools/lock.py

clean:
	rm -rf _build
