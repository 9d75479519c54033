#!/usr/bin/env bash
# What grows with the log: writer start, verification of the newest 1M records,
# custody.audit_digest() and an export of a range, measured at two log sizes so that the
# growth shows. Measures and prints; it is not a test and never gates CI.
#
#   scripts/bench_growth.sh [records (10000000)] [report file]
#
# The log is filled with pgbench select-only statements (one record each) in a cluster of its
# own (target/bench-growth-cluster), kept between runs: a second run with the same or a
# smaller size measures at once. BEFORE_PKG=<dir> (a `cargo pgrx package` output of an
# earlier build) also measures the writer start with that build's library, alternated with
# the current one in the same cluster. The extension must be installed (make bench does).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
target=${1:-10000000}; out=${2:-$root/target/bench-growth.md}
dir="$root/target/bench-growth-cluster"; port=24342
BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$BIN/pg_config; [ -x "$PG_CONFIG" ] || PG_CONFIG=$(command -v pg_config)
libdir=$("$PG_CONFIG" --pkglibdir)
as_pg() { runuser -u postgres -- "$@"; }
cluster() { "$here/cluster.sh" "$@"; }
q() { cluster psql "$port" -qAt -c "$1"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
count() { q "SELECT coalesce((custody.status()->>'head_seq')::int8, 0)"; }

if [ ! -f "$dir/PG_VERSION" ]; then
    cluster start "$dir" "$port" "max_connections = 50" "log_min_messages = log"
    "$root/target/release/custody" keygen --out "$dir.key" --name growth >/dev/null
    chown postgres: "$dir.key"
    echo "custody.signing_key_file = '$dir.key'" >> "$dir/postgresql.conf"
    echo "custody.durability = 'async'" >> "$dir/postgresql.conf"   # filling, not measuring commits
fi
cluster start "$dir" "$port"
q "CREATE EXTENSION IF NOT EXISTS pg_custody" >/dev/null
wait_ready() { for _ in $(seq 6000); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && return; sleep 0.05; done; }
wait_ready
[ "$(q "SELECT to_regclass('pgbench_accounts') IS NOT NULL")" = t ] ||
    as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -i -s 1 -q postgres >/dev/null 2>&1

fill() {  # up to $1 records
    local have; have=$(count)
    if [ "$have" -lt "$1" ]; then
        as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -M prepared -S -c 4 -j 2 \
            -t $(( ($1 - have) / 4 + 1 )) postgres >/dev/null 2>&1
    fi
    for _ in $(seq 3000); do [ "$(q "SELECT custody.flush()")" = t ] && break; done
}

# Seconds from the server accepting connections to the writer appending, and how many
# records the writer read to resume (its LOG line). $1: a library to start with instead (put
# in place while the server is stopped, as a new file: a running server maps the old one).
start_time() {
    cluster stop "$dir"
    if [ -n "${1:-}" ]; then cp "$1" "$libdir/pg_custody.so.new"; mv "$libdir/pg_custody.so.new" "$libdir/pg_custody.so"; fi
    cluster start "$dir" "$port"
    local t0 t1; t0=$(now); wait_ready; t1=$(now)
    local read; read=$(grep -o '([0-9]* records of custody.audit_log read' "$dir/server.log" | tail -1 | tr -dc 0-9)
    echo "$(secs "$t0" "$t1") ${read:-?}"
}

measure() {  # one table row at the current size
    local n head t0 t1 start from v d e
    n=$(count)
    start=$(start_time)
    head=$(q "SELECT max(seq) FROM custody.audit_log")
    from=$(( head > 1000000 ? head - 999999 : 1 ))
    q "SELECT count(*) FROM custody.verify_audit_chain($from)" >/dev/null   # pages into shared buffers
    t0=$(now); v=$(q "SELECT checked FROM custody.verify_audit_chain($from)"); t1=$(now); v="$v in $(secs "$t0" "$t1") s"
    t0=$(now); q "SELECT custody.audit_digest()" >/dev/null; t1=$(now); d=$(secs "$t0" "$t1")
    t0=$(now); e=$(cluster psql "$port" -qAt -c "COPY (SELECT * FROM custody.export_audit($from, $((from + 99999)))) TO STDOUT" | wc -l); t1=$(now)
    e="$e lines in $(secs "$t0" "$t1") s"
    echo "| $n | ${start% *} s (${start#* } records read) | $v | $d s | $e |"
}

{
echo "### What grows with the log — run of $(date -u '+%F %H:%M UTC')"
echo
echo "pgbench select-only records; PostgreSQL $($BIN/postgres --version | awk '{print $3}'), $(nproc) cores, release build."
echo "Writer start: from the server accepting connections to the writer appending (after a clean stop)."
echo
echo "| records | writer start | verify_audit_chain(newest 1M) | audit_digest() | export_audit(100k range) |"
echo "|---|---|---|---|---|"
} > "$out"
for size in $(( target / 10 )) "$target"; do
    fill "$size"
    measure >> "$out"
done

if [ -n "${BEFORE_PKG:-}" ]; then
    cur=$(mktemp -d); cp "$libdir/pg_custody.so" "$cur/"
    trap 'cluster stop "$dir"; cp "$cur/pg_custody.so" "$libdir/pg_custody.so.new"; mv "$libdir/pg_custody.so.new" "$libdir/pg_custody.so"' EXIT
    {
    echo
    echo "Writer start at $(count) records, the build in $BEFORE_PKG (before) and the current one alternated:"
    echo
    echo "| round | before | current, after the before build's stop (its head file has no frontier) | current, after its own stop |"
    echo "|---|---|---|---|"
    } >> "$out"
    for r in 1 2 3; do
        b=$(start_time "$BEFORE_PKG$libdir/pg_custody.so")
        c1=$(start_time "$cur/pg_custody.so"); c2=$(start_time)
        echo "| $r | ${b% *} s | ${c1% *} s (${c1#* } records read) | ${c2% *} s (${c2#* } records read) |" >> "$out"
    done
fi
cluster stop "$dir"
cat "$out"
