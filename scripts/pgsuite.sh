#!/usr/bin/env bash
# PostgreSQL's own core regression suite (src/test/regress, parallel_schedule), run twice on
# one throwaway cluster: without pg_custody, then with it loaded, created and a Rego policy in
# force. Fails when a test fails only with pg_custody: loading it must change nothing a
# client sees (docs/threat-model.md, "Transparent").
#
#   scripts/pgsuite.sh MAJOR      (the extension must be installed in that server)
#
# The suite comes from Debian's source package of that major (apt-get source, with a source
# list and state folder of its own under target/, so nothing the machine installs from
# changes): bookworm serves postgresql-15, sid postgresql-18; 16 and 17 have no source
# package here and are skipped with a message. The source's minor release may differ from
# the server's, which makes a few tests fail either way; comparing the two runs handles that.
set -euo pipefail
major=${1:?usage: pgsuite.sh MAJOR}
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
case "$major" in
    15) suite="bookworm bookworm-updates" ;;
    18) suite="sid" ;;
    *) echo "pgsuite.sh: Debian serves no source of PostgreSQL $major here; skipped"; exit 0 ;;
esac
bin=$("$here/pgserver.sh" bindir "$major")
work="$root/target/pgsuite-$major"
port=2${major}32
as_pg() { runuser -u postgres -- "$@"; }
export PGBIN=$bin

# 1. The source.
src="$work/src"
if [ ! -f "$src/src/test/regress/parallel_schedule" ]; then
    command -v dpkg-source >/dev/null || apt-get install -y -qq dpkg-dev >/dev/null
    rm -rf "$work/apt" "$work/dl" "$src"
    mkdir -p "$work/apt/lists/partial" "$work/dl"
    for s in $suite; do
        echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $s main"
    done > "$work/apt/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$work/apt/lists" -o APT::Sandbox::User=root -qq)
    echo "== fetching Debian's source of postgresql-$major ($suite)"
    apt-get "${apt_opts[@]}" update
    (cd "$work/dl" && apt-get "${apt_opts[@]}" source --download-only "postgresql-$major")
    dpkg-source --no-check -x "$work/dl"/postgresql-"$major"_*.dsc "$src" >/dev/null
fi
echo "== PostgreSQL $major's core suite: source $(basename "$(ls "$work"/dl/*.orig.tar.* | head -1)"), server $("$bin/pg_config" --version)"

# 2. regress.so, the suite's C functions, built with the server's PGXS.
build="$work/build"
if [ ! -f "$build/regress.so" ]; then
    rm -rf "$build"; mkdir -p "$build"
    cp "$src/src/test/regress/regress.c" "$build/"
    printf 'MODULES = regress\nPGXS := $(shell $(PG_CONFIG) --pgxs)\ninclude $(PGXS)\n' > "$build/Makefile"
    make -s -C "$build" PG_CONFIG="$bin/pg_config" >/dev/null
fi

# 3. Two runs on one cluster. pg_regress creates (and drops) database `regression`; the
# server reads the suite's data files and writes into its results, hence the permissions.
pg_regress="$(dirname "$("$bin/pg_config" --pgxs)")/../test/regress/pg_regress"
cluster="$work/cluster"
chmod -R a+rX "$work" && chmod a+rwx "$build"
"$here/cluster.sh" stop "$cluster" immediate
rm -rf "$cluster"
"$here/cluster.sh" start "$cluster" "$port"
q() { "$here/cluster.sh" psql "$port" -qAt -c "$1"; }
run() {  # $1 = label
    local out="$work/out-$1"
    rm -rf "$out"; mkdir -p "$out"; chmod a+rwx "$out"
    echo "-- run $1"
    # pg_regress's exit status says whether tests failed; the comparison below decides.
    "$pg_regress" --bindir="$bin" --host=/tmp --port="$port" --user=postgres \
        --inputdir="$src/src/test/regress" --outputdir="$out" --dlpath="$build" \
        --schedule="$src/src/test/regress/parallel_schedule" \
        > "$out/run.log" 2>&1 || true
    # 15 prints `name ... FAILED`; 16 and later `not ok N - name`.
    sed -n -e 's/^[ ]*\(test \)\{0,1\}\([a-z0-9_]*\)[ ]*\.\.\. FAILED.*/\2/p' \
           -e 's/^not ok [0-9]*[ ]*[-+][ ]*\([a-z0-9_]*\).*/\1/p' "$out/run.log" | sort -u > "$out/failed"
    local total
    total=$(grep -cE '^(ok|not ok) |\.\.\. (ok|FAILED)' "$out/run.log" || true)
    echo "   $total tests, $(wc -l < "$out/failed") failed: $(tr '\n' ' ' < "$out/failed")"
    if [ "$total" -lt 100 ]; then
        echo "pgsuite.sh: the suite did not run (see $out/run.log):"; tail -20 "$out/run.log"
        "$here/cluster.sh" stop "$cluster"; exit 1
    fi
}

# Without the library.
q "ALTER SYSTEM SET shared_preload_libraries = 'plpgsql'"
"$here/cluster.sh" start "$cluster" "$port"
run without

# With it: loaded, created in custody.database, the writer appending, a policy in force
# (every statement is gated and its decision recorded).
q "ALTER SYSTEM RESET shared_preload_libraries"
"$here/cluster.sh" start "$cluster" "$port"
q "CREATE EXTENSION IF NOT EXISTS pg_custody"
for _ in $(seq 1 100); do
    [ "$(q "SELECT custody.status()->>'state'")" = appending ] && break
    sleep 0.1
done
q "SELECT custody.set_policy('suite', 'package custody
deny contains \"no role named nobody_at_all\" if input.subject.session_user == \"nobody_at_all\"')" >/dev/null
run with
records=$(q "SELECT count(*) FROM custody.audit_log")
verified=$(q "SELECT ok FROM custody.verify_audit_chain()")
"$here/cluster.sh" stop "$cluster"

only_with=$(comm -13 "$work/out-without/failed" "$work/out-with/failed")
echo "   with pg_custody: $records records, chain verifies: $verified"
if [ -n "$only_with" ]; then
    echo "pgsuite.sh: tests failing only with pg_custody on PostgreSQL $major: $(echo $only_with)"
    for t in $only_with; do
        # the test's section of regression.diffs
        awk -v t="/$t.out" '/^diff /{p = index($0, t) > 0} p' "$work/out-with/regression.diffs" | head -60
    done
    exit 1
fi
if [ "$verified" != t ]; then
    echo "pgsuite.sh: the chain does not verify after the suite"; exit 1
fi
echo "   no test fails only with pg_custody"
