#!/usr/bin/env bash
# What pg_custody costs, side by side with no auditing and with pgAudit. Measures and prints;
# it is not a test and never gates CI. Quote ratios from one run only: these machines are
# small and noisy.
#
#   scripts/bench.sh [seconds per run (20)] [rounds (3)] [parts (tps,verify,policy,storage)]
#
# tps:     pgbench TPC-B and select-only (-S), -M prepared, scale 10, 4 clients, configurations
#          alternated within each round; median TPS and median ratio to (a) of the same round:
#          (a) no extension; (b) pgAudit, log = 'all', log_relation, log_rows, to a log file;
#          (c) pg_custody durability = async; (d) pg_custody durability = commit (default);
#          (e) (d) plus a 20-rule Rego policy (scripts/bench_policy.rego) on every statement.
# verify:  custody.verify_audit_chain() and `custody verify` over a chain of 1M records.
# policy:  the statement gate and custody.check() latency (crates/custody-policy gate_bench).
# storage: bytes per audit record, table and indexes, for pgbench's statements.
# The extension must be installed (make bench installs a release build first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
secs=${1:-20}; rounds=${2:-3}; parts=${3:-tps,verify,policy,storage}
dir="$root/target/bench-cluster"; port=54340
BIN=/usr/lib/postgresql/15/bin
out="$root/target/bench-report.md"
cluster() { "$here/cluster.sh" "$@"; }
as_pg() { runuser -u postgres -- "$@"; }
q() { cluster psql "$port" -qAt -c "$1"; }
has() { [[ ",$parts," == *",$1,"* ]]; }
now() { date +%s.%N; }

if ! dpkg -s postgresql-15-pgaudit >/dev/null 2>&1; then
    apt-get install -y -qq postgresql-15-pgaudit >/dev/null
fi

cluster stop "$dir" immediate; rm -rf "$dir" "$dir.key"
cluster start "$dir" "$port" "max_connections = 50" "shared_buffers = 512MB"
pub=$(custody keygen --out "$dir.key" --name bench); chown postgres: "$dir.key"
echo "custody.signing_key_file = '$dir.key'" >> "$dir/postgresql.conf"
cluster start "$dir" "$port"
q "CREATE EXTENSION pg_custody" >/dev/null
for _ in $(seq 100); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && break; sleep 0.1; done
cluster psql "$port" -qAt -v ON_ERROR_STOP=1 \
    -c "SELECT custody.set_policy('bench_rules', \$rego\$$(cat "$here/bench_policy.rego")\$rego\$)" >/dev/null
as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

wait_ready() {
    for _ in $(seq 100); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && return; sleep 0.1; done
}

configure() {  # $1 = a|b|c|d|e
    local conf="$dir/postgresql.auto.conf"
    case "$1" in
    a) echo "shared_preload_libraries = 'plpgsql'" > "$conf.tmp" ;;
    b) printf "%s\n" "shared_preload_libraries = 'pgaudit'" "pgaudit.log = 'all'" \
              "pgaudit.log_relation = on" "pgaudit.log_rows = on" \
              "logging_collector = on" "log_directory = 'pglog'" > "$conf.tmp" ;;
    c) printf "%s\n" "custody.durability = 'async'" "custody.enforce = 'off'" > "$conf.tmp" ;;
    d) printf "%s\n" "custody.durability = 'commit'" "custody.enforce = 'off'" > "$conf.tmp" ;;
    e) printf "%s\n" "custody.durability = 'commit'" "custody.enforce = 'on'" > "$conf.tmp" ;;
    esac
    chown postgres: "$conf.tmp"; mv "$conf.tmp" "$conf"
    as_pg env -u RUST_BACKTRACE "$BIN/pg_ctl" -D "$dir" -m fast -w restart -l "$dir/server.log" >/dev/null
    case "$1" in c|d|e) wait_ready ;; esac
}

pgbench_tps() {  # $1 = extra pgbench args
    as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -M prepared -c 4 -j 2 -T "$secs" $1 postgres 2>/dev/null \
        | awk '/^tps = / { print $3; exit }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
label() { case "$1" in a) echo "(a) no extension";; b) echo "(b) pgAudit log=all";;
                       c) echo "(c) pg_custody async";; d) echo "(d) pg_custody commit";;
                       e) echo "(e) (d) + 20-rule Rego policy";; esac; }

