# hvcodistill: `make demo` and `make test` set everything up on first use (scripts/setup.sh).
PY      := .venv/bin/python
READY   := .venv/.hvcodistill-ready
NP      ?= 4

.PHONY: setup demo test test-unit bench study lint clean

setup:
	bash scripts/setup.sh
	@touch $(READY)

$(READY): scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	@touch $@

demo: $(READY)
	$(PY) -m hvcodistill.demo

test: $(READY)
	$(PY) -m pytest -q

test-unit: $(READY)
	$(PY) -m pytest -q -m "not mpi and not slurm"

bench: $(READY)
	$(PY) -m hvcodistill.bench -np $(NP)

# A study, then its report (also of a partial study); run again to continue. STUDY=studies/tiny.yaml
STUDY   ?= studies/paper_miniature.yaml
study: $(READY)
	$(PY) -m hvcodistill.sweep $(STUDY); status=$$?; \
	$(PY) -m hvcodistill.report runs/studies/$(basename $(notdir $(STUDY))) && exit $$status

clean:
	rm -rf runs .pytest_cache
