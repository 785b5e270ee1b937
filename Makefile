# loft: build / run / test scaffolding.  `make` (or `make help`) lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO     ?= cargo
BIN       := target/release/loft
RUN_DIR   ?= runs/make-run
RANKS     ?= 2
RUN_ARGS  ?= --arch preresnet18 --base-width 8 --dataset fashion-mnist --train-subset 20000 \
             --rounds 15 --local-steps 16 --batch-size 128 --record-every 3 \
             --ratios 0.3,0.5,0.8 --finetune-epochs 2 --seed 1 --progress lines --out $(RUN_DIR)
BENCH_ARGS ?=
BASES     ?= 64,16,8
ROUNDS    ?= 3

# Lets the MPI launcher run as root (containers, CI) for MPI-based tests.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: help deps build run test ci bench bench-torch doctor fmt lint clean kernels gpu-bundle test-gpu bench-gpu pytorch-check

help: ## List targets (default)
	@echo "loft make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	    awk 'BEGIN {FS = ":.*## "} {printf "  %-8s %s\n", $$1, $$2}'
	@echo "Variables: RUN_ARGS=\"...\" (loft run flags), RANKS=$(RANKS), RUN_DIR=$(RUN_DIR), BENCH_ARGS=\"...\", CARGO=$(CARGO)"

deps: ## Install missing system packages (MPI, HDF5, libclang, Fashion-MNIST)
	@bash scripts/install-deps.sh

build: deps ## Build the release binary (target/release/loft)
	$(CARGO) build --release

run: build ## The main job on 2 MPI ranks: dense and LoFT pre-training, tickets, fine-tuning, report
	mpirun -np $(RANKS) --oversubscribe --bind-to none $(BIN) --threads 1 run $(RUN_ARGS)
	@out="$(RUN_DIR)"; set -- $(RUN_ARGS); \
	while [ $$# -gt 0 ]; do \
	    case "$$1" in --out) out="$${2:-$$out}"; shift ;; --out=*) out="$${1#--out=}" ;; esac; shift; \
	done; \
	echo "report: $$out/report.md (plots: $$out/*.png)"

test: deps ## Run the test suite in release mode (data-dependent tests may not skip)
	LOFT_REQUIRE_DATA=1 $(CARGO) test --release

ci: deps lint test ## What CI runs: formatting and clippy checks, then the test suite

# The build runs with its output sent to stderr, so `make bench > table.md` captures
# only the Markdown table.
bench: ## Print the benchmark Markdown table to stdout (paste into BENCHMARKS.md)
	@$(MAKE) --no-print-directory build >&2
	@$(BIN) bench $(BENCH_ARGS)

bench-torch: build ## loft's training step against PyTorch's (BASES=64,16,8; batch 128), one sitting; PyTorch venv on demand
	bash scripts/bench-vs-torch.sh $(BASES) $(ROUNDS)

kernels: build ## Compile every CUDA kernel with NVRTC (no GPU needed): registers, shared memory, spills
	$(BIN) kernels

gpu-bundle: ## Pack the binary, the GPU tests and their libraries into bundle/ for a GPU machine
	bash scripts/gpu-bundle.sh

test-gpu: ## On a GPU machine: kernel tests for real (no skips), compute-sanitizer, a LoFT run on --device cuda
	@if command -v cargo >/dev/null; then bash scripts/gpu-bundle.sh; fi
	bash scripts/gpu-check.sh test

bench-gpu: ## On a GPU machine: loft's kernels against cuDNN (PyTorch) on the same shapes
	@if command -v cargo >/dev/null; then bash scripts/gpu-bundle.sh; fi
	bash scripts/gpu-check.sh bench

pytorch-check: build ## docs/pytorch.md's module on CKPT=<checkpoint> against loft evaluate (PyTorch venv on demand)
	@test -n "$(CKPT)" || { echo "usage: make pytorch-check CKPT=path/to/checkpoint.h5 [DATA_DIR=...]"; exit 2; }
	@mkdir -p $(RUN_DIR)
	$(BIN) export $(CKPT) --out $(RUN_DIR)/pytorch-check.safetensors
	$(BIN) evaluate $(CKPT) --json > $(RUN_DIR)/pytorch-check.json
	$$(bash scripts/torch-venv.sh) scripts/pytorch_check.py $(RUN_DIR)/pytorch-check.safetensors \
	    $(RUN_DIR)/pytorch-check.json $(or $(DATA_DIR),/usr/share/datasets/fashion-mnist)

doctor: ## Show what this machine has (toolchain, MPI, HDF5, data, GPU)
	@bash scripts/doctor.sh

fmt: ## Format the code with rustfmt
	$(CARGO) fmt

lint: deps ## cargo fmt --check and clippy with warnings as errors
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

clean: ## Remove build outputs (cargo clean)
	$(CARGO) clean