{
echo "## Run of $(date -u '+%F %H:%M UTC')"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), PostgreSQL $($BIN/postgres --version | awk '{print $3}'), release build."
echo
} > "$out"

if has tps; then
    declare -A tps
    configs="a b c d e"
    for r in $(seq "$rounds"); do
        for cfg in $configs; do
            configure "$cfg"
            tps[$cfg,S,$r]=$(pgbench_tps "-S")
            tps[$cfg,B,$r]=$(pgbench_tps "")
            echo "round $r config $cfg: select-only ${tps[$cfg,S,$r]} tps, tpc-b ${tps[$cfg,B,$r]} tps" >&2
        done
    done
    {
    echo "### Throughput"
    echo
    echo "pgbench scale 10, 4 clients, 2 threads, -M prepared, ${secs} s per run, $rounds rounds, configurations alternated in each round."
    echo
    echo "| configuration | select-only TPS (median) | ratio to (a) | TPC-B TPS (median) | ratio to (a) |"
    echo "|---|---|---|---|---|"
    for cfg in $configs; do
        line="| $(label "$cfg") "
        for w in S B; do
            med=$(for r in $(seq "$rounds"); do echo "${tps[$cfg,$w,$r]}"; done | median)
            ratio=$(for r in $(seq "$rounds"); do
                        awk -v x="${tps[$cfg,$w,$r]}" -v y="${tps[a,$w,$r]}" 'BEGIN { printf "%.3f\n", x / y }'
                    done | median)
            line+="| $(printf '%.0f' "$med") | $(awk -v x="$ratio" 'BEGIN { printf "%.0f %%", x * 100 }') "
        done
        echo "$line|"
    done
    echo
    } >> "$out"
fi

if has storage || has verify; then
    configure d
fi

if has verify; then
    have=$(q "SELECT count(*) FROM custody.audit_log")
    if [ "$have" -lt 1000000 ]; then   # fill the chain up to 1M records with select-only statements
        as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -M prepared -S -c 4 -j 2 \
            -t $(( (1000000 - have) / 4 + 1000 )) postgres >/dev/null 2>&1
    fi
    for _ in $(seq 300); do   # until the writer has stored them all
        [ "$(q "SELECT (custody.status()->>'head_seq')::int8 >= 1000000")" = t ] && break
        sleep 0.2
    done
    n=1000000   # the first 1M records (the throughput runs may have written many more)
    t0=$(now); res=$(q "SELECT ok || ' ' || checked FROM custody.verify_audit_chain(1, $n)"); t1=$(now)
    sql_rate=$(awk -v n="${res#* }" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
    cluster psql "$port" -q -c "COPY (SELECT * FROM custody.export_audit(1, $n)) TO STDOUT" > "$dir.export.jsonl"
    t0=$(now); cli=$("$root/target/release/custody" verify --log "$dir.export.jsonl" --public-key "$pub" | head -1); t1=$(now)
    lines=$(grep -c '"type":"record"' "$dir.export.jsonl")
    cli_rate=$(awk -v n="$lines" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
    {
    echo "### Verification"
    echo
    echo "| verifier | records | result | records/s |"
    echo "|---|---|---|---|"
    echo "| custody.verify_audit_chain() | ${res#* } | ok = ${res%% *} | $sql_rate |"
    echo "| custody verify (command line, with signatures) | $lines | $cli | $cli_rate |"
    echo
    } >> "$out"
    rm -f "$dir.export.jsonl"
fi

if has storage; then
    {
    echo "### Storage"
    echo
    q "SELECT format('%s records of pgbench statements: %s bytes per record in the table (with TOAST), %s in its indexes, %s in all',
                     count(*), pg_table_size('custody.audit_log') / count(*),
                     pg_indexes_size('custody.audit_log') / count(*),
                     pg_total_relation_size('custody.audit_log') / count(*))
       FROM custody.audit_log"
    echo
    } >> "$out"
fi

cluster stop "$dir"

if has policy; then
    {
    echo "### Policy decisions"
    echo
    echo '```'
    (cd "$root" && cargo run -q --release -p custody-policy --example gate_bench 2>&1)
    echo '```'
    echo
    } >> "$out"
fi

cat "$out"
