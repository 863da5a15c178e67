.PHONY: test lint format

test:
	python -m pytest -q

lint:
	ruff check calm_engine tests
	ruff format --check calm_engine tests

format:
	ruff check --fix calm_engine tests
	ruff format calm_engine tests
