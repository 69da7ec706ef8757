# SPDX-License-Identifier: Apache-2.0
# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv/ first.
PY := .venv/bin/python
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup test test-unit demo demo-target

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q --durations=25 tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(PY) -m vllm_redrafter.cli demo

demo-target: setup
	.venv/bin/vllm-redrafter demo-target
