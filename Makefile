# Everyday commands (README.md and docs/ have the rest).
.PHONY: install test test-lowest test-slow lint format docs bench gpu-bundle

install:  ## the project and its dev tools, editable
	python -m pip install -e ".[dev]"

test:  ## the default suite (offline, 4-5 minutes on 2 CPU cores, one process per core)
	python -m pytest

test-lowest:  ## the default suite on the lowest releases pyproject.toml allows (.venv-lowest; about 10 min)
	bash .ci/lowest

test-slow:  ## the longer end-to-end tests
	python -m pytest -m slow

lint:  ## what the pre-commit hook checks
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

docs:  ## docs/config.md, the config reference, from conf/ (tests/test_docs.py fails when it is stale)
	python docs/make_config_reference.py

bench:  ## the strategy comparison on ../shared/datasets/hotdog64 (about 45 min on 2 CPU cores)
	python -m benchmarks.strategies

gpu-bundle:  ## .whl/: the wheels and CIFAR-10 archive the lent GPU machine lacks (benchmarks/gpu_check.sh --bundle .whl)
	bash benchmarks/gpu_bundle.sh .whl
