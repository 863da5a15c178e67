.PHONY: test lint format bench device-check

test:
	python -m pytest -q

lint:
	ruff check calm_engine kernels tests benchmarks
	ruff format --check calm_engine kernels tests benchmarks

format:
	ruff check --fix calm_engine kernels tests benchmarks
	ruff format calm_engine kernels tests benchmarks

bench:
	python -m pytest benchmarks -q

device-check:
	python benchmarks/device_check.py
