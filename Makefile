# Everything a fresh machine needs comes from here: system packages, the venv, the pins.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORK ?= work
PRESET ?= default
MODEL ?= tdnn
# TTS and audio for the corpus; the aarch64 cross compiler links Arm profiles' TVM libraries;
# PostgreSQL for studies shared by many workers (`make postgres`, the tests' local server).
APT_PACKAGES := espeak-ng flite sox gcc-aarch64-linux-gnu g++-aarch64-linux-gnu postgresql
APT_COMMANDS := espeak-ng flite sox aarch64-linux-gnu-g++
# Debian keeps the server's programs off PATH, in /usr/lib/postgresql/<version>/bin.
APT_FILES := /usr/lib/postgresql/*/bin/initdb
TORCH_PIN := torch==2.13.0

.PHONY: run test lint sysdeps venv clean postgres postgres-stop

sysdeps:
	@missing=""; for c in $(APT_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	for f in $(APT_FILES); do [ -e "$$f" ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else echo "missing system packages:$$missing (run: sudo apt-get install $(APT_PACKAGES))"; exit 1; fi; \
	fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the pinned CPU wheel, so nothing later resolves a CUDA build.
$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -c "import torch, tvm, tvm_ffi; print('torch', torch.__version__, '| tvm', tvm.__version__)"
	touch $@

venv: $(VENV)/.stamp-install

SPACE ?= tdnn-default
# AVX2 code runs on every x86-64 host we use (AVX-512 ones too), and this profile ships a
# tuned database and a cost model, so a fresh run starts warm.
PROFILE ?= x86-avx2-2core
STUDY ?= make-run
STORAGE ?= sqlite:///$(WORK)/search/voxfit.db
SEARCH_TRIALS ?= 40
SEARCH_TIMEOUT ?= 15m
# The search's candidates inherit their weights from an elastic (once-for-all) supernet of the
# base, trained once for the space's widths (capped at ELASTIC_MINUTES, cached): a trial then
# takes seconds of accuracy work instead of minutes of distillation. ELASTIC=0 searches the
# plain base, each pruned candidate distilled (a study keeps the model it began with).
ELASTIC ?= 1
ELASTIC_MINUTES ?= 12
SEARCH_MODEL_FLAGS = $(if $(filter 1,$(ELASTIC)),--elastic --elastic-minutes $(ELASTIC_MINUTES))
# Bundles of at most this many front trials, evenly along the front (each takes about a
# minute: TVM library, ONNX, conformance pairs); `voxfit export --pareto` alone does them all.
BUNDLES ?= 4

# The main job: corpus, base model, a search on this CPU's local profile, the Pareto bundles,
# the HTML report (the search prints the front). Re-running resumes the same study.
run: sysdeps venv
	$(BIN)/voxfit data make --preset $(PRESET) --out $(WORK)/corpus
	$(BIN)/voxfit search --space $(SPACE) --profile $(PROFILE) --preset $(PRESET) \
	  --model $(MODEL) --work $(WORK) $(SEARCH_MODEL_FLAGS) \
	  --study $(STUDY) --storage $(STORAGE) --trials $(SEARCH_TRIALS) --timeout $(SEARCH_TIMEOUT)
	$(BIN)/voxfit export --study $(STUDY) --storage $(STORAGE) --pareto --at-most $(BUNDLES) \
	  --work $(WORK) --out $(WORK)/bundles
	$(BIN)/voxfit report --study $(STUDY) --storage $(STORAGE) --out $(WORK)/reports/$(STUDY).html

# A local PostgreSQL server under $(WORK)/postgres (started once, reused; 127.0.0.1 only,
# password in $(WORK)/postgres/password): prints the STORAGE=... URL that `voxfit search` and
# `voxfit worker` take, e.g. `make run STORAGE=postgresql+psycopg://...`.
PG_PORT ?= 55432
postgres: sysdeps venv
	@$(BIN)/python -m voxfit.search._postgres start $(WORK)/postgres $(PG_PORT)

postgres-stop: venv
	@$(BIN)/python -m voxfit.search._postgres stop $(WORK)/postgres

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Two pytest workers (pytest-xdist), each test file on one of them (module fixtures built
# once). A serial run keeps about one of a 2-core host's cores busy (it waits on compiles,
# RPC, subprocesses); two workers take ~2/3 of its wall time. One torch/TVM thread per
# worker (unless OMP_NUM_THREADS is set): the workers do not oversubscribe the cores.
# TEST_JOBS=0 runs serially. Tests marked alone assert a wall-clock ratio (a model timed
# against itself): beside the other worker's compiles one came out 1.57 against its 1.4
# bound (stop 46), so they run after the workers, by themselves.
TEST_JOBS ?= 2
test: sysdeps venv lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -q $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile -m 'not long and not alone')
	$(if $(filter-out 0,$(TEST_JOBS)),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -q -m 'alone and not long')

# The tests marked long (a whole command end to end, minutes each: the tiny device's
# onboarding seeded from the x86 database with its kernel table, then a search and a bundle
# on it, ~4.5 min, and the benchmark scripts); make test leaves them out (it onboards the
# tiny device leaner, ~2 min).
test-long: sysdeps venv
	$(BIN)/pytest -q -m long

# An emulated aarch64 device, not part of `make test`: Debian's qemu-user, an arm64 python3.11
# unpacked into a private sysroot and the aarch64 TVM wheels, all under $VOXFIT_QEMU_AARCH64
# (default ~/.cache/voxfit/qemu-aarch64); resumable. Serve it: voxfit device qemu-server.
.PHONY: qemu-aarch64
qemu-aarch64: sysdeps venv
	@command -v qemu-aarch64 >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing system packages: qemu-user"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; \
	  else echo "missing qemu-aarch64 (run: sudo apt-get install qemu-user)"; exit 1; fi; }
	$(BIN)/python -m voxfit.latency._qemu

clean:
	rm -rf $(WORK) .pytest_cache .ruff_cache .mypy_cache
