# Both targets work on a fresh clone: they build .venv when it is missing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision come from the machine's local disk; pin them so pip never fetches another build.
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?=
PYTEST_ARGS ?=
# A download that arrives damaged fails pip's hash check (CI saw it once, on pyarrow): try
# once more without pip's cache before giving up.
retry = $(1) || { echo "pip failed; retrying once without its cache" >&2; $(1) --no-cache-dir; }

.PHONY: test demo venv cluster clean browser

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py retrieval/_scan.c retrieval/_scan_lanes.h retrieval/_scan_single.h
	test -x $(PY) || python3 -m venv $(VENV)
	$(call retry,$(PY) -m pip install -q $(TORCH))
	$(call retry,$(PY) -m pip install -q -e '.[dev]')
	touch $@

# the tests also cover the cluster extra (Ray, psycopg: docs/scale.md); `make demo` stays without it
cluster: $(VENV)/.cluster
# in a variable because $(call) would split its argument at the comma
WITH_CLUSTER := .[dev,cluster]
$(VENV)/.cluster: $(VENV)/.installed
	$(call retry,$(PY) -m pip install -q -e '$(WITH_CLUSTER)')
	touch $@

# tests/test_web.py drives headless Chromium; a fresh machine has none (apt-get update only if needed)
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || $(APT) || { apt-get update -q && $(APT); }

test: venv cluster browser
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/retrieval demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache retrieval/_scan*.so
