#!/usr/bin/env bash
# A short tour of pg_custody in the throwaway cluster started by `make demo`.
set -euo pipefail
port=${1:?port}; dir=$(realpath "${2:?cluster dir}")
here=$(cd "$(dirname "$0")" && pwd)
psql_bin="${PGBIN:-/usr/lib/postgresql/15/bin}/psql"
psql() { "$here/cluster.sh" psql "$port" -v ON_ERROR_STOP=1 "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
unloaded() { psql -qc "ALTER SYSTEM SET shared_preload_libraries = 'plpgsql'"; "$here/cluster.sh" start "$dir" "$port"; }
loaded() { psql -qc "ALTER SYSTEM RESET shared_preload_libraries"; "$here/cluster.sh" start "$dir" "$port"; }

say "A signing key for checkpoints (the database never sees the private key)"
key="$dir.key"
rm -f "$key"
pub=$(custody keygen --out "$key" --name demo)
chown postgres: "$key"
echo "public key: $pub"
printf "%s\n" "custody.signing_key_file = '$key'" "custody.checkpoint_interval = 1" >> "$dir/postgresql.conf"
psql -qAtc "SELECT pg_reload_conf()" >/dev/null

say "CREATE EXTENSION pg_custody (in custody.database = postgres)"
psql -qc "CREATE EXTENSION IF NOT EXISTS pg_custody"
psql -qAt -c "DO \$\$ BEGIN FOR i IN 1..200 LOOP EXIT WHEN custody.status()->>'state' = 'appending'; PERFORM pg_sleep(0.05); END LOOP; END \$\$" \
     -c "SELECT 'writer: ' || (custody.status()->>'state') || '; signing key: ' || (custody.status()->>'signing_key')"

say "Some activity: a table, writes, reads, a failure, a permission denial, a rollback"
psql -q <<'SQL'
CREATE TABLE IF NOT EXISTS demo_accounts (id int PRIMARY KEY, owner text, balance numeric);
INSERT INTO demo_accounts VALUES (1, 'alice', 100), (2, 'bob', 50) ON CONFLICT DO NOTHING;
UPDATE demo_accounts SET balance = balance - 10 WHERE owner = 'alice';
SELECT owner, balance FROM demo_accounts ORDER BY id;
BEGIN;
SELECT balance FROM demo_accounts WHERE owner = 'bob';   -- recorded although rolled back
ROLLBACK;
DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'demo_intern') THEN CREATE ROLE demo_intern; END IF; END $$;
SET ROLE demo_intern;
\set ON_ERROR_STOP 0
SELECT * FROM demo_accounts;                              -- permission denied, still recorded
RESET ROLE;
SELECT 1/0;                                               -- fails, still recorded
\set ON_ERROR_STOP 1
SQL

say "Their records in custody.audit_log (the newest 12)"
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -c "SELECT seq, class, command, current_user_name AS role, rows, outcome, sqlstate, left(statement, 50) AS statement
         FROM custody.audit_log ORDER BY seq DESC LIMIT 12"

say "The chain verifies"
psql -c "SELECT * FROM custody.verify_audit_chain()"

say "Nobody may change the log, superusers included (and the attempt is recorded)"
psql -c "DELETE FROM custody.audit_log WHERE seq = 1" || true
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -c "SELECT seq, command, outcome, sqlstate, message FROM custody.audit_log WHERE sqlstate = '42501' ORDER BY seq DESC LIMIT 1"

say "Continuous authorization: a Rego policy, checked on every statement"
psql -q <<'SQL'
DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'demo_contractor') THEN CREATE ROLE demo_contractor LOGIN; END IF; END $$;
GRANT SELECT ON demo_accounts TO demo_contractor;
SELECT custody.set_policy('demo_rules', $rego$
package custody

# contractors read only while their engagement attribute is valid
deny contains msg if {
    input.subject.current_user == "demo_contractor"
    not input.subject.attributes.engagement
    msg := "demo_contractor has no valid engagement"
}

# nobody reads balances outside the finance roles
deny contains "balance is for finance only" if {
    some o in input.objects
    o.name == "demo_accounts"
    "balance" in o.columns
    not "finance" in input.subject.roles
}
$rego$);
SELECT custody.set_attribute('demo_contractor', 'engagement', '"ACME-42"',
                             valid_until => now() + interval '1 hour');
