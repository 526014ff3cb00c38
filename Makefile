# spar-pl: `make help` lists the targets.
SHELL := bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# pip on this kind of machine prints a warning per package for an unused local index: keep the log readable.
PIP_QUIET := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

.PHONY: help install quickstart test test-fast lint format clean bench bench-quick table table-tiny table-tiny-dinotxt \
	reproduce-tiny pretrain-tiny demo table-recipes table-tiny-recipes

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' $(PIP_QUIET)
	touch $@

install: $(VENV)/.installed ## Create .venv and install spar-pl with its dev extras (torch pinned by constraints.txt)

quickstart: install ## Run the main job on the embedded default (shipped tiny pretrained model, generated scene; CPU, offline)
	$(VENV)/bin/spar-cli quickstart

test: install ## Run the whole test suite (what CI runs)
	$(VENV)/bin/pytest -q

test-fast: install ## Run the tests not marked slow
	$(VENV)/bin/pytest -q -m "not slow"

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: install ## Benchmarks side by side: teacher, student, memory, cache, data path (results/bench.md; <15 min on 2 CPUs)
	$(PY) benchmarks/bench.py --out results/bench.md

bench-quick: install ## The benchmarks on tiny models at small sizes, a smoke run (results/bench-quick.md)
	$(PY) benchmarks/bench.py --quick --out results/bench-quick.md

BACKBONE ?= siglip2
CKPT ?=
table: install ## The paper's table for BACKBONE (siglip2|maskclip|dinov3txt): 18 evaluations [CKPT=spar.ckpt] -> results/BACKBONE.md
	$(VENV)/bin/spar-cli table --backbone $(BACKBONE) $(if $(CKPT),--ckpt $(CKPT))

table-tiny: install ## The same on tiny generated benchmarks with a tiny model and a tiny distillation (CPU) -> results/tiny.md
	$(VENV)/bin/spar-cli table --tiny

table-tiny-dinotxt: install ## The same with the DINOv3.txt tiny twin (CPU) -> results/dinov3txt-tiny.md
	$(VENV)/bin/spar-cli table --backbone dinov3txt --tiny

RECIPES := sclip clearclip naclip
table-recipes: install ## SCLIP, ClearCLIP and NACLIP tables at their own protocols: 24 evaluations each [CKPT_<recipe>=spar.ckpt] -> results/<recipe>.md
	for r in $(RECIPES); do ckpt=CKPT_$$r; $(VENV)/bin/spar-cli table --backbone $$r $${!ckpt:+--ckpt $${!ckpt}} || exit 1; done

table-tiny-recipes: install ## The three recipe tables on tiny generated benchmarks with tiny distillations (CPU, about 4 min) -> results/<recipe>-tiny.md
	for r in $(RECIPES); do $(VENV)/bin/spar-cli table --backbone $$r --tiny || exit 1; done

reproduce-tiny: install ## SPAR's effect on a CPU: single pass vs sliding window vs SPAR, 3 seeds (shipped tiny model; about 3 min) -> results/reproduce-tiny.md, .png
	$(VENV)/bin/spar-cli reproduce-tiny --out results

pretrain-tiny: install ## Re-create the shipped tiny pretrained model (src/spar_pl/pretrained/; 11 min on 1 thread of a shared CPU)
	$(VENV)/bin/spar-cli pretrain-tiny

DEMO_ARGS ?=
demo: install ## Segmentation in the browser (Gradio) with the shipped tiny model; DEMO_ARGS="--model-name ... --student CKPT"
	$(VENV)/bin/spar-cli demo $(DEMO_ARGS)

clean: ## Remove the virtual environment and build leftovers
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
