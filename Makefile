# The README's commands. `make study` and `make test` work on a fresh clone: they create
# .venv when it is missing and (re)install the project when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omgseg-installed
# torch is installed first and pinned: an unpinned `torch` from the index is a multi-GB CUDA
# build. Override for another platform, e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STUDY_CONFIG ?= studies/configs/default.yaml
PYTEST_ARGS ?=

.PHONY: install study test test-slow test-cluster test-docs test-all bench lint

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The default study (about 10 minutes on 2 cores). --resume: a second `make study` keeps the
# finished trials and only rewrites the tables; an interrupted one continues.
study: $(STAMP)
	$(PY) studies/cotrain_matrix.py --config $(STUDY_CONFIG) --resume

# Default suite (slow tests excluded). pytest exits 5 when it collects no test: make fails then.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The scale-out test: a two-node Ray cluster, an MLflow server and a shard server on loopback.
test-cluster: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m cluster $(PYTEST_ARGS)

# Every command the README and docs/ show, run from a fresh folder (about 14 minutes).
test-docs: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests/test_docs_commands.py $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) tests/benchmarks/bench_data.py
	$(PY) tests/benchmarks/bench_model.py
	$(PY) tests/benchmarks/bench_train.py
	$(PY) tests/benchmarks/bench_metrics.py
	$(PY) tests/benchmarks/bench_study.py
	$(PY) tests/benchmarks/bench_stats.py
	$(PY) tests/benchmarks/bench_eval.py
	$(PY) tests/benchmarks/bench_study.py --config studies/configs/planted.yaml --out outputs/studies/planted
	$(PY) tests/benchmarks/bench_affinity.py --study outputs/studies/planted
	$(PY) tests/benchmarks/bench_probe.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