SQL
psql -c "SELECT name, kind, version, left(sha256, 16) AS sha256, enabled FROM custody.policies"

say "demo_contractor opens ONE session; an admin suspends the role while it is open"
cat > "$dir.session.sql" <<SQL
\echo '-- in the open session: allowed'
SELECT owner FROM demo_accounts ORDER BY id;
\echo '-- in the open session: denied by policy (balance column)'
SELECT owner, balance FROM demo_accounts ORDER BY id;
\echo '-- meanwhile, another session: SELECT custody.suspend(''demo_contractor'', ''offboarding'')'
\! $psql_bin -X -q -h /tmp -p $port -U postgres -d postgres -c "SELECT custody.suspend('demo_contractor', 'offboarding')" >/dev/null
\echo '-- the same open session, next statement: denied'
SELECT owner FROM demo_accounts ORDER BY id;
\! $psql_bin -X -q -h /tmp -p $port -U postgres -d postgres -c "SELECT custody.resume('demo_contractor')" >/dev/null
\echo '-- after custody.resume(), same session: allowed again'
SELECT owner FROM demo_accounts ORDER BY id;
SQL
chmod 644 "$dir.session.sql"
"$here/cluster.sh" psql "$port" -U demo_contractor -d postgres -f "$dir.session.sql" 2>&1 || true

say "Open work is checked again; a pooler's SET is not denied; administrators cannot be locked out"
cat > "$dir.open.sql" <<SQL
BEGIN;
DECLARE c CURSOR FOR SELECT owner FROM demo_accounts ORDER BY id;
\echo '-- FETCH 1 from a cursor opened before the suspension: allowed'
FETCH 1 FROM c;
\! $psql_bin -X -q -h /tmp -p $port -U postgres -d postgres -c "SELECT custody.suspend('demo_contractor', 'offboarding')" >/dev/null
\echo '-- after custody.suspend(), the next FETCH from the same cursor: denied'
FETCH 1 FROM c;
ROLLBACK;
\echo '-- what a pooler sends on a shared connection (SET application_name, DISCARD ALL): recorded, not denied'
SET application_name = 'pooled';
DISCARD ALL;
\! $psql_bin -X -q -h /tmp -p $port -U postgres -d postgres -c "SELECT custody.resume('demo_contractor')" >/dev/null
SQL
chmod 644 "$dir.open.sql"
"$here/cluster.sh" psql "$port" -U demo_contractor -d postgres -f "$dir.open.sql" 2>&1 || true
echo "-- a policy that denies everything; the superuser's fix is never denied (break-glass)"
psql -q -c "SELECT custody.set_policy('demo_broken', 'package custody

deny contains \"everything\" if true')" >/dev/null
psql -c "SELECT count(*) FROM demo_accounts" 2>&1 || true
psql -c "SELECT custody.drop_policy('demo_broken')"
psql -c "SELECT count(*) FROM demo_accounts"
echo "-- a set that cannot be evaluated together is refused before it is in force"
psql -q -c "SELECT custody.set_policy('demo_allow_a', 'package custody

allow := true')" >/dev/null
psql -c "SELECT custody.set_policy('demo_allow_b', 'package custody

allow := false')" 2>&1 || true
psql -q -c "SELECT custody.drop_policy('demo_allow_a')" >/dev/null

say "A row policy written as SQL: custody.check() asks Rego about each row"
psql -q >/dev/null <<'SQL'
CREATE TABLE IF NOT EXISTS demo_orders (id int PRIMARY KEY, tenant int, item text);
INSERT INTO demo_orders SELECT i, i % 3 + 6, 'item ' || i FROM generate_series(1, 9) i ON CONFLICT DO NOTHING;
GRANT SELECT ON demo_orders TO demo_contractor;
SELECT custody.set_attribute('demo_contractor', 'tenant', '7');
SELECT custody.set_policy('demo_rows', $rego$
package custody

row_allow if input.resource.tenant == input.subject.attributes.tenant
$rego$);
SELECT custody.drop_row_policy('demo_by_tenant') FROM custody.row_policies WHERE name = 'demo_by_tenant';
SELECT custody.create_row_policy('demo_by_tenant', 'demo_orders', 'select',
       using_expr => $$ custody.check('read', jsonb_build_object('tenant', tenant)) $$);
