# pvio: every target works from nothing on a machine with python3, gcc and make.
# The venv lives in .venv; the C extension is rebuilt whenever the ring's sources change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
EXT_STAMP := .stamp-ext
# Every C source, header and builder of the extensions: a change to any rebuilds them.
RING_SRC := setup.py ringbuf/_build.py pvio/core/_native_build.py ringbuf/netif.py pvio/abi/xen.py \
	$(wildcard ringbuf/*.c ringbuf/*.h pvio/core/native/*.[ch] backends/native/*.[ch] frontends/native/*.[ch])

.PHONY: all setup build demo test bench chart fuzz lint clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Install the project editable with its extras (re-run when the metadata changes).
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install -q -e '.[test,lint]'
	touch $(STAMP)

# Editable installs compile the extension in place; recompile it when its C changes.
$(EXT_STAMP): $(STAMP) $(RING_SRC)
	$(PY) setup.py -q build_ext --inplace
	touch $(EXT_STAMP)

setup: $(STAMP)

build: $(EXT_STAMP)

demo: build
	$(PY) -m pvio demo

test: build
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/bench

# The JSON keeps every benchmark's extra_info (pps, per-packet costs, ratios); the report prints it.
bench: build
	mkdir -p build
	$(PY) -m pytest -q tests/bench --benchmark-enable --benchmark-only -p no:cacheprovider \
		--benchmark-columns=min,median,mean,ops,rounds --benchmark-sort=name --benchmark-json=build/bench.json
	$(PY) -m pvio.harness.benchreport build/bench.json

# The device-model comparison table (Markdown) and its chart; matplotlib only here, not in the tests.
chart: build
	$(PIP) install -q 'matplotlib>=3.7'
	$(PY) -m pvio bench --markdown --chart docs/device_models.png
	$(PY) -m pvio.harness.moderation --markdown --chart docs/moderation_curve.png

fuzz: build
	PVIO_FUZZ=1 $(PY) -m pytest -q -p no:cacheprovider tests -k "model or stress or hostile or fuzz"

# mypy sees the installed layout (pvio.backends is backends/, ...) through a tree of symlinks,
# since it cannot follow the editable install's import hook.
TYPECHECK := build/typecheck
lint: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/pvio
	for f in pvio/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/pvio/; done
	for d in ringbuf backends frontends cpu; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/pvio/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p pvio

clean:
	rm -rf $(VENV) build *.egg-info $(EXT_STAMP) ringbuf/_ringbuf*.so ringbuf/_ringfast*.so backends/_snic_dma*.so frontends/_snic_driver*.so ringbuf/_ringbuf.c pvio/core/_native*.so pvio/core/_frames*.so pvio/core/_native.c
