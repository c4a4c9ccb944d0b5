# The two commands the README starts with: `make run` and `make test`.
# Both create the Python environment and resolve Kafka's jars first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit bench chaos kafka schemas clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

kafka:
	bash infra/kafka/kafka.sh resolve

## Run the gateway locally: Kafka, topics, ingest, Faust worker, sinks, demo mailbox, web console.
run: $(STAMP) kafka
	$(BIN)/bulwark up

## The whole test suite (unit and integration, against a real broker).
test: $(STAMP) kafka
	$(BIN)/pytest

## Only the fast tests, no services.
unit: $(STAMP)
	$(BIN)/pytest tests --ignore=tests/integration

## Benchmarks: each script in bench/ starts what it needs and prints its figures.
bench: $(STAMP) kafka
	$(BIN)/python -m bench

## Chaos with reconciliation: 10,000 messages while every component is SIGKILLed and restarted
## (about 10 minutes; `make bench` runs it with 1,000). Exits non-zero on any loss or duplicate.
chaos: $(STAMP) kafka
	$(BIN)/python -m bench.chaos --messages 10000

## Regenerate schemas/json/ after changing an event.
schemas: $(STAMP)
	$(BIN)/bulwark schemas generate

clean:
	rm -rf var .pytest_cache
