# pg_custody — the front door. `make demo` and `make test` set up everything they need on a
# fresh Debian 12 machine (as root, or a user with sudo) and are safe to run again.
#
# PostgreSQL versions: 15 (Debian's), 16, 17 and 18 (server trees fetched into target/pg by
# scripts/pgserver.sh). `make test` runs every kind of test on each of them; PG=17 picks one
# (`PG=17 make test`, `make demo PG=18`). demo, install and bench use 15 unless PG says
# otherwise; `make install PG_CONFIG=/path/to/pg_config` installs into any server.

VERSIONS    := 15 16 17 18
PG          ?=
TEST_PGS    := $(or $(PG),$(VERSIONS))
ONE_PG      := $(or $(PG),15)
PGSERVER    := scripts/pgserver.sh
# The server's bin directory (fetched on first use; evaluated only by targets that need it).
PGBIN        = $(shell $(PGSERVER) bindir $(ONE_PG))
PG_CONFIG   ?= $(PGBIN)/pg_config
PGRX_VER    := 0.18.0
# Versions cargo-pgrx must know (make test asks for all it runs).
PGRX_PGS    ?= $(ONE_PG)
APT_PKGS    := postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo pgbouncer
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CLUSTER     := scripts/cluster.sh
DEMO_DIR    := target/demo-cluster-$(ONE_PG)
DEMO_PORT   := 2$(ONE_PG)29
REGRESS_DIR := target/regress-cluster-$(ONE_PG)
# Ports per version (2NN30, 2NN31; own clusters of the client tests add up to 99), so a
# cluster a failed run left behind never serves another version's tests. All below Linux's
# ephemeral range (32768-60999): a test client's outgoing connection can hold any port in
# it, and a server started on that port then fails with "Address already in use".
REGRESS_PORT:= 2$(ONE_PG)30
CLIENT_DIR  := target/client-cluster-$(ONE_PG)
CLIENT_PORT := 2$(ONE_PG)31
BINDIR      ?= /usr/local/bin
BENCH_SECONDS ?= 20
BENCH_ROUNDS  ?= 3
# records the log grows to for scripts/bench_growth.sh (writer start, verification, digest, export)
BENCH_GROWTH_RECORDS ?= 10000000
# An earlier revision to measure as configuration (d0) in the same rounds, e.g. BENCH_BEFORE=v0.1.0
BENCH_BEFORE  ?=

export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup deps pgrx build install install-dev demo test test-version lint test-unit \
        test-pg test-regress test-postgres-suite test-client bench stop clean

all: build

## setup: Debian packages, cargo-pgrx $(PGRX_VER), pgrx pointed at the servers (offline)
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
	$(PGSERVER) pgrx-init $(PGRX_PGS)

## build: the extension and the `custody` command-line verifier (debug)
build: setup
	cargo build --lib --no-default-features --features pg$(ONE_PG)
	cargo build -p custody-cli

## install: the extension (release build) into PostgreSQL $(ONE_PG), or the server PG_CONFIG
## names, and `custody` into $(BINDIR)
install: setup
	$(SUDO) env PATH="$(PATH)" cargo pgrx install --profile dist --pg-config $(PG_CONFIG)
	cargo build --profile dist -p custody-cli
	$(SUDO) install -m 0755 target/dist/custody $(BINDIR)/custody

# The debug build the tests run against (quicker to build than a release one).
install-dev: setup
	$(SUDO) env PATH="$(PATH)" cargo pgrx install --pg-config $(PG_CONFIG)
	cargo build -p custody-cli

## demo: a throwaway cluster with pg_custody, and a short tour of what it does
demo: install
	PGBIN=$(PGBIN) $(CLUSTER) stop $(DEMO_DIR) immediate; rm -rf $(DEMO_DIR) $(DEMO_DIR).key $(DEMO_DIR).*.json*
	PGBIN=$(PGBIN) $(CLUSTER) start $(DEMO_DIR) $(DEMO_PORT)
	PGBIN=$(PGBIN) scripts/demo.sh $(DEMO_PORT) $(DEMO_DIR)

## test: every kind of test on every supported version (PG=NN: one); non-zero exit on failure
test:
	$(MAKE) setup PGRX_PGS="$(TEST_PGS)"
	$(MAKE) test-unit
	@for v in $(TEST_PGS); do \
	    echo "== PostgreSQL $$v"; \
	    $(MAKE) test-version PG=$$v || exit 1; \
	done

# Every kind of test that needs a server, on PostgreSQL $(ONE_PG) (and the lints for it).
test-version:
	$(MAKE) lint
	$(MAKE) test-pg
	$(MAKE) install-dev
	$(MAKE) test-regress
	$(MAKE) test-postgres-suite
	$(MAKE) test-client

# 0. clippy, warnings as errors: every unsafe block documented (src/lib.rs), per version
lint: setup
	cargo clippy --lib --no-default-features --features pg$(ONE_PG) -- -D warnings
	cargo clippy -p custody-chain -p custody-cli -p custody-policy -- -D warnings

