#!/usr/bin/env bash
# What pg_custody costs, side by side with no auditing and with pgAudit. Measures and prints;
# it is not a test and never gates CI. Quote ratios from one run only: these machines are
# small and noisy.
#
#   scripts/bench.sh [seconds per run (20)] [rounds (3)] [parts (tps,nosync,long,verify,policy,storage)]
#
# tps:     pgbench TPC-B and select-only (-S), -M prepared, scale 10, 4 clients, configurations
#          alternated within each round; median TPS and median ratio to (a) of the same round:
#          (a) no extension; (b) pgAudit, log = 'all', log_relation, log_rows, to a log file;
#          (c) pg_custody durability = async; (d) pg_custody durability = commit (default);
#          (e) (d) plus a 20-rule Rego policy (scripts/bench_policy.rego) on every statement.
# nosync:  TPC-B with the sessions' synchronous_commit = off, (a) to (d): their commits wait for
#          no WAL flush, so the disk is out of it and what remains is CPU and, with
#          durability = commit, the COMMIT's round trip to the writer (docs/scaling.md, design 4).
# long:    (a), (b) and (d) with a 5.5 kB statement per transaction (bytes per record).
# verify:  custody.verify_audit_chain() and `custody verify` over a chain of 1M records, and
#          the export verifier alone on 1M records built in memory.
# policy:  the statement gate and custody.check() latency (crates/custody-policy gate_bench).
# storage: bytes per audit record, table and indexes, for pgbench's statements.
# BEFORE=<git revision> adds (d0): (d) as built from that revision, measured in the same
#          rounds as the others (its library and SQL script are swapped in, with the server
#          stopped, for its runs and the current ones put back afterwards). When both builds
#          have the same SQL script, (d0) runs in the same cluster as (d), on the same log;
#          otherwise in a cluster of its own, whose log is smaller (it holds no (c) or (e)
#          records), which favours (d0) where the writer's cost follows the log's size.
# The extension must be installed (make bench installs a release build first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
secs=${1:-20}; rounds=${2:-3}; parts=${3:-tps,nosync,long,verify,policy,storage}
dir="$root/target/bench-cluster"; port=24340
BIN=/usr/lib/postgresql/15/bin
out="$root/target/bench-report.md"
cluster() { "$here/cluster.sh" "$@"; }
before=${BEFORE:-}
PG_CONFIG=$BIN/../../../../bin/pg_config; [ -x "$PG_CONFIG" ] || PG_CONFIG=$(command -v pg_config)
libdir=$("$PG_CONFIG" --pkglibdir); extdir=$("$PG_CONFIG" --sharedir)/extension
as_pg() { runuser -u postgres -- "$@"; }
q() { cluster psql "$port" -qAt -c "$1"; }
has() { [[ ",$parts," == *",$1,"* ]]; }
now() { date +%s.%N; }

if ! dpkg -s postgresql-15-pgaudit >/dev/null 2>&1; then
    apt-get install -y -qq postgresql-15-pgaudit >/dev/null
fi

