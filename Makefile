# Quick start: `make train` (creates .venv, installs, trains the default LIMoE), `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers of `make test` (2 fits the 2 CPU cores of CI; 0 runs in one process).
TEST_WORKERS ?= 2

.PHONY: install train dense compare ablation analyze bench gpu-check test test-all lint format notebooks lab clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev,notebooks,tensorboard,benchmark,svg]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)  ## train the default LIMoE on the embedded scenes benchmark (ARGS="key=value ...")
	$(BIN)/limoe-train $(ARGS)

dense: $(STAMP)  ## the dense one-tower arm with the same budget
	$(BIN)/limoe-train model=dense $(ARGS)

compare: $(STAMP)  ## LIMoE vs dense vs CLIP over 3 seeds, then the table and plots
	$(BIN)/limoe-train -m experiment=limoe_vs_clip $(ARGS)
	$(BIN)/limoe-compare $$(ls -td logs/limoe_vs_clip/multiruns/*/ | head -1)

ablation: $(STAMP)  ## the paper's auxiliary-loss ablation on scenes (6 recipes, 3 seeds for vmoe and limoe)
	$(BIN)/limoe-train -m experiment=paper_ablation $(ARGS)
	$(BIN)/limoe-train -m experiment=paper_ablation recipe=vmoe,limoe seed=1,2 $(ARGS)
	$(BIN)/limoe-compare logs/paper_ablation/multiruns --out logs/paper_ablation/comparison

analyze: $(STAMP)  ## routing figures and tables of the latest `make train` run (into its routing/)
	$(BIN)/limoe-analyze ckpt=$$(ls -td logs/train/runs/*/ | head -1)checkpoints/last.ckpt $(ARGS)

bench: $(STAMP)  ## limoe-bench: MoE layer vs dense MLP vs one-hot, training pairs/s (ARGS="device=cuda")
	$(BIN)/limoe-bench $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: MoE layer bf16 by GEMM path, LIMoE-B/32 vs dense B/32 steps, DDP (docs/paper_sizes.md)
	$(BIN)/limoe-bench suite=gpu device=cuda $(ARGS)

test: $(STAMP)  ## the test suite (skips tests marked slow)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check limoe tests conf setup.py
	$(BIN)/ruff format --check limoe tests conf setup.py

format: $(STAMP)
	$(BIN)/ruff check --fix limoe tests conf setup.py
	$(BIN)/ruff format limoe tests conf setup.py

notebooks lab: $(STAMP)  ## JupyterLab on notebooks/ from the project's venv
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
