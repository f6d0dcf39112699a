# Hooklog. Logic lives in deploy/local/ scripts; targets stay thin.
.PHONY: help run test test-scale bench profile lint build dev-up dev-down clean

CARGO ?= cargo
TEST_THREADS ?= 4

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

run: ## Install what is missing, start Redis + Tansu + both binaries (Ctrl-C stops all)
	deploy/local/run.sh

test: ## Install what is missing, lint, then run unit and end-to-end tests
	deploy/local/install.sh
	$(MAKE) lint
	TEST_THREADS=$(TEST_THREADS) CARGO=$(CARGO) deploy/local/test.sh

test-scale: ## Only the 3 x 3 replica test with kill -9 and SIGTERM (also part of make test)
	deploy/local/install.sh
	$(CARGO) build --workspace --bins
	$(CARGO) test -p hooklog-e2e --test e2e scale -- --ignored --test-threads=1

bench: ## Benchmarks side by side (BENCH_QUICK=1 for ~2 min); writes docs/benchmarks.md
	deploy/local/install.sh
	$(CARGO) build --release --workspace --bins
	HOOKLOG_BIN_PROFILE=release TANSU_STORAGE=memory REDIS_APPENDFSYNC=everysec $(CARGO) run --release -q -p hooklog-e2e --bin hooklog-bench

profile: ## perf + flamegraph of one binary under the bench load (WHAT=ingest|processor); writes bench/profiles/
	bench/profile.sh $(or $(WHAT),ingest)

lint: ## cargo fmt --check, clippy -D warnings, rustdoc -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items -q
	deploy/local/lint-deploy.sh

build: ## Release build of both binaries (installs OpenSSL's headers when missing)
	deploy/local/install.sh build
	$(CARGO) build --release --bins

dev-up: ## Start only Redis + Tansu (and create the example topics)
	deploy/local/install.sh
	deploy/local/stack.sh up
	$(CARGO) run -q --bin hooklog-processor -- --config deploy/local/hooklog.toml create-topics

dev-down: ## Stop exactly what dev-up started
	deploy/local/stack.sh down

clean: ## Remove run directories (keeps .tools/)
	rm -rf .run
