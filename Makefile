# Two commands do everything:  `make run` (set up, fetch the data, run the main job)
# and `make test` (set up, lint, run the test suite). Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# to get the small CPU build where the default index would serve a CUDA one.
TORCH_PIP_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PEERS_STAMP := $(VENV)/.peers

.PHONY: run test test-all lint format data bench bench-solvers bench-accuracy clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# the peers the tests compare against (never runtime dependencies): pinned, installed beside
# torch without touching it; BackPACK and curvlinops without their deps (they would pull
# torchvision and with it another torch)
$(PEERS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "pytorch-optimizer==4.1.0" "asdfghjkl==0.1a5" \
	  "einops==0.8.2" "unfoldNd==0.2.3" "einconv==0.1.0" "linear_operator==0.6.1" \
	  "opt-einsum==3.4.0" tqdm
	$(BIN)/python -m pip install -q --no-deps "backpack-for-pytorch==1.7.1" \
	  "curvlinops-for-pytorch==3.0.1"
	@touch $(PEERS_STAMP)

data: $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "$$SECONDORDER_DATA" ] \
	    && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "apt-get could not install dataset-fashion-mnist; downloading instead"; \
	fi
	$(BIN)/secondorder data

run: data
	$(BIN)/secondorder run paper/headline

test: $(PEERS_STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	SECONDORDER_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks examples)

format: $(STAMP)
	$(BIN)/ruff format src tests $(wildcard benchmarks examples)
	$(BIN)/ruff check --fix src tests $(wildcard benchmarks examples)

bench: $(STAMP)
	$(BIN)/python benchmarks/curvature.py

bench-solvers: $(STAMP)
	$(BIN)/python benchmarks/solvers.py

bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/time_to_accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