SQL
echo "-- as demo_contractor (attribute tenant = 7): only tenant 7's rows"
"$here/cluster.sh" psql "$port" -U demo_contractor -d postgres -c "SELECT id, tenant, item FROM demo_orders ORDER BY id"
echo "-- the planner passes the resource's fields, not a jsonb built per row"
"$here/cluster.sh" psql "$port" -U demo_contractor -d postgres -c "EXPLAIN (COSTS OFF) SELECT id FROM demo_orders"
psql -q -c "SELECT custody.drop_row_policy('demo_by_tenant')" -c "SELECT custody.drop_policy('demo_rows')" >/dev/null

say "Every decision is in the chain"
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -c "SELECT seq, current_user_name AS role, class, command, outcome,
                coalesce(decision->>'reasons', objects->0->>'name') AS reasons_or_object
         FROM custody.audit_log
         WHERE class = 'policy' OR outcome = 'denied'
         ORDER BY seq DESC LIMIT 8"
psql -q -c "SELECT custody.drop_policy('demo_rules')"

say "Tampering with the library unloaded is detected: restart without pg_custody, edit one record"
victim=$(psql -qAt -c "SELECT max(seq) - 3 FROM custody.audit_log")
unloaded
psql -qc "CREATE TABLE demo_saved AS SELECT seq, statement FROM custody.audit_log WHERE seq = $victim"
psql -qc "UPDATE custody.audit_log SET statement = 'SELECT ''nothing to see here''' WHERE seq = $victim"
echo "edited record seq $victim as a superuser, with the library unloaded"
loaded
psql -c "SELECT * FROM custody.verify_audit_chain()"

say "(putting the record back, again with the library unloaded, so the tour can go on)"
unloaded
psql -qc "UPDATE custody.audit_log l SET statement = s.statement FROM demo_saved s WHERE l.seq = s.seq; DROP TABLE demo_saved"
loaded
psql -c "SELECT * FROM custody.verify_audit_chain()"

say "Invisible to applications: an error reaches the client exactly as PostgreSQL raised it"
cat > "$dir.errors.sql" <<'SQL'
CREATE OR REPLACE FUNCTION demo_withdraw(amount int) RETURNS int LANGUAGE plpgsql AS $f$
BEGIN
    IF amount > 100 THEN
        RAISE EXCEPTION 'limit exceeded: %', amount USING ERRCODE = 'P0100', HINT = 'ask a teller';
    END IF;
    RETURN amount;
END $f$;
-- a PL/pgSQL handler catches the application's own SQLSTATE
DO $$ BEGIN PERFORM demo_withdraw(500); EXCEPTION WHEN SQLSTATE 'P0100' THEN RAISE NOTICE 'caught P0100'; END $$;
\set VERBOSITY verbose
\set ON_ERROR_STOP 0
-- SQLSTATE, hint, context; then a position in a utility statement
SELECT demo_withdraw(500);
CREATE TABLE demo_bad (a no_such_type);
SQL
chmod 644 "$dir.errors.sql"
"$here/cluster.sh" psql "$port" -q -f "$dir.errors.sql" 2>&1 || true
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -c "SELECT seq, outcome, sqlstate, message, statement FROM custody.audit_log
         WHERE statement IN ('SELECT demo_withdraw(500)', 'CREATE TABLE demo_bad (a no_such_type)') ORDER BY seq"

say "Signed checkpoints, and a digest to keep outside the database"
for _ in $(seq 50); do   # wait for the next checkpoint (custody.checkpoint_interval = 1s here)
    [ "$(psql -qAt -c "SELECT (custody.status()->>'last_checkpoint_seq')::int8 > 0")" = t ] && break
    sleep 0.2
done
psql -c "SELECT seq, key_id, signed_at, note FROM custody.checkpoints ORDER BY seq DESC LIMIT 1"
psql -qAt -c "SELECT custody.audit_digest()" > "$dir.digest.json"
echo "digest: $(cat "$dir.digest.json")"
psql -c "SELECT * FROM custody.verify_audit_chain(trusted_digests => jsonb_build_array(custody.audit_digest()), public_key => '$pub')"

say "An auditor verifies an export offline, with only the public key and the digest"
psql -q -c "COPY (SELECT * FROM custody.export_audit()) TO STDOUT" > "$dir.export.jsonl"
echo "exported $(wc -l < "$dir.export.jsonl") lines to $dir.export.jsonl"
echo "\$ custody verify --log $dir.export.jsonl --public-key '$pub' --digest $dir.digest.json"
custody verify --log "$dir.export.jsonl" --public-key "$pub" --digest "$dir.digest.json"