# (d0): the extension as built from $BEFORE, installed only while its cluster runs.
bdir="$root/target/bench-before"; bcluster="$root/target/bench-cluster-before"
ext_files=("lib:pg_custody.so" "ext:pg_custody.control" "ext:pg_custody--0.1.0.sql")
use_build() {  # $1 = before | current
    local f kind name src dst
    for f in "${ext_files[@]}"; do
        kind=${f%%:*}; name=${f#*:}
        dst=$([ "$kind" = lib ] && echo "$libdir" || echo "$extdir")
        src=$([ "$1" = before ] && echo "$bdir/pkg$dst" || echo "$bdir/current")
        # A new file renamed over the old one: a process that still maps the old library
        # keeps it (copying into it in place would change the code under its feet).
        cp "$src/$name" "$dst/$name.bench-tmp" && mv "$dst/$name.bench-tmp" "$dst/$name"
    done
}
if [ -n "$before" ]; then
    rev=$(git -C "$root" rev-parse --short "$before")
    if [ ! -f "$bdir/built-$rev" ]; then
        echo "building $before ($rev) for (d0)" >&2
        git -C "$root" worktree remove --force "$bdir/src" 2>/dev/null || true
        rm -rf "$bdir"; mkdir -p "$bdir"; git -C "$root" worktree prune
        git -C "$root" worktree add -q --detach "$bdir/src" "$rev"
        (cd "$bdir/src" && CARGO_TARGET_DIR="$root/target" cargo pgrx package \
            --pg-config "$PG_CONFIG" --out-dir "$bdir/pkg" >&2)
        touch "$bdir/built-$rev"
    fi
    mkdir -p "$bdir/current"
    for f in "${ext_files[@]}"; do
        kind=${f%%:*}; name=${f#*:}
        cp "$([ "$kind" = lib ] && echo "$libdir" || echo "$extdir")/$name" "$bdir/current/"
    done
    trap 'use_build current' EXIT
fi

new_cluster() {  # $1 = data directory: a cluster with pg_custody, a signing key and pgbench's tables
    local d=$1
    cluster stop "$d" immediate; rm -rf "$d" "$d.key"
    cluster start "$d" "$port" "max_connections = 50" "shared_buffers = 512MB"
    pub=$(custody keygen --out "$d.key" --name bench); chown postgres: "$d.key"
    echo "custody.signing_key_file = '$d.key'" >> "$d/postgresql.conf"
    cluster start "$d" "$port"
    q "CREATE EXTENSION pg_custody" >/dev/null
    for _ in $(seq 100); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && break; sleep 0.1; done
    cluster psql "$port" -qAt -v ON_ERROR_STOP=1 \
        -c "SELECT custody.set_policy('bench_rules', \$rego\$$(cat "$here/bench_policy.rego")\$rego\$)" >/dev/null
    as_pg "$BIN/pgbench" -h /tmp -p "$port" -U postgres -i -s 10 -q postgres >/dev/null 2>&1
    cluster stop "$d"
}
same_cluster=0
if [ -n "$before" ]; then
    if cmp -s "$bdir/pkg$extdir/pg_custody--0.1.0.sql" "$bdir/current/pg_custody--0.1.0.sql"; then
        same_cluster=1; bcluster=$dir
    else
        use_build before; new_cluster "$bcluster"; use_build current
    fi
fi
new_cluster "$dir"
cluster start "$dir" "$port"

wait_ready() {
    for _ in $(seq 100); do [ "$(q "SELECT custody.status()->>'state'")" = appending ] && return; sleep 0.1; done
}

running=$dir; build=current
configure() {  # $1 = a|b|c|d|e|d0
    local d=$dir want=current
    if [ "$1" = d0 ]; then d=$bcluster; want=before; fi
    if [ "$d" != "$running" ] || [ "$want" != "$build" ]; then   # switch clusters or builds
        cluster stop "$running"
        use_build "$want"; build=$want
        running=$d
    fi
    local conf="$d/postgresql.auto.conf"
    case "$1" in
    a) echo "shared_preload_libraries = 'plpgsql'" > "$conf.tmp" ;;
    b) printf "%s\n" "shared_preload_libraries = 'pgaudit'" "pgaudit.log = 'all'" \
              "pgaudit.log_relation = on" "pgaudit.log_rows = on" \
              "logging_collector = on" "log_directory = 'pglog'" > "$conf.tmp" ;;
    c) printf "%s\n" "custody.durability = 'async'" "custody.enforce = 'off'" > "$conf.tmp" ;;
    d|d0) printf "%s\n" "custody.durability = 'commit'" "custody.enforce = 'off'" > "$conf.tmp" ;;
    e) printf "%s\n" "custody.durability = 'commit'" "custody.enforce = 'on'" > "$conf.tmp" ;;
    esac
    chown postgres: "$conf.tmp"; mv "$conf.tmp" "$conf"
    as_pg env -u RUST_BACKTRACE "$BIN/pg_ctl" -D "$d" -m fast -w restart -l "$d/server.log" >/dev/null
    case "$1" in c|d|e|d0) wait_ready ;; esac
}

busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }   # user nice system irq softirq
proc_ticks() { if [ -r "/proc/$1/stat" ]; then awk '{ print $14 + $15 }' "/proc/$1/stat"; else echo 0; fi; }
# "TPS CPU-µs-per-transaction writer-µs-per-record": throughput, the busy CPU time of the whole
# machine (steal and idle excluded: what the work costs, less moved by neighbours than TPS),
# and the custody writer's own CPU time over the records it stored meanwhile (- without one).
pgbench_tps() {  # $1 = extra pgbench args, $2 = configuration, $3 = PGOPTIONS for the sessions
    local hz wpid=0 w0 s0=0 b0 out w1 s1=0 b1
    hz=$(getconf CLK_TCK)
    case "$2" in a|b) ;; *) wpid=$(q "SELECT coalesce(custody.status()->>'writer_pid', '0')") ;; esac
    w0=$(proc_ticks "$wpid"); [ "$wpid" = 0 ] || s0=$(q "SELECT custody.status()->>'head_seq'"); b0=$(busy_ticks)
    out=$(as_pg env PGOPTIONS="${3:-}" "$BIN/pgbench" -h /tmp -p "$port" -U postgres -M prepared -c 4 -j 2 -T "$secs" $1 postgres 2>/dev/null)
    b1=$(busy_ticks)
    if [ "$wpid" != 0 ]; then q "SELECT custody.flush()" >/dev/null; s1=$(q "SELECT custody.status()->>'head_seq'"); fi
    w1=$(proc_ticks "$wpid")
    echo "$out" | awk -v hz="$hz" -v b=$((b1 - b0)) -v w=$((w1 - w0)) -v n=$(( ${s1:-0} - ${s0:-0} )) '
        /^tps = / { tps = $3 } /^number of transactions actually processed/ { tx = $NF }
        END { printf "%s %.2f %s\n", tps, b * 1e6 / hz / tx, (n > 0 ? sprintf("%.2f", w * 1e6 / hz / n) : "-") }'
}
# "| median | ratio | median | ratio " of array $1 for configuration $2, select-only then TPC-B:
# the median over the rounds, and the median of the per-round ratios to (a), formatted with $3
# and $4 (the ratio multiplied by $5).
medians() {
    local -n m_values=$1
    local w med ratio out=""
    for w in S B; do
        med=$(for r in $(seq "$rounds"); do echo "${m_values[$2,$w,$r]}"; done | median)
        ratio=$(for r in $(seq "$rounds"); do
                    awk -v x="${m_values[$2,$w,$r]}" -v y="${m_values[a,$w,$r]}" 'BEGIN { printf "%.3f\n", x / y }'
                done | median)
        out+="| $(printf "$3" "$med") | $(awk -v x="$ratio" -v f="$4" -v k="$5" 'BEGIN { printf f, x * k }') "
    done
    echo "$out"
}
# Each configuration in $4, every round: pgbench with the arguments $5 and the sessions'
# PGOPTIONS $6, into the arrays named $1 (TPS), $2 (CPU µs/tx), $3 (writer µs/record) indexed
# [configuration,round]; $7 names the workload in the progress lines.
measure() {
    local -n m_tps=$1 m_cpu=$2 m_wrec=$3
    local r cfg t c w
    for r in $(seq "$rounds"); do
        for cfg in $4; do
            configure "$cfg"
            read -r t c w < <(pgbench_tps "$5" "$cfg" "$6")
            m_tps[$cfg,$r]=$t; m_cpu[$cfg,$r]=$c; m_wrec[$cfg,$r]=$w
            echo "round $r config $cfg: $7 $t tps $c µs/tx writer $w µs/record" >&2
        done
    done
}
# The table of one workload: "| configuration | TPS | ratio | CPU | ratio | writer |" for each
# configuration in $4, from the arrays named $1 (TPS), $2 (CPU µs/tx), $3 (writer µs/record),
# indexed [configuration,round].
one_table() {
    local -n o_tps=$1 o_cpu=$2 o_wrec=$3
    local cfg mt rt mc rc mw
    echo "| configuration | TPS (median) | ratio to (a) (median of rounds) | CPU µs/tx (median) | ratio to (a) | writer µs/record |"
    echo "|---|---|---|---|---|---|"
    for cfg in $4; do
        mt=$(for r in $(seq "$rounds"); do echo "${o_tps[$cfg,$r]}"; done | median)
        rt=$(for r in $(seq "$rounds"); do awk -v x="${o_tps[$cfg,$r]}" -v y="${o_tps[a,$r]}" 'BEGIN { printf "%.3f\n", x / y }'; done | median)
        mc=$(for r in $(seq "$rounds"); do echo "${o_cpu[$cfg,$r]}"; done | median)
        rc=$(for r in $(seq "$rounds"); do awk -v x="${o_cpu[$cfg,$r]}" -v y="${o_cpu[a,$r]}" 'BEGIN { printf "%.3f\n", x / y }'; done | median)
        mw=$(for r in $(seq "$rounds"); do echo "${o_wrec[$cfg,$r]}"; done | { grep -v -- - || true; } | median)
        printf '| %s | %.0f | %.0f %% | %.1f | %.2f | %s |\n' "$(label "$cfg")" "$mt" "$(awk -v x="$rt" 'BEGIN { print 100 * x }')" "$mc" "$rc" "${mw:--}"
    done
    echo
    echo -n "Per round, TPS ratio to (a):"
    for cfg in $4; do
        [ "$cfg" = a ] && continue
        echo -n " ($cfg)"
        for r in $(seq "$rounds"); do awk -v x="${o_tps[$cfg,$r]}" -v y="${o_tps[a,$r]}" 'BEGIN { printf " %.0f %%", 100 * x / y }'; done
        echo -n ";"
    done
    echo
    echo
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
label() { case "$1" in a) echo "(a) no extension";; b) echo "(b) pgAudit log=all";;
                       c) echo "(c) pg_custody async";; d) echo "(d) pg_custody commit";;
                       e) echo "(e) (d) + 20-rule Rego policy";;
                       d0) echo "(d0) (d) as of $before ($rev)$([ "$same_cluster" = 1 ] && echo ", same cluster" || echo ", own cluster")";; esac; }

