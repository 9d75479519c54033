#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for the demo and the tests, run as the postgres user
# (PostgreSQL refuses to run as root). PGBIN names the server's bin directory
# (scripts/pgserver.sh bindir MAJOR); Debian's PostgreSQL 15 by default.
#   scripts/cluster.sh start DIR PORT [setting=value ...]   create if needed, (re)start
#   scripts/cluster.sh stop DIR [mode]                      stop (mode: fast | immediate)
#   scripts/cluster.sh psql PORT [psql args...]             psql as postgres
set -euo pipefail
BIN=${PGBIN:-/usr/lib/postgresql/15/bin}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cmd=${1:?usage: cluster.sh start|stop|psql ...}; shift
case "$cmd" in
start)
    dir=$(realpath -m "${1:?DIR}"); port=${2:?PORT}; shift 2
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres: "$dir"
        chmod 700 "$dir"
        # INITDB_OPTS: more initdb options (--data-checksums for a pg_upgrade into 18, say).
        # shellcheck disable=SC2086
        as_pg "$BIN/initdb" -D "$dir" --auth=trust --encoding=UTF8 --locale=C.UTF-8 ${INITDB_OPTS:-} >/dev/null
        {
            echo "# written by scripts/cluster.sh"
            echo "port = $port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '/tmp'"
            echo "shared_preload_libraries = 'pg_custody'"
            echo "logging_collector = off"
            echo "log_min_messages = warning"
        } >> "$dir/postgresql.conf"
    fi
    for kv in "$@"; do echo "$kv" >> "$dir/postgresql.conf"; done
    if as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    fi
    # RUST_BACKTRACE would append backtraces to error DETAIL lines (shared/CONTEXT.md). A
    # server tree's contrib modules (postgres_fdw, dblink) need its own libpq, not Debian's.
    # A port another socket still holds (a connection closing, a server stopping) is retried
    # for a while; what holds it for longer is named.
    for try in 1 2 3 4 5 6 7 8 9 10; do
        lines=0; [ -f "$dir/server.log" ] && lines=$(wc -l < "$dir/server.log")
        if as_pg env -u RUST_BACKTRACE LD_LIBRARY_PATH="$(dirname "$BIN")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null; then
            exit 0
        fi
        tail -n +"$((lines + 1))" "$dir/server.log" | grep -q "Address already in use" || exit 1
        echo "cluster.sh: port $port is in use (try $try):" >&2
        ss -Htanp "( sport = :$port )" >&2 || true
        sleep 2
    done
    exit 1
    ;;
stop)
    dir=$(realpath -m "${1:?DIR}"); mode=${2:-fast}
    if [ -f "$dir/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$dir" -m "$mode" -w stop >/dev/null
    fi
    ;;
psql)
    port=${1:?PORT}; shift
    as_pg "$BIN/psql" -X -h /tmp -p "$port" -U postgres "$@"
    ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
