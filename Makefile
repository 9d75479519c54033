# pg_custody — the front door. `make demo` and `make test` set up everything they need on a
# fresh Debian 12 machine (as root, or a user with sudo) and are safe to run again.

PG_CONFIG   ?= /usr/lib/postgresql/15/bin/pg_config
PGBIN       := /usr/lib/postgresql/15/bin
PGXS_DIR    := /usr/lib/postgresql/15/lib/pgxs
PGRX_VER    := 0.18.0
APT_PKGS    := postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CLUSTER     := scripts/cluster.sh
DEMO_DIR    := target/demo-cluster
DEMO_PORT   := 54329
REGRESS_DIR := target/regress-cluster
REGRESS_PORT:= 54330
CLIENT_DIR  := target/client-cluster
CLIENT_PORT := 54331
BINDIR      ?= /usr/local/bin
BENCH_SECONDS ?= 20
BENCH_ROUNDS  ?= 3
# An earlier revision to measure as configuration (d0) in the same rounds, e.g. BENCH_BEFORE=v0.1.0
BENCH_BEFORE  ?=

export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup deps pgrx build install demo test test-unit test-pg test-regress \
        test-client bench stop clean

all: build

## setup: Debian packages, cargo-pgrx $(PGRX_VER), pgrx pointed at the system PostgreSQL 15
setup: deps pgrx

deps:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	    echo "== installing Debian packages: $(APT_PKGS)"; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); \
	fi

pgrx: deps
	@if ! cargo pgrx --version 2>/dev/null | grep -q "$(PGRX_VER)"; then \
	    echo "== installing cargo-pgrx $(PGRX_VER) (a few minutes)"; \
	    cargo install cargo-pgrx --version $(PGRX_VER) --locked; \
	fi
	@if ! grep -qs '^pg15 *= *"$(PG_CONFIG)"' $(HOME)/.pgrx/config.toml; then \
	    cargo pgrx init --pg15 $(PG_CONFIG); \
	fi

## build: the extension and the `custody` command-line verifier
build: setup
	cargo build --lib
	cargo build -p custody-cli

## install: the extension into PostgreSQL 15, `custody` into $(BINDIR)
install: setup
	$(SUDO) env PATH="$(PATH)" cargo pgrx install --pg-config $(PG_CONFIG)
	cargo build -p custody-cli
	$(SUDO) install -m 0755 target/debug/custody $(BINDIR)/custody

## demo: a throwaway cluster with pg_custody, and a short tour of what it does
demo: install
	$(CLUSTER) stop $(DEMO_DIR) immediate; rm -rf $(DEMO_DIR) $(DEMO_DIR).key $(DEMO_DIR).*.json*
	$(CLUSTER) start $(DEMO_DIR) $(DEMO_PORT)
	scripts/demo.sh $(DEMO_PORT) $(DEMO_DIR)

## test: every kind of test; non-zero exit on any failure
test: setup
	$(MAKE) test-unit
	$(MAKE) test-pg
	$(MAKE) install
	$(MAKE) test-regress
	$(MAKE) test-client

# 1. pure unit tests (no PostgreSQL)
test-unit:
	cargo test -p custody-chain -p custody-cli -p custody-policy

# 2. in-backend #[pg_test]s (and the extension crate's plain #[test]s), server run as postgres
test-pg: setup
	mkdir -p target/pgrx-test-data && chown postgres: target/pgrx-test-data 2>/dev/null || true
	env -u RUST_BACKTRACE cargo pgrx test pg15 --runas postgres --pgdata $(CURDIR)/target/pgrx-test-data

# 3. pg_regress golden files against a fresh cluster (cargo pgrx regress cannot run as root)
test-regress:
	$(CLUSTER) stop $(REGRESS_DIR) immediate; rm -rf $(REGRESS_DIR) target/regress-out
	$(CLUSTER) start $(REGRESS_DIR) $(REGRESS_PORT)
	mkdir -p target/regress-out
	$(PGXS_DIR)/src/test/regress/pg_regress --use-existing --bindir=$(PGBIN) \
	    --host=/tmp --port=$(REGRESS_PORT) --user=postgres --dbname=postgres \
	    --inputdir=tests/pg_regress --outputdir=target/regress-out \
	    $$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$$//' | sort) \
	  || { cat target/regress-out/regression.diffs; $(CLUSTER) stop $(REGRESS_DIR); exit 1; }
	$(CLUSTER) stop $(REGRESS_DIR)

# 4. client-side tests with real connections, crashes and restarts
test-client:
	$(CLUSTER) stop $(CLIENT_DIR) immediate; rm -rf $(CLIENT_DIR)
	CUSTODY_TEST_PGDATA=$(CURDIR)/$(CLIENT_DIR) CUSTODY_TEST_PORT=$(CLIENT_PORT) \
	    cargo test -p pg_custody_client_tests -- --test-threads=1
	$(CLUSTER) stop $(CLIENT_DIR)

## bench: what auditing costs (pgbench with and without the library, pgAudit alongside);
## release build. Measures and prints; never part of `make test`.
bench: setup
	$(SUDO) env PATH="$(PATH)" cargo pgrx install --release --pg-config $(PG_CONFIG)
	cargo build --release -p custody-cli -p custody-chain --examples
	BEFORE=$(BENCH_BEFORE) scripts/bench.sh $(BENCH_SECONDS) $(BENCH_ROUNDS)
	scripts/bench_rowcheck.sh
	scripts/bench_policy_cpu.sh

## stop / clean: the throwaway clusters
stop:
	-$(CLUSTER) stop $(DEMO_DIR)
	-$(CLUSTER) stop $(REGRESS_DIR)
	-$(CLUSTER) stop $(CLIENT_DIR)

clean: stop
	rm -rf $(DEMO_DIR) $(REGRESS_DIR) $(CLIENT_DIR) target/pgrx-test-data target/regress-out