# 1. pure unit tests (no PostgreSQL)
test-unit:
	cargo test -p custody-chain -p custody-cli -p custody-policy

# 2. in-backend #[pg_test]s (and the extension crate's plain #[test]s), server run as postgres
test-pg: setup
	mkdir -p target/pgrx-test-data-$(ONE_PG) && chown postgres: target/pgrx-test-data-$(ONE_PG) 2>/dev/null || true
	env -u RUST_BACKTRACE cargo pgrx test pg$(ONE_PG) --runas postgres --pgdata $(CURDIR)/target/pgrx-test-data-$(ONE_PG)

# 3. pg_regress golden files against a fresh cluster (cargo pgrx regress cannot run as root)
test-regress:
	PGBIN=$(PGBIN) $(CLUSTER) stop $(REGRESS_DIR) immediate; rm -rf $(REGRESS_DIR) target/regress-out-$(ONE_PG)
	PGBIN=$(PGBIN) $(CLUSTER) start $(REGRESS_DIR) $(REGRESS_PORT)
	mkdir -p target/regress-out-$(ONE_PG)
	$$(dirname $$($(PG_CONFIG) --pgxs))/../test/regress/pg_regress --use-existing --bindir=$(PGBIN) \
	    --host=/tmp --port=$(REGRESS_PORT) --user=postgres --dbname=postgres \
	    --inputdir=tests/pg_regress --outputdir=target/regress-out-$(ONE_PG) \
	    $$(cd tests/pg_regress/sql && ls *.sql | sed 's/\.sql$$//' | sort) \
	  || { cat target/regress-out-$(ONE_PG)/regression.diffs; PGBIN=$(PGBIN) $(CLUSTER) stop $(REGRESS_DIR); exit 1; }
	PGBIN=$(PGBIN) $(CLUSTER) stop $(REGRESS_DIR)

# 4. PostgreSQL's own core regression suite without and with pg_custody: no test may fail only
# with it (15 and 18: the majors Debian serves the source of; skipped for the others)
test-postgres-suite:
	scripts/pgsuite.sh $(ONE_PG)

# 5. client-side tests with real connections, crashes and restarts; on 17 and 18 also a
# pg_upgrade from 16 (tests/operations.rs), with pg_custody installed into both. Not from
# Debian's 15: its 15.20 gives every column a `pg_attver` option that 17.11's and 18.6's
# pg_restore cannot restore, so pg_upgrade from it fails with or without pg_custody.
UPGRADE_FROM = $(if $(filter 17 18,$(ONE_PG)),16,)
test-client:
	$(if $(UPGRADE_FROM),$(MAKE) setup PGRX_PGS="$(UPGRADE_FROM) $(ONE_PG)" && $(MAKE) install-dev PG=$(UPGRADE_FROM),true)
	PGBIN=$(PGBIN) $(CLUSTER) stop $(CLIENT_DIR) immediate; rm -rf $(CLIENT_DIR)
	PGBIN=$(PGBIN) CUSTODY_TEST_PGBIN=$(PGBIN) CUSTODY_TEST_PGDATA=$(CURDIR)/$(CLIENT_DIR) \
	    CUSTODY_TEST_UPGRADE_FROM=$(if $(UPGRADE_FROM),$(shell $(PGSERVER) bindir $(UPGRADE_FROM))) \
	    CUSTODY_TEST_PORT=$(CLIENT_PORT) cargo test -p pg_custody_client_tests -- --test-threads=1; \
	    rc=$$?; PGBIN=$(PGBIN) $(CLUSTER) stop $(CLIENT_DIR); exit $$rc

## bench: what auditing costs (pgbench with and without the library, pgAudit alongside);
## release build, PostgreSQL 15 (pgAudit comes from Debian). Measures and prints; never part
## of `make test`.
bench: setup
	$(SUDO) env PATH="$(PATH)" cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config
	cargo build --release -p custody-cli -p custody-chain --examples
	BEFORE=$(BENCH_BEFORE) scripts/bench.sh $(BENCH_SECONDS) $(BENCH_ROUNDS)
	scripts/bench_rowcheck.sh
	scripts/bench_policy_cpu.sh
	scripts/bench_growth.sh $(BENCH_GROWTH_RECORDS)

## stop / clean: the throwaway clusters
stop:
	-@for v in $(VERSIONS); do \
	    if [ $$v = 15 ]; then b=/usr/lib/postgresql/15/bin; else b=$(CURDIR)/target/pg/$$v/bin; fi; \
	    [ -x $$b/pg_ctl ] || continue; \
	    for d in target/regress-cluster-$$v target/client-cluster-$$v target/demo-cluster-$$v target/pgsuite-$$v/cluster; do \
	        [ -f $$d/PG_VERSION ] && [ "$$(cat $$d/PG_VERSION)" = $$v ] && PGBIN=$$b $(CLUSTER) stop $$d; \
	    done; \
	done; true

clean: stop
	rm -rf target/demo-cluster-* target/pgsuite-*/cluster target/regress-cluster-* target/client-cluster-* target/pgrx-test-data-* target/regress-out-*
