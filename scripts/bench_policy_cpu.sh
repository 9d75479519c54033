#!/usr/bin/env bash
# What the 20-rule policy of configuration (e) costs per statement, as busy CPU rather than
# throughput: all processes' non-idle time (/proc/stat: user, nice, system, irq, softirq)
# per pgbench select-only transaction, with the policy off and on, alternated in one
# cluster. On a small shared machine TPS moves by tens of percent between runs; CPU per
# transaction moves less. Prints a markdown section. Measures and prints; never a test.
#   scripts/bench_policy_cpu.sh [rounds (7)] [transactions per client (40000)]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
rounds=${1:-7}; tx=${2:-40000}; clients=4
dir="$root/target/bench-policy-cpu"; port=54343
BIN=/usr/lib/postgresql/15/bin
cluster() { "$here/cluster.sh" "$@"; }
q() { cluster psql "$port" -qAt -v ON_ERROR_STOP=1 -c "$1"; }
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
hz=$(getconf CLK_TCK)

cluster stop "$dir" immediate; rm -rf "$dir"
cluster start "$dir" "$port" "shared_buffers = 256MB" >/dev/null
q "CREATE EXTENSION pg_custody" >/dev/null
for _ in $(seq 100); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && break; sleep 0.1; done
runuser -u postgres -- "$BIN/pgbench" -h /tmp -p "$port" -i -s 10 -q postgres >/dev/null 2>&1
policy_off() { q "SELECT custody.drop_policy('bench_rules') FROM custody.policies WHERE name = 'bench_rules'" >/dev/null; }
policy_on() { q "SELECT custody.set_policy('bench_rules', \$rego\$$(cat "$here/bench_policy.rego")\$rego\$)" >/dev/null; }
per_tx() {  # µs of busy CPU per transaction of one pgbench run
    local a b
    a=$(busy)
    runuser -u postgres -- "$BIN/pgbench" -h /tmp -p "$port" -S -M prepared -c "$clients" -j 2 \
        -t "$tx" -n postgres >/dev/null 2>&1
    b=$(busy)
    awk -v d=$((b - a)) -v hz="$hz" -v n=$((clients * tx)) 'BEGIN { printf "%.2f", d * 1e6 / hz / n }'
}
echo "### The 20-rule policy in CPU per statement"
echo
echo "pgbench select-only, scale 10, $clients clients, $tx transactions each, -M prepared;"
echo "busy CPU of the whole machine per transaction; policy off and on alternated, $rounds rounds."
echo
echo "| round | off µs/tx | on µs/tx | on / off |"
echo "|---|---|---|---|"
ratios=()
for r in $(seq "$rounds"); do
    policy_off; sleep 0.5; off=$(per_tx)
    policy_on; sleep 0.5; on=$(per_tx)
    ratio=$(awk -v a="$off" -v b="$on" 'BEGIN { printf "%.3f", b / a }')
    ratios+=("$ratio")
    echo "| $r | $off | $on | $ratio |"
done
echo
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "Median on / off: %s (from %s to %s).\n", v[int((NR + 1) / 2)], v[1], v[NR] }'
cluster stop "$dir"