{
echo "## Run of $(date -u '+%F %H:%M UTC')"
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), PostgreSQL $($BIN/postgres --version | awk '{print $3}'), release build."
echo
} > "$out"

if has tps; then
    declare -A tps cpu wrec
    configs="a b c d e"
    [ -n "$before" ] && configs="a b c d e d0"
    for r in $(seq "$rounds"); do
        for cfg in $configs; do
            configure "$cfg"
            read -r tps[$cfg,S,$r] cpu[$cfg,S,$r] wrec[$cfg,S,$r] < <(pgbench_tps "-S" "$cfg")
            read -r tps[$cfg,B,$r] cpu[$cfg,B,$r] wrec[$cfg,B,$r] < <(pgbench_tps "" "$cfg")
            echo "round $r config $cfg: select-only ${tps[$cfg,S,$r]} tps ${cpu[$cfg,S,$r]} µs/tx writer ${wrec[$cfg,S,$r]} µs/record, tpc-b ${tps[$cfg,B,$r]} tps ${cpu[$cfg,B,$r]} µs/tx writer ${wrec[$cfg,B,$r]} µs/record" >&2
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
        echo "| $(label "$cfg") $(medians tps "$cfg" '%.0f' '%.0f %%' 100)|"
    done
    echo
    echo "CPU: busy CPU time of the whole machine (pgbench included) per transaction, median of the"
    echo "rounds, and its ratio to (a) in the same round (median); writer: the custody writer's own"
    echo "CPU time per record it stored during the runs (median)."
    echo
    echo "| configuration | select-only CPU µs/tx | ratio to (a) | TPC-B CPU µs/tx | ratio to (a) | writer µs/record (select-only / TPC-B) |"
    echo "|---|---|---|---|---|---|"
    for cfg in $configs; do
        line="| $(label "$cfg") $(medians cpu "$cfg" '%.1f' '%.2f' 1)"
        ws=$(for r in $(seq "$rounds"); do echo "${wrec[$cfg,S,$r]}"; done | { grep -v -- - || true; } | median)
        wb=$(for r in $(seq "$rounds"); do echo "${wrec[$cfg,B,$r]}"; done | { grep -v -- - || true; } | median)
        echo "$line| ${ws:--} / ${wb:--} |"
    done
    echo
    echo "Per round, ratio to (a) of the same round (select-only / TPC-B): the spread shows how far"
    echo "one round's baseline moves on this machine."
    echo
    header="| round | (a) TPS |"; rule="|---|---|"
    for cfg in $configs; do [ "$cfg" = a ] && continue; header+=" ($cfg) |"; rule+="---|"; done
    echo "$header"; echo "$rule"
    for r in $(seq "$rounds"); do
        line="| $r | $(printf '%.0f / %.0f' "${tps[a,S,$r]}" "${tps[a,B,$r]}") |"
        for cfg in $configs; do
            [ "$cfg" = a ] && continue
            line+=" $(awk -v s="${tps[$cfg,S,$r]}" -v sa="${tps[a,S,$r]}" -v b="${tps[$cfg,B,$r]}" -v ba="${tps[a,B,$r]}" \
                      'BEGIN { printf "%.0f %% / %.0f %%", 100 * s / sa, 100 * b / ba }') |"
        done
        echo "$line"
    done
    echo
    } >> "$out"
