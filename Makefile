# clip_train — set-up, tests, benchmarks, lint.
#
#   make setup   virtual environment in $(VENV) with everything installed (idempotent)
#   make test    set up, then run the test suite
#   make bench   set up, then run every benchmark in scripts/bench/
#   make lint    ruff
#   make demo    set up, then the embedded demo: crawl a local scene website, train a small CLIP on the
#                CPU, evaluate it zero-shot, write demo/report/index.html (scripts/demo/run_demo.py)
#   make demo-extras   after make demo: distil the demo model into a smaller student and learn the
#                textness direction on the demo's scenes (scripts/demo/run_extras.py)
#
# CPU machines get the pinned CPU build of torch. On a GPU cluster bring your own build, e.g.
#   make setup TORCH_SPEC="torch==2.5.1" PIP_TORCH_INDEX="--index-url <your CUDA wheel index>"
# or install torch into $(VENV) first and pass TORCH_SPEC=: the installed torch is then kept as it is.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
VOCAB := clip_train/assets/bpe_simple_vocab_16e6.txt.gz
# The slowest tests are listed at the end of every run: the suite must stay within about 15 minutes in CI.
PYTEST_ARGS ?= --durations=25

.PHONY: setup test bench lint demo demo-extras clean

setup: $(STAMP) $(VOCAB)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24" "setuptools>=68" wheel
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  echo "installing $(TORCH_SPEC)"; \
	  $(BIN)/python -m pip install -qq $(PIP_TORCH_INDEX) "$(TORCH_SPEC)"; fi
	@# Freeze whatever torch is now installed so no later dependency can swap it for another build.
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	@# --no-build-isolation: deepspeed ships only as an sdist whose build imports torch; an isolated
	@# build environment would download a second, multi-GB CUDA torch just to build it.
	PIP_CONSTRAINT=$(VENV)/torch-constraint.txt DS_BUILD_OPS=0 \
	  $(BIN)/python -m pip install -qq --no-build-isolation -e ".[dev]"
	touch $(STAMP)

# The standard CLIP BPE merges (MIT licence, from OpenAI's CLIP release) come from the package
# registry: they are extracted from the open_clip_torch wheel and checked against a known SHA-256.
$(VOCAB): scripts/tools/install_bpe_vocab.py | $(STAMP)
	$(BIN)/python scripts/tools/install_bpe_vocab.py --out $(VOCAB)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	@for b in scripts/bench/bench_*.py; do \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done

demo: setup
	$(BIN)/python scripts/demo/run_demo.py

demo-extras: setup
	$(BIN)/python scripts/demo/run_extras.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info $(VOCAB)
