# mtlab: two commands on a fresh machine with Python 3.11 and pip.
#   make test     create .venv, install mtlab with test extras, run the test suite
#   make report   create .venv if needed, run the main job, write reports/
# constraints.txt pins torch==2.13.0 so a CPU machine never downloads a CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --constraint constraints.txt

# Threads: every target's Python runs mtlab, which follows the free cores (mtlab/runtime.py: torch's
# threads idle, fewer while other processes hold cores). MTLAB_THREADS=N fixes N threads, =passive sets
# OMP_WAIT_POLICY=PASSIVE, =off leaves torch's defaults; the environment passes through to every target.

# One stamp per install: core (`.`), the extras of pyproject.toml ([notebooks], [minilm], [report], [test]).
# `make test` installs '.[test]' (everything: the CI path); the other targets install only what they need.
STAMP        := $(VENV)/.mtlab-test
STAMP_CORE   := $(VENV)/.mtlab-core
STAMP_REPORT := $(VENV)/.mtlab-report
STAMP_LAB    := $(VENV)/.mtlab-lab
STAMP_MINILM := $(VENV)/.mtlab-minilm
LAB_EXTRAS   := .[notebooks,minilm]

.PHONY: venv test browser-test report figures teacher modules baselines merges minilm minilm-curves t5-curves ablation lab clean
venv: $(STAMP)

define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) --quiet -e '$(1)'
	touch $@
endef

$(STAMP): pyproject.toml constraints.txt
	$(call install,.[test])

$(STAMP_CORE): pyproject.toml constraints.txt
	$(call install,.)

$(STAMP_REPORT): pyproject.toml constraints.txt
	$(call install,.[report])

$(STAMP_LAB): pyproject.toml constraints.txt
	$(call install,$(LAB_EXTRAS))

$(STAMP_MINILM): pyproject.toml constraints.txt
	$(call install,.[minilm])

test: $(STAMP)
	$(BIN)/python -m pytest

# only the real-browser test (JupyterLab + /usr/bin/chromium); screenshots in test-artifacts/browser/
browser-test: $(STAMP)
	$(BIN)/python -m pytest tests/test_browser.py

PROFILE ?= default
report: $(STAMP_REPORT)
	$(BIN)/python -m mtlab report --out reports --profile $(PROFILE)

# The README's figures (docs/img/) from the report's cache; the explorer screenshot from a real
# browser (needs /usr/bin/chromium). Run `make report` first or this computes what is missing.
figures: $(STAMP)
	$(BIN)/python -m mtlab figures --out docs/img --profile $(PROFILE)
	MTLAB_TEST_CACHE=$${MTLAB_CACHE:-$(CURDIR)/cache} MTLAB_BROWSER_PROFILE=$(PROFILE) MTLAB_ARTIFACTS=$(CURDIR)/runs/figures \
	  $(BIN)/python -m pytest -q tests/test_browser.py
	cp runs/figures/browser/explorer-span-changed-widget.png docs/img/explorer.png

# Retrain the bundled teacher (about 70 minutes on 2 CPU cores). Resumable: rerun after an
# interruption. Long: run it as  nohup make teacher > runs/teacher.log 2>&1 &
teacher: $(STAMP_CORE)
	mkdir -p runs
	$(BIN)/python -m mtlab teacher

# Train the shipped module bank (data/modules; about 60 minutes on 2 CPU cores). Resumable.
# Long: run it as  mkdir -p runs && nohup make modules > runs/modules.log 2>&1 &
modules: $(STAMP_CORE)
	mkdir -p runs
	$(BIN)/python -m mtlab modules

# Train the shipped baselines (data/baselines: SFT and layer dropping at depths 4, 3, 2, LayerDrop once),
# each with the module run's steps and batch. Resumable; long: nohup make baselines > runs/baselines.log 2>&1 &
baselines: $(STAMP_CORE)
	mkdir -p runs
	$(BIN)/python -m mtlab baselines

# Recover the combined FF-merge candidates of the default profile (data/merging: permute, vanilla and layer
# pruning at 4 of 12 FF sublayers, layer pruning at equal parameters), 1,000 steps at batch 64 each. Resumable;
# long: mkdir -p runs && nohup make merges > runs/merges.log 2>&1 &
merges: $(STAMP_CORE)
	mkdir -p runs
	$(BIN)/python -m mtlab merges

# Train the MiniLM study's runs shipped under data/minilm (module bank, layer dropping and SFT at 1.5x/2x/3x,
# FF-merge recoveries at ~10% and ~20%), 500 steps at batch 32 each; about 45 minutes on one busy CPU
# thread. Resumable; one artifact: make minilm ONLY=sft-3. Long: nohup make minilm > runs/minilm.log 2>&1 &
minilm: $(STAMP_MINILM)
	mkdir -p runs
	$(BIN)/python -m mtlab minilm $(if $(ONLY),--only $(ONLY))

# Recovery curves (mtlab/curves.py): permute merging vs layer pruning at ~10% / ~20% of MiniLM's parameters
# removed, one recovery each, scored on the same test sentences every EVERY steps; reports/minilm_curves.csv,
# shipped to data/minilm/curves. Resumable (rerun the same command); progress in runs/minilm_curves/progress.log.
# Long: nohup env OMP_NUM_THREADS=1 make minilm-curves > runs/minilm_curves.log 2>&1 &  (DEVICE=cuda on a GPU)
# t5-curves: the same for the T5 merge study (4 of 12 FF sublayers), reports/t5_merge_curves.csv.
STEPS ?= 4000
EVERY ?= 500
minilm-curves t5-curves: $(STAMP_MINILM)
	mkdir -p runs
	$(BIN)/python -m mtlab $@ --steps $(STEPS) --every $(EVERY) $(if $(DEVICE),--device $(DEVICE)) $(if $(ONLY),--only $(ONLY))

# Recipe ablation: every variant of mtlab/experiments/ablation.py at 3,000 steps (about 8 minutes each
# on 2 cores), written to data/ablation/modular_ablation.csv. Cached, so a rerun only adds new variants.
ablation: $(STAMP_CORE)
	$(BIN)/python -m mtlab ablation

lab: $(STAMP_LAB)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf reports runs .pytest_cache