fi

if has nosync; then
    declare -A ntps ncpu nwrec
    nconfigs="a b c d"
    [ -n "$before" ] && nconfigs="a b c d d0"
    measure ntps ncpu nwrec "$nconfigs" "" "-c synchronous_commit=off" "tpc-b, sessions' synchronous_commit = off:"
    {
    echo "### TPC-B without the disk"
    echo
    echo "pgbench TPC-B with the sessions' synchronous_commit = off (their commits wait for no WAL flush; the custody writer's never do), 4 clients, -M prepared, ${secs} s per run, $rounds rounds, configurations alternated in each round. What (d) loses against (c) is the COMMIT's round trip to the writer."
    echo
    one_table ntps ncpu nwrec "$nconfigs"
    } >> "$out"
fi

if has long; then
    # Applications (ORMs above all) send statements of kilobytes: every byte is copied,
    # hashed and stored once per execution. A 5.5 kB SELECT that lists its columns by alias.
    longsql="$root/target/bench-long.sql"
    {
        echo '\set aid random(1, 1000000)'
        printf 'SELECT a.aid'
        for i in $(seq 60); do
            printf ', a.aid AS "account_%s_id", a.bid AS "account_%s_branch", a.abalance AS "account_%s_balance"' "$i" "$i" "$i"
        done
        echo ' FROM pgbench_accounts a WHERE a.aid = :aid;'
    } > "$longsql"
    chown postgres: "$longsql"
    len=$(tail -1 "$longsql" | wc -c)
    declare -A ltps lcpu lwrec
    lconfigs="a b d"
    [ -n "$before" ] && lconfigs="a b d d0"
    measure ltps lcpu lwrec "$lconfigs" "-f $longsql" "" "long statements"
    {
    echo "### Long statements"
    echo
    echo "pgbench with one $len-byte SELECT per transaction (a primary-key read listing 181 columns by alias), 4 clients, -M prepared, ${secs} s per run, $rounds rounds, configurations alternated in each round."
    echo
    one_table ltps lcpu lwrec "$lconfigs"
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
    # Again, with the log's pages now in shared buffers (the first call after a start also
    # pays for the server touching those buffers for the first time).
    t0=$(now); res2=$(q "SELECT ok || ' ' || checked FROM custody.verify_audit_chain(1, $n)"); t1=$(now)
    sql_rate2=$(awk -v n="${res2#* }" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
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
    echo "| custody.verify_audit_chain(), again (pages in shared buffers) | ${res2#* } | ok = ${res2%% *} | $sql_rate2 |"
    echo "| custody verify (command line, with signatures) | $lines | $cli | $cli_rate |"
    echo
    echo "The export verifier alone, in memory (crates/custody-chain/examples/verify_bench.rs):"
    echo
    echo '```'
    "$root/target/release/examples/verify_bench" 1000000
    echo '```'
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

cluster stop "$running"

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
