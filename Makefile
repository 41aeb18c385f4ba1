# hvcodistill: `make demo` and `make test` set everything up on first use (scripts/setup.sh).
PY      := .venv/bin/python
RUFF    := .venv/bin/ruff
READY   := .venv/.hvcodistill-ready
NP      ?= 4

.PHONY: setup demo test test-unit test-mpi bench study lint docs clean

setup:
	bash scripts/setup.sh
	@touch $(READY)

$(READY): scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	@touch $@

demo: $(READY)
	$(PY) -m hvcodistill.demo

# Markers (pyproject.toml): unit (tests/unit, in-process), mpi (real ranks), slurm, cluster (root).
# JOBS=N: N pytest-xdist workers. tests/conftest.py keeps on one worker each: every SLURM and
# emulated-cluster test (one SLURM cluster, one set of namespaces at a time), the readers of the
# cached runs, each integration module; unit tests go wherever a worker is free. Two workers on
# 2 cores: the SLURM tests' waits (scheduling, requeue, node failure) overlap the other tests'
# ranks. JOBS=0 runs everything in one process.
JOBS    ?= 2
test: $(READY)
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup --durations=15

test-unit: $(READY)
	$(PY) -m pytest -q -m unit

# the quick subset with real ranks: no SLURM, no emulated cluster
test-mpi: $(READY)
	$(PY) -m pytest -q -m "mpi and not slurm and not cluster"

# ruff's settings are in pyproject.toml (line length 100; rules E F W I).
lint: $(READY)
	$(RUFF) check hvcodistill tests scripts
	$(RUFF) format --check hvcodistill tests scripts

bench: $(READY)
	$(PY) -m hvcodistill.bench -np $(NP)

# A study, then its report (also of a partial study); run again to continue. STUDY=studies/tiny.yaml
STUDY   ?= studies/paper_miniature.yaml
study: $(READY)
	$(PY) -m hvcodistill.sweep $(STUDY); status=$$?; \
	$(PY) -m hvcodistill.report runs/studies/$(basename $(notdir $(STUDY))) && exit $$status

# The configuration reference, docs/configuration.md, from hvcodistill/config.py
# (tests/unit/test_docs.py checks that it is current).
docs: $(READY)
	$(PY) scripts/config_reference.py

clean:
	rm -rf runs .pytest_cache
