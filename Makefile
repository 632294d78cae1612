# Both targets work on a fresh clone: they build .venv when it is missing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision come from the machine's local disk; pin them so pip never fetches another build.
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/retrieval demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
