# Two commands set everything up on a fresh machine: `make train` and `make test`; `make help` (or a bare `make`)
# lists the targets. Every `key=value` given to make reaches Hydra unchanged, e.g. `make train model=conv3d
# loss=dicefocal`; ARGS takes the rest as the shell reads it, e.g. `make train ARGS="~transforms.augment.noise"`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
# Which torch 2.13.0 build: empty takes pip's index (on PyPI for Linux, the CUDA build); `TORCH=cpu` the CPU-only
# wheel, `TORCH=cu128` (or another CUDA tag PyTorch lists for 2.13.0) that CUDA build, from download.pytorch.org.
TORCH ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)$(TORCH)

# make lists command-line variables last-first, escaped (`\ ` for a space, `\\` for a backslash, `$$` for a dollar);
# here each is one word again, in the user's order, single-quoted for the shell ('\'' for a quote in it), so Hydra
# sees exactly what was typed: `make train 'data.class_names=[background, liver]'`. Make's own variables (the Python
# that creates .venv, the folder `make cv` writes, ARGS) are not Hydra keys and stay here.
MAKE_VARS := PYTHON TORCH VENV CV_DIR FOLDS MODEL PORT ARGS
reverse = $(if $(1),$(call reverse,$(wordlist 2,$(words $(1)),$(1))) $(firstword $(1)))
space := <make-space>
backslash := <make-backslash>
COMMAND_LINE := $(call reverse,$(filter-out $(MAKE_VARS:%=%=%),$(subst \ ,$(space),$(subst \\,$(backslash),$(subst $$$$,$$,$(MAKEOVERRIDES))))))
quote = $(foreach o,$(1),'$(subst ','\'',$(subst $(backslash),\,$(subst $(space), ,$(o))))')
OVERRIDES := $(call quote,$(COMMAND_LINE))
# What make cannot take as a variable (`~key` deletes a key, a word without `=`, pytest's options) goes in ARGS, as
# the shell reads it after the key=value overrides, `$` included: `make train ARGS="~transforms.augment.noise"`.
ARGS ?=
WITH_ARGS = $(if $(value ARGS), $(value ARGS))

.PHONY: help install train cv infer sweep evaluate promote serve test test-slow lint docs docs-check bench bench-infer \
	bench-auto bench-hippocampus bench-serve mlflow-ui mlflow-server data clean

# Each target's `##` comment is its line here.
help: ## this list (a bare `make` prints it too)
	@echo 'make <target> [key=value ...] [ARGS="..."]: both reach the command unchanged (ARGS as the shell reads it)'
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## /{printf "  %-18s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))

# The torch in .venv (e.g. 2.13.0+cpu; empty before there is one), read when the install recipe is expanded.
TORCH_INSTALLED = $(shell $(BIN)/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)
# $(1) is that version. Non-empty when TORCH asks for another build than its local tag (+cpu, +cu128; none for PyPI's
# own wheel): pip takes any 2.13.0 for the pin, so `make install TORCH=cu128` over the CPU build would change nothing.
torch_replaced = $(and $(TORCH),$(1),$(filter-out +$(TORCH),+$(word 2,$(subst +, ,$(1)))))

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Another build than TORCH's is removed first (not --force-reinstall: it reinstalls every dependency; nor
	# --no-deps: a CUDA build needs its nvidia-* packages, which the CPU build lacks).
	$(if $(call torch_replaced,$(TORCH_INSTALLED)),$(BIN)/pip uninstall --disable-pip-version-check -q -y torch)
	# torch first, at its exact pin: a looser spec would pull a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0 $(if $(TORCH),--index-url https://download.pytorch.org/whl/$(TORCH))
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## .venv with torch 2.13.0 (TORCH=cpu or cu128: that build) and the pinned project

data: $(STAMP) ## the demo phantoms; task=Task04_Hippocampus: that MSD task downloaded, checked, unpacked
	$(if $(task),$(BIN)/python -m pipeline.download $(OVERRIDES),$(BIN)/python -m pipeline.data.phantom)$(WITH_ARGS)

