# Two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.lock | cut -c1-12)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test lint lock docker-setup bench clean

$(STAMP): requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	exec $(BIN)/python -m controlplane.run

# Test workers (pytest-xdist): most of a test's time is spent waiting on model servers,
# MLflow and the database, so three workers use two cores well. PYTEST_WORKERS=0 runs serially.
# Tests marked `serial` stop a service every worker shares (PostgreSQL, Redis): they run
# alone afterwards (exit code 5: nothing selected, e.g. PYTEST_ARGS names other files).
PYTEST_WORKERS ?= 3
test: $(STAMP)
ifeq ($(PYTEST_WORKERS),0)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
else
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -p no:xdist -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]
endif

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Re-pin after editing requirements.txt.
lock:
	rm -rf /tmp/controlplane-lock && $(PYTHON) -m venv /tmp/controlplane-lock
	/tmp/controlplane-lock/bin/pip install --quiet -r requirements.txt
	/tmp/controlplane-lock/bin/pip freeze --exclude-editable > requirements.lock

docker-setup:
	bash .ci/docker-setup.sh

clean:
	rm -rf $(VENV) var