say "An insider's attack, refused: a custody_admin member tries to run her code inside pg_custody"
psql -q <<'SQL'
DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'demo_alice') THEN CREATE ROLE demo_alice LOGIN; END IF; END $$;
GRANT custody_admin TO demo_alice;
CREATE SCHEMA IF NOT EXISTS demo_alice AUTHORIZATION demo_alice;
SQL
cat > "$dir.alice.sql" <<'SQL'
-- her now() makes her a superuser if it ever runs with pg_custody's rights
CREATE OR REPLACE FUNCTION demo_alice.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE 'ALTER ROLE demo_alice SUPERUSER';
    RETURN pg_catalog.now();
EXCEPTION WHEN OTHERS THEN RETURN pg_catalog.now();
END $f$;
SET search_path = demo_alice, pg_catalog;
SELECT custody.set_attribute('demo_alice', 'team', '"audit"');
\echo '-- and she tries to delete her trail, and to hide it by renaming the schema'
\set ON_ERROR_STOP 0
DELETE FROM custody.audit_log;
ALTER SCHEMA custody RENAME TO hidden;
SQL
chmod 644 "$dir.alice.sql"
"$here/cluster.sh" psql "$port" -U demo_alice -d postgres -f "$dir.alice.sql" 2>&1 || true
psql -c "SELECT rolname, rolsuper FROM pg_roles WHERE rolname = 'demo_alice'"
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -c "SELECT seq, current_user_name AS role, command, outcome, sqlstate, left(statement, 45) AS statement
         FROM custody.audit_log WHERE session_user_name = 'demo_alice' ORDER BY seq DESC LIMIT 4"

say "Backup and restore: the chain goes on in another cluster, with a recorded hand-over"
bin=${PGBIN:-/usr/lib/postgresql/15/bin}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
rdir="$dir.restored"; rport=$((port - 1))
"$here/cluster.sh" stop "$rdir" immediate; rm -rf "$rdir" "$dir.dump"
"$here/cluster.sh" start "$rdir" "$rport"       # another cluster: another system identifier
psql -c "SELECT custody.flush()" -qAt >/dev/null
as_pg "$bin/pg_dumpall" -h /tmp -p "$port" -U postgres --globals-only \
    | "$here/cluster.sh" psql "$rport" -q -o /dev/null postgres 2>/dev/null || true   # roles (postgres exists)
as_pg "$bin/pg_dump" -h /tmp -p "$port" -U postgres -Fc postgres > "$dir.dump"
echo "\$ pg_restore --single-transaction -d postgres  (into the other cluster; one transaction: docs/operations.md)"
as_pg "$bin/pg_restore" -h /tmp -p "$rport" -U postgres -d postgres --single-transaction < "$dir.dump"
for _ in $(seq 50); do
    [ "$("$here/cluster.sh" psql "$rport" -qAt -c "SELECT custody.status()->>'state'")" = appending ] && break
    sleep 0.2
done
"$here/cluster.sh" psql "$rport" -c "SELECT custody.flush()" -qAt >/dev/null
"$here/cluster.sh" psql "$rport" -c "SELECT seq, command, objects->0->>'from_head_seq' AS after_seq, left(message, 60) AS message
     FROM custody.audit_log WHERE command = 'CHAIN HANDOVER'"
"$here/cluster.sh" psql "$rport" -c "SELECT * FROM custody.verify_audit_chain()"
echo "\$ custody verify --dsn 'host=/tmp port=$rport user=postgres dbname=postgres' --public-key '$pub'"
custody verify --dsn "host=/tmp port=$rport user=postgres dbname=postgres" --public-key "$pub"
"$here/cluster.sh" stop "$rdir"; rm -f "$dir.dump"

say "A hot standby: gated like the primary, its statements recorded in the primary's chain"
sdir="$dir.standby"; sport=$((port - 2))
"$here/cluster.sh" stop "$sdir" immediate; rm -rf "$sdir"; mkdir -p "$sdir"; chmod 700 "$sdir"
[ "$(id -u)" = 0 ] && chown postgres: "$sdir"
as_pg "$bin/pg_basebackup" -h /tmp -p "$port" -U postgres -D "$sdir" -R -X stream
echo "port = $sport" >> "$sdir/postgresql.auto.conf"
"$here/cluster.sh" start "$sdir" "$sport"
"$here/cluster.sh" psql "$sport" -qAt -c "SELECT 'on the standby: ' || (custody.status()->>'state')"
"$here/cluster.sh" psql "$sport" -U demo_contractor -d postgres -qAt -c "SELECT 'demo_contractor reads ' || count(*) || ' rows on the standby' FROM demo_accounts /* on the standby */" \
    -c "SELECT custody.flush()" >/dev/null