train: $(STAMP) ## train a model (python -m pipeline.train): make train model=dynunet loss=dicece
	$(BIN)/python -m pipeline.train $(OVERRIDES)$(WITH_ARGS)

# k-fold cross-validation (data.fold=0..4, one run each, in one Hydra multirun), scored as nnU-Net scores it (each
# fold's final model on its own validation cases, pooled), then the folds' ensemble with mirror TTA scored on the
# held-out test split, which no fold trained on: `make cv experiment=hippocampus` (a dataset with no test split, as
# experiment=auto plans below 30 cases, skips the second). FOLDS=4: four folds (leave one out on four cases).
# A stopped cv goes on with the same command plus `CV_DIR=<its folder> resume=auto`: each fold continues its own
# last.pt (a finished fold returns at once, a missing one starts), then both evaluations run.
# The evaluations take the tracking overrides (`tracking=none`, `tracking.experiment=...`; in ARGS, those without a
# space); the rest are training keys.
CV_DIR := outputs/cv/$(shell date +%Y-%m-%d_%H-%M-%S)
FOLDS := 5
ARGS_TRACKING := $(filter tracking=% tracking.% 'tracking=% 'tracking.% "tracking=% "tracking.%,$(value ARGS))
CV_TRACKING := $(call quote,$(filter tracking=% tracking.%,$(COMMAND_LINE)))$(if $(ARGS_TRACKING), $(ARGS_TRACKING))
cv: $(STAMP) ## k-fold cross-validation (FOLDS=5), scored as nnU-Net does, then the folds' ensemble on the test split
	$(BIN)/python -m pipeline.train --multirun 'data.fold=range(0,$(FOLDS))' data.split.folds=$(FOLDS) hydra.sweep.dir=$(CV_DIR) $(OVERRIDES)$(WITH_ARGS)
	$(BIN)/python -m pipeline.evaluate ckpt=$(CV_DIR) split=cv output=$(CV_DIR)/cv$(if $(CV_TRACKING), $(CV_TRACKING))
	$(BIN)/python -m pipeline.evaluate ckpt=$(CV_DIR) split=test tta=true if_empty=skip output=$(CV_DIR)/ensemble_test$(if $(CV_TRACKING), $(CV_TRACKING))

sweep: $(STAMP) ## a Hydra multirun, one MLflow parent run: make sweep loss=dice,dicefocal
	$(BIN)/python -m pipeline.train --multirun $(OVERRIDES)$(WITH_ARGS)

infer: $(STAMP) ## segment volumes: make infer ckpt=<best.pt> input=<file or folder> output=<folder>
	$(BIN)/python -m pipeline.infer $(OVERRIDES)$(WITH_ARGS)

evaluate: $(STAMP) ## score a checkpoint (ckpt=... split=test) or label maps (pred=... truth=...)
	$(BIN)/python -m pipeline.evaluate $(OVERRIDES)$(WITH_ARGS)

# `make promote run=<run id> alias=champion`: the alias moves to that run's model version (registered if need be).
promote: $(STAMP) ## move a registry alias to a run's model: make promote run=<run id> alias=champion
	$(BIN)/python -m pipeline.promote $(OVERRIDES)$(WITH_ARGS)

# A registered model over HTTP on 127.0.0.1 (MLflow's scoring server from this .venv, which must be on PATH for its
# uvicorn): `make serve MODEL=models:/Phantom@champion`; POST /invocations a base64 NIfTI (docs/tracking.md).
MODEL ?= models:/Phantom@champion
PORT ?= 5001
serve: $(STAMP) ## serve a registered model on 127.0.0.1:5001: make serve MODEL=models:/Phantom@champion
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/outputs/mlflow.db} \
		$(BIN)/mlflow models serve \
		-m '$(MODEL)' --env-manager local --host 127.0.0.1 --port $(PORT) --workers 1

test: $(STAMP) ## the test suite; ARGS="-k sweep" picks tests by name
	$(BIN)/python -m pytest $(OVERRIDES)$(WITH_ARGS)

