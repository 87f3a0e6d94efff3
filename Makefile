# Two commands for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned PyTorch. On a CPU-only machine outside this setup, point pip at the CPU wheels:
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.kolm-installed

.PHONY: demo test check lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -c constraints.txt -e '.[demo,test,bench,wandb,eval,clean,fp8]'
	touch $@

demo: $(STAMP)
	$(BIN)/kolm demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra --durations=25

# The inner loop: lint, then the unit and cli tiers only (no DeepSpeed engine; a few minutes).
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "unit or cli"

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format --check . || true

clean:
	rm -rf $(VENV) kolm-demo
