#!/usr/bin/env bash
# What auditing costs: pgbench select-only (-S) and TPC-B, prepared, scale 10, 4 clients,
# against (a) no extension, (b) pgAudit 1.7 with log = 'all', log_relation, log_rows,
# (c) pg_custody durability = async, (d) pg_custody durability = commit (the default).
# Configurations alternate within each round; the table shows the median TPS over rounds
# and each configuration's median ratio to (a) of the same round. A benchmark measures and
# prints: it is not a test and never gates CI. Quote ratios from one run only.
#   scripts/bench.sh [seconds per run (20)] [rounds (3)]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
secs=${1:-20}; rounds=${2:-3}
dir="$root/target/bench-cluster"; port=54340
BIN=/usr/lib/postgresql/15/bin
cluster() { "$here/cluster.sh" "$@"; }
as_pg() { runuser -u postgres -- "$@"; }

if ! dpkg -s postgresql-15-pgaudit >/dev/null 2>&1; then
    apt-get install -y -qq postgresql-15-pgaudit >/dev/null
fi

cluster stop "$dir" immediate; rm -rf "$dir"
cluster start "$dir" "$port" "max_connections = 50" "shared_buffers = 512MB"
cluster psql "$port" -qc "CREATE EXTENSION pg_custody" >/dev/null
as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

configure() {  # $1 = a|b|c|d
    local conf="$dir/postgresql.auto.conf"
    case "$1" in
    a) echo "shared_preload_libraries = ''" > "$conf.tmp" ;;
    b) printf "%s\n" "shared_preload_libraries = 'pgaudit'" "pgaudit.log = 'all'" \
              "pgaudit.log_relation = on" "pgaudit.log_rows = on" \
              "logging_collector = on" "log_directory = 'pglog'" > "$conf.tmp" ;;
    c) printf "%s\n" "shared_preload_libraries = 'pg_custody'" "custody.durability = 'async'" > "$conf.tmp" ;;
    d) printf "%s\n" "shared_preload_libraries = 'pg_custody'" "custody.durability = 'commit'" > "$conf.tmp" ;;
    esac
    # an empty preload list must not be quoted as an element
    sed -i "s/^shared_preload_libraries = ''$/shared_preload_libraries = 'plpgsql'/" "$conf.tmp"
    chown postgres: "$conf.tmp"; mv "$conf.tmp" "$conf"
    as_pg env -u RUST_BACKTRACE "$BIN/pg_ctl" -D "$dir" -m fast -w restart -l "$dir/server.log" >/dev/null
    if [ "$1" = c ] || [ "$1" = d ]; then
        for _ in $(seq 100); do
            [ "$(cluster psql "$port" -qAtc "SELECT custody.status()->>'state'")" = appending ] && break
            sleep 0.1
        done
    fi
}

run() {  # $1 = extra pgbench args; prints TPS
    as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -M prepared -c 4 -j 2 -T "$secs" $1 postgres 2>/dev/null \
        | awk '/^tps = / { print $3; exit }'
}

declare -A tps
configs="a b c d"
for r in $(seq "$rounds"); do
    for cfg in $configs; do
        configure "$cfg"
        tps[$cfg,S,$r]=$(run "-S")
        tps[$cfg,B,$r]=$(run "")
        echo "round $r config $cfg: select-only ${tps[$cfg,S,$r]} tps, tpc-b ${tps[$cfg,B,$r]} tps" >&2
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
label() { case "$1" in a) echo "(a) no extension";; b) echo "(b) pgAudit log=all";;
                       c) echo "(c) pg_custody async";; d) echo "(d) pg_custody commit";; esac; }
echo
echo "pgbench scale 10, 4 clients, -M prepared, ${secs}s per run, $rounds rounds, $(nproc) cores, $(date -u +%F)"
echo
echo "| configuration | select-only TPS | ratio to (a) | TPC-B TPS | ratio to (a) |"
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
cluster stop "$dir"