test-slow: $(STAMP) ## the tests marked slow (real-data training)
	$(BIN)/python -m pytest -m slow $(OVERRIDES)$(WITH_ARGS)

# ruff, pinned in pyproject.toml with its rules and the 120-character line length
lint: $(STAMP) ## ruff on pipeline/, tests/ and bench/
	$(BIN)/ruff check pipeline tests bench

# The documentation site (docs/, mkdocs.yml) on http://127.0.0.1:8000; docs-check builds it as CI does: a broken link
# or anchor fails.
docs: $(STAMP) ## the documentation site on http://127.0.0.1:8000
	$(BIN)/mkdocs serve -a 127.0.0.1:8000

docs-check: $(STAMP) ## build the documentation site as CI does (a broken link or anchor fails)
	$(BIN)/mkdocs build --strict --quiet

# Benchmarks print their figures and write them with the machine into docs/results/ (never copied by hand).
# The quick ones, no data needed, about 5 minutes on a 2-core CPU: networks' step time, precision and kernels.
bench: $(STAMP) ## the quick benchmarks (about 5 minutes): networks' step time, precision, kernels
	$(BIN)/python bench/models.py
	$(BIN)/python bench/amp_step.py --no-compile
# Whole-volume inference on a BRATS and an IBSR volume (../shared/data or PIPELINE_SHARED_DATA): about 15 minutes.
bench-infer: $(STAMP) ## whole-volume inference on real volumes (about 15 minutes)
	$(BIN)/python bench/infer.py
# experiment=auto on the real tasks: about 3 hours for IBSR18's 5 folds of 30 minutes, then experiment=hippocampus on
# its test split, BRATS (4 folds) and the CT examples; a fold that finished is kept, so a stopped run goes on.
bench-auto: $(STAMP) ## experiment=auto on the real tasks (hours)
	$(BIN)/python bench/auto.py ibsr
	$(BIN)/python bench/auto.py hippocampus --minutes 40   # the recipe's 20 are for AMX; 40 where bf16 lacks it
	$(BIN)/python bench/auto.py brats --minutes 10
	$(BIN)/python bench/auto.py ct --minutes 5
# The served model under load: 40 requests, 4 at a time, against pipeline.infer's label map (p50 / p95 latency).
bench-serve: $(STAMP) ## the served model under load: p50 / p95 latency
	$(BIN)/python bench/serve.py

# Hippocampus recipes against minutes of training (docs/hippocampus.md): about 5 hours with its defaults.
bench-hippocampus: $(STAMP) ## hippocampus recipes against minutes of training (about 5 hours)
	$(BIN)/python bench/hippocampus.py

# The MLflow server (UI, REST API, model registry, proxied artifacts) on the project's sqlite store, with one worker and
# without MLflow's GenAI job runner (seven more processes, ~1.5 GiB): enough for a small machine. It binds to loopback
# only; put a reverse proxy with auth in front to share it. The same by hand, from the project root:
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --backend-store-uri sqlite:///$PWD/outputs/mlflow.db \
#     --serve-artifacts --artifacts-destination $PWD/outputs/mlartifacts --host 127.0.0.1 --port 5000 --workers 1
# Train through it with `make train tracking.uri=http://127.0.0.1:5000`: checkpoints are uploaded through the server.
mlflow-ui: $(STAMP) ## the MLflow UI and server on http://127.0.0.1:5000 (outputs/mlflow.db)
	mkdir -p $(CURDIR)/outputs
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db \
		--serve-artifacts --artifacts-destination $(CURDIR)/outputs/mlartifacts --host 127.0.0.1 --port 5000 --workers 1

mlflow-server: mlflow-ui ## the same as mlflow-ui

# Deletes every run, checkpoint, prediction and the MLflow store (outputs/), and the generated demo phantoms.
clean: ## delete outputs/ (every run, checkpoint and the MLflow store) and the demo phantoms
	rm -rf outputs data/phantom
