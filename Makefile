# minitune: every target creates the virtual environment first if it is missing.
# `make lesson-05 ARGS="--model weights/Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16"` passes flags on.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first and pinned, so that nothing later pulls another build (on CI machines this is the CPU wheel)
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: help env test lessons bench clean download weights pins
.DEFAULT_GOAL := help

help:  ## list the targets
	@echo "make lesson-NN      run lesson NN (lessons/NN-*/run.py) on the tiny model, CPU; ARGS=... for flags"
	@echo "make test           run the test suite (creates .venv on first use)"
	@echo "make lessons        run every lesson in fast mode (what CI does)"
	@echo "make check-lessons [ARGS=\"--seed 1 --threads 2\"]   run every lesson in full; fails unless all its claims hold"
	@echo "make weights        rebuild weights/tiny (tokenizer, pretraining, task data) from its fixed seed"
	@echo "make bench          CPU benchmarks in bench/ (minitune vs the reference libraries)"
	@echo "make download MODEL=Qwen/Qwen2.5-0.5B-Instruct   fetch a real checkpoint into weights/ (needs network)"
	@echo "make student-kit [EXERCISES=\"01.1 02\"|EXERCISES_FILE=path]   student copy with exercises blanked (student-kit/)"
	@echo "make grade          run the graded tests of the exercises: table + grade/results.json (Gradescope shape)"
	@echo "make grade-NN       the same for lesson NN only"
	@echo "make env            only create the environment"
	@echo "make pins           move constraints.txt (the test oracles' pinned versions) to today's releases"
	@echo "make clean          remove the environment and caches"

# constraints.txt pins every other package (the test oracles and what they pull in): see `make pins`
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

env: $(VENV)/.installed

# pytest exits 5 when it collected no tests: that must fail, not pass quietly
test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lesson-%: $(VENV)/.installed
	@dir=$$(ls -d lessons/$*-*/ 2>/dev/null | head -n 1); \
	if [ -z "$$dir" ]; then echo "no lesson $* (see lessons/README.md)"; exit 2; fi; \
	echo "== $$dir"; $(PY) $${dir}run.py $(ARGS)

lessons: $(VENV)/.installed
	@set -e; for dir in lessons/[0-9][0-9]-*/; do \
	  echo "== $$dir (fast)"; $(PY) $${dir}run.py --fast $(ARGS); done

# every lesson in full: each run.py ends with `claims hold: k/n` and exits 1 when a claim fails
.PHONY: check-lessons
check-lessons: $(VENV)/.installed
	@failed=""; for dir in lessons/[0-9][0-9]-*/; do \
	  echo "== $$dir (full)"; $(PY) $${dir}run.py $(ARGS) || failed="$$failed $$dir"; done; \
	if [ -n "$$failed" ]; then echo "claims failed (or the run stopped) in:$$failed"; exit 1; fi; \
	echo "check-lessons: every claim of every lesson holds"

weights: $(VENV)/.installed
	$(PY) -m minitune.tiny.build --out weights/tiny

bench: $(VENV)/.installed
	$(PY) bench/bench_model.py
	$(PY) bench/bench_lora.py
	$(PY) bench/bench_tokenizer.py

# move the pins: a scratch environment takes today's releases, and constraints.txt records them;
# then `make clean test` tells whether the oracles still agree (a failure: keep the old file)
pins:
	rm -rf .venv-pins && $(PYTHON) -m venv .venv-pins
	.venv-pins/bin/python -m pip install -q --upgrade pip
	.venv-pins/bin/python -m pip install -q "$(TORCH)"
	.venv-pins/bin/python -m pip install -q -e ".[test]"
	{ grep '^#' constraints.txt; .venv-pins/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|triton|nvidia|minitune)'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-pins
	@echo "constraints.txt rewritten; now: make clean test"

MODEL ?= Qwen/Qwen2.5-0.5B-Instruct
download: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[hub]"
	$(PY) weights/download.py $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# classroom (lessons/README.md): student kits with exercises blanked, and the grader
.PHONY: student-kit grade
EXERCISES ?=
EXERCISES_FILE ?=
student-kit: $(VENV)/.installed
	$(PY) -m minitune.classroom.kit --exercises "$(EXERCISES)" $(if $(EXERCISES_FILE),--exercises-file "$(EXERCISES_FILE)")

grade: $(VENV)/.installed
	$(PY) -m minitune.classroom.grade

grade-%: $(VENV)/.installed
	$(PY) -m minitune.classroom.grade --lesson $*