echo "-- in the primary's chain: each batch after its marker; a standby's records carry its pid negated"
psql -c "SELECT * FROM (SELECT seq, command, session_user_name AS role, backend_pid, left(statement, 50) AS statement
     FROM custody.audit_log WHERE command = 'STANDBY RECORDS' OR backend_pid < 0 ORDER BY seq DESC LIMIT 4) r ORDER BY seq"
psql -qAt -c "SELECT custody.suspend('demo_contractor', 'suspended on the primary')" >/dev/null
for _ in $(seq 50); do   # replayed on the standby, published there by its standby worker
    "$here/cluster.sh" psql "$sport" -U demo_contractor -d postgres -qAt -c "SELECT 1" >/dev/null 2>&1 || break
    sleep 0.2
done
echo "-- suspended on the primary; on the standby:"
"$here/cluster.sh" psql "$sport" -U demo_contractor -d postgres -c "SELECT count(*) FROM demo_accounts" 2>&1 | head -2 || true
psql -qAt -c "SELECT custody.resume('demo_contractor')" >/dev/null
"$here/cluster.sh" stop "$sdir"

say "A restart costs what was stored since, not the whole log"
psql -qc "DO \$\$ BEGIN FOR i IN 1..20000 LOOP PERFORM count(*) FROM demo_accounts; END LOOP; END \$\$"
psql -c "SELECT custody.flush()" -qAt >/dev/null
psql -qAt -c "SELECT 'custody.audit_log holds ' || count(*) || ' records (20,000 of them from one DO block)' FROM custody.audit_log"
echo "\$ restart the server"
"$here/cluster.sh" start "$dir" "$port"
for _ in $(seq 50); do
    [ "$(psql -qAt -c "SELECT custody.status()->>'state'")" = appending ] && break
    sleep 0.2
done
psql -c "SELECT s->>'head_seq' AS head_seq, s->>'writer_start_records_read' AS records_read_to_resume,
                round((s->>'writer_start_seconds')::numeric, 3) AS start_seconds
         FROM custody.status() s"
psql -qAt -c "SELECT count(*) FROM demo_accounts WHERE owner <> '$(printf 'not anyone %.0s' $(seq 400))'" >/dev/null
psql -c "SELECT custody.flush()" -qAt >/dev/null
echo "-- a long statement's text, compressed with lz4 in the log:"
psql -c "SELECT seq, octet_length(statement) AS statement_bytes, pg_column_size(statement) AS stored_bytes,
                pg_column_compression(statement) AS compression
         FROM custody.audit_log WHERE statement LIKE 'SELECT count(*) FROM demo_accounts WHERE owner <>%' ORDER BY seq DESC LIMIT 1"

say "An attack with the library unloaded, detected: the newest records are cut off"
psql -c "SELECT custody.flush()" -qAt >/dev/null
head=$(psql -qAt -c "SELECT max(seq) FROM custody.audit_log")
unloaded
psql -qc "DELETE FROM custody.audit_log WHERE seq > $head - 5"
psql -qc "DELETE FROM custody.checkpoints WHERE seq > $head - 5"
echo "deleted every record after seq $((head - 5)), and their checkpoints, as a superuser with the library unloaded"
loaded
for _ in $(seq 50); do   # the writer compares the table with the head it remembers
    [ "$(psql -qAt -c "SELECT custody.status()->>'alarm' IS NOT NULL")" = t ] && break
    sleep 0.2
done
psql -c "SELECT custody.status()->>'alarm' AS alarm"
psql -c "SELECT seq, command, outcome, objects->0->>'from' AS missing_from, objects->0->>'to' AS missing_to
         FROM custody.audit_log WHERE command = 'HEAD MISMATCH'"
psql -c "SELECT * FROM custody.verify_audit_chain()"

say "Done. The cluster is still running:"
echo "  psql -h /tmp -p $port -U postgres postgres"
echo "  (stop it with: make stop; remove it with: make clean; every make demo starts a fresh cluster)"
