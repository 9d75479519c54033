-- pg_custody bootstrap: runs first in CREATE EXTENSION (hand-written; see src/lib.rs).
-- CREATE EXTENSION runs this with search_path = custody (and the implicit pg_catalog);
-- every name below is qualified anyway.

-- Roles are cluster-wide: created once, by whichever database installs pg_custody first.
DO $roles$
BEGIN
    IF current_setting('custody.database', true) IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = 'pg_custody must be loaded via shared_preload_libraries',
            HINT = 'Add pg_custody to shared_preload_libraries in postgresql.conf and restart the server.';
    END IF;
    -- The schema holds the evidence: whoever owns it could drop or replace what is in it, and
    -- objects already in it could shadow pg_custody's functions. CREATE EXTENSION makes it
    -- when it does not exist; one made beforehand must be a superuser's, and empty.
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
               WHERE n.nspname OPERATOR(pg_catalog.=) 'custody' AND NOT r.rolsuper) THEN
        RAISE EXCEPTION USING
            ERRCODE = '42501',
            MESSAGE = 'schema custody is owned by a role that is not a superuser',
            HINT = 'Drop the schema, or make a superuser its owner, before CREATE EXTENSION pg_custody.';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) 'custody'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) 'custody'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) 'custody'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_operator WHERE oprnamespace OPERATOR(pg_catalog.=) 'custody'::pg_catalog.regnamespace) THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = 'schema custody already holds objects',
            HINT = 'pg_custody needs the schema custody to itself: move or drop what is in it first.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'custody_auditor') THEN
        CREATE ROLE custody_auditor NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'custody_admin') THEN
        CREATE ROLE custody_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'custody_standby') THEN
        CREATE ROLE custody_standby NOLOGIN;
    END IF;
END
$roles$;

COMMENT ON ROLE custody_auditor IS
    'pg_custody: may read custody.audit_log and run the verification functions';
COMMENT ON ROLE custody_admin IS
    'pg_custody: may manage policies, attributes, suspensions and row policies';
COMMENT ON ROLE custody_standby IS
    'pg_custody: may ship a hot standby''s audit records to this server (grant it to the role of primary_conninfo)';

-- Everyone may use the schema: custody.check(), custody.attribute() and
-- custody.current_subject() appear in row policies that apply to every role. The tables
-- are not readable by PUBLIC, and the verification functions are revoked from it.
GRANT USAGE ON SCHEMA custody TO PUBLIC;

-- Row policies live with their table, in every database where pg_custody is created.
CREATE TABLE custody.row_policies (
    name        text        NOT NULL PRIMARY KEY,
    table_name  text        NOT NULL,
    command     text        NOT NULL,
    using_expr  text,
    check_expr  text,
    version     integer     NOT NULL,
    sha256      bytea       NOT NULL,
    updated_at  timestamptz NOT NULL,
    updated_by  text        NOT NULL
);
COMMENT ON TABLE custody.row_policies IS
    'pg_custody: row policies created with custody.create_row_policy() in this database (versioned; each change is in the audit chain)';
REVOKE ALL ON custody.row_policies FROM PUBLIC;
GRANT SELECT ON custody.row_policies TO custody_auditor, custody_admin;
SELECT pg_catalog.pg_extension_config_dump('custody.row_policies', '');

-- The audit chain and the policy store live in exactly one database of the cluster, the one
-- named by custody.database; elsewhere pg_custody provides the row-policy functions only.
DO $chain$
BEGIN
IF current_database() OPERATOR(pg_catalog.=) current_setting('custody.database') THEN
EXECUTE $ddl$
CREATE TABLE custody.audit_log (
    seq               bigint      NOT NULL PRIMARY KEY,
    event_time        timestamptz NOT NULL,
    logged_at         timestamptz NOT NULL,
    database_name     text        NOT NULL,
    session_user_name text        NOT NULL,
    current_user_name text        NOT NULL,
    client_addr       inet,
    application_name  text,
    backend_pid       integer     NOT NULL,
    nesting_level     integer     NOT NULL,
    xid               bigint,
    class             text        NOT NULL,
    command           text        NOT NULL,
    objects           jsonb       NOT NULL,
    statement         text,
    statement_sha256  bytea,
    rows              bigint,
    outcome           text        NOT NULL,
    sqlstate          text,
    message           text,
    decision          jsonb,
    prev_hash         bytea       NOT NULL,
    hash              bytea       NOT NULL
);

-- Every index is paid for by every statement of every user, so the log has two: the
-- primary key (appends go to its rightmost page) and a BRIN index on event_time, which
-- follows seq and costs almost nothing to keep. Sites that query the log in place can add
-- more (docs/audit-trail.md lists them with their measured cost).
CREATE INDEX audit_log_event_time_idx ON custody.audit_log USING brin (event_time);

COMMENT ON TABLE custody.audit_log IS
    'pg_custody: append-only, SHA-256 hash-chained record of every statement in the cluster; verify with custody.verify_audit_chain()';
COMMENT ON COLUMN custody.audit_log.seq IS 'Position in the chain: 1, 2, 3, ... with no gaps';
COMMENT ON COLUMN custody.audit_log.event_time IS 'When the statement started';
COMMENT ON COLUMN custody.audit_log.logged_at IS 'When the record was appended by the custody writer';
COMMENT ON COLUMN custody.audit_log.database_name IS 'Database the statement ran in';
COMMENT ON COLUMN custody.audit_log.session_user_name IS 'Session user (who logged in)';
COMMENT ON COLUMN custody.audit_log.current_user_name IS 'Effective role when the statement ran';
COMMENT ON COLUMN custody.audit_log.client_addr IS 'Client IP address; NULL for Unix-socket connections and background processes';
COMMENT ON COLUMN custody.audit_log.application_name IS 'application_name of the session';
COMMENT ON COLUMN custody.audit_log.backend_pid IS 'Process id of the session';
COMMENT ON COLUMN custody.audit_log.nesting_level IS '0 for a statement sent by the client; 1 and more for statements run inside functions, DO blocks and triggers';
COMMENT ON COLUMN custody.audit_log.xid IS 'Top-level transaction id (full, with epoch); NULL if none was assigned';
COMMENT ON COLUMN custody.audit_log.class IS 'read, write, function, role, ddl, misc, misc_set, policy or system';
COMMENT ON COLUMN custody.audit_log.command IS 'Command tag: SELECT, INSERT, CREATE TABLE, ...';
COMMENT ON COLUMN custody.audit_log.objects IS 'Array of {schema, name, kind, privileges, columns} the statement touched';
COMMENT ON COLUMN custody.audit_log.statement IS 'Statement text (custody.audit_statement = full), truncated at custody.max_statement_length';
COMMENT ON COLUMN custody.audit_log.statement_sha256 IS 'SHA-256 of the full statement text when it was truncated; NULL otherwise';
COMMENT ON COLUMN custody.audit_log.rows IS 'Rows processed; NULL where not applicable';
COMMENT ON COLUMN custody.audit_log.outcome IS 'success, error or denied';
COMMENT ON COLUMN custody.audit_log.sqlstate IS 'SQLSTATE of a failed statement';
COMMENT ON COLUMN custody.audit_log.message IS 'Error message of a failed statement';
COMMENT ON COLUMN custody.audit_log.decision IS 'Authorization decision {allowed, reasons, policies, policy_set, enforce} (docs/policies.md); NULL when no policy or suspension was in force';
COMMENT ON COLUMN custody.audit_log.prev_hash IS 'hash of the previous record; for seq 1 the genesis hash of this cluster and database';
COMMENT ON COLUMN custody.audit_log.hash IS 'SHA-256 over prev_hash and the canonical encoding of this record (docs/chain-format.md)';

REVOKE ALL ON custody.audit_log FROM PUBLIC;
GRANT SELECT ON custody.audit_log TO custody_auditor;

-- Signed checkpoints: the writer signs the chain head and its Merkle root every
-- custody.checkpoint_interval with the key in custody.signing_key_file.
CREATE TABLE custody.checkpoints (
    seq          bigint      NOT NULL PRIMARY KEY,
    hash         bytea       NOT NULL,
    merkle_root  bytea       NOT NULL,
    key_id       text        NOT NULL,
    signature    text        NOT NULL,
    signed_at    timestamptz NOT NULL,
    note         text        NOT NULL
);
COMMENT ON TABLE custody.checkpoints IS
    'pg_custody: append-only signed checkpoints of custody.audit_log (C2SP tlog-checkpoint signed notes)';
COMMENT ON COLUMN custody.checkpoints.seq IS 'The checkpoint covers records 1..seq (the tree size)';
COMMENT ON COLUMN custody.checkpoints.hash IS 'Chain hash of record seq';
COMMENT ON COLUMN custody.checkpoints.merkle_root IS 'RFC 6962 Merkle tree root over the hashes of records 1..seq';
COMMENT ON COLUMN custody.checkpoints.key_id IS 'Key hash (hex) of the signing key: see custody.public_keys';
COMMENT ON COLUMN custody.checkpoints.signature IS 'Ed25519 signature (base64) of the checkpoint body';
COMMENT ON COLUMN custody.checkpoints.signed_at IS 'When the writer signed it';
COMMENT ON COLUMN custody.checkpoints.note IS 'The checkpoint as a C2SP signed note: origin, tree size, root hash, signature line';

CREATE TABLE custody.public_keys (
    key_id      text        NOT NULL PRIMARY KEY,
    public_key  text        NOT NULL,
    first_used  timestamptz NOT NULL,
    last_used   timestamptz NOT NULL
);
COMMENT ON TABLE custody.public_keys IS
    'pg_custody: the public keys checkpoints were signed with, so that rotated keys still verify';
COMMENT ON COLUMN custody.public_keys.key_id IS 'Key hash (hex), as named by custody.checkpoints.key_id';
COMMENT ON COLUMN custody.public_keys.public_key IS 'Verifier key, C2SP signed-note form name+keyhash+base64';
COMMENT ON COLUMN custody.public_keys.first_used IS 'First checkpoint signed with it';
COMMENT ON COLUMN custody.public_keys.last_used IS 'Latest checkpoint signed with it';

REVOKE ALL ON custody.checkpoints, custody.public_keys FROM PUBLIC;
GRANT SELECT ON custody.checkpoints, custody.public_keys TO custody_auditor;

-- pg_dump keeps the records (restoring them needs the library unloaded: the log is append-only).
SELECT pg_catalog.pg_extension_config_dump('custody.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('custody.checkpoints', '');
SELECT pg_catalog.pg_extension_config_dump('custody.public_keys', '');

-- The policy store: Rego policies, attributes, suspensions. Changed only through the
-- custody.* management functions, which record every change and publish it at commit.
CREATE TABLE custody.policy_store (
    name        text        NOT NULL PRIMARY KEY,
    source      text        NOT NULL,
    version     integer     NOT NULL,
    sha256      bytea       NOT NULL,
    enabled     boolean     NOT NULL,
    updated_at  timestamptz NOT NULL,
    updated_by  text        NOT NULL
);
COMMENT ON TABLE custody.policy_store IS 'pg_custody: Rego policies (package custody); see the view custody.policies';

CREATE TABLE custody.attribute_store (
    role        text        NOT NULL,
    key         text        NOT NULL,
    value       jsonb       NOT NULL,
    valid_from  timestamptz NOT NULL,
    valid_until timestamptz,
    set_at      timestamptz NOT NULL,
    set_by      text        NOT NULL,
    PRIMARY KEY (role, key)
);
COMMENT ON TABLE custody.attribute_store IS 'pg_custody: role attributes with validity windows; see the view custody.attributes';

CREATE TABLE custody.suspensions (
    role         text        NOT NULL PRIMARY KEY,
    reason       text        NOT NULL,
    suspended_at timestamptz NOT NULL,
    suspended_by text        NOT NULL
);
COMMENT ON TABLE custody.suspensions IS 'pg_custody: suspended roles: every statement of theirs is denied until custody.resume()';

CREATE VIEW custody.policies AS
    SELECT name, 'rego'::text AS kind, version, encode(sha256, 'hex') AS sha256, enabled, updated_at, updated_by
    FROM custody.policy_store
    UNION ALL
    SELECT name, 'row'::text, version, encode(sha256, 'hex'), true, updated_at, updated_by
    FROM custody.row_policies;
COMMENT ON VIEW custody.policies IS 'pg_custody: Rego policies (cluster-wide) and the row policies of this database';

CREATE VIEW custody.attributes AS
    SELECT role, key, value, valid_from, valid_until,
           valid_from <= now() AND (valid_until IS NULL OR now() < valid_until) AS valid_now,
           set_at, set_by
    FROM custody.attribute_store;
COMMENT ON VIEW custody.attributes IS 'pg_custody: role attributes; valid_now says whether policies see them now';

REVOKE ALL ON custody.policy_store, custody.attribute_store, custody.suspensions FROM PUBLIC;
REVOKE ALL ON custody.policies, custody.attributes FROM PUBLIC;
GRANT SELECT ON custody.policy_store, custody.attribute_store, custody.suspensions,
                custody.policies, custody.attributes TO custody_auditor, custody_admin;
SELECT pg_catalog.pg_extension_config_dump('custody.policy_store', '');
SELECT pg_catalog.pg_extension_config_dump('custody.attribute_store', '');
SELECT pg_catalog.pg_extension_config_dump('custody.suspensions', '');
$ddl$;
-- The log's long values are compressed with lz4 where the server has it (every build this
-- project supports does): with pglz, the default, the writer spent 76-104 us per record of a
-- 4 kB statement against 48-55 with lz4 (docs/benchmarks.md). A server built without lz4
-- keeps pglz.
BEGIN
    ALTER TABLE custody.audit_log
        ALTER COLUMN statement SET COMPRESSION lz4,
        ALTER COLUMN objects SET COMPRESSION lz4,
        ALTER COLUMN message SET COMPRESSION lz4,
        ALTER COLUMN decision SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END;
END IF;
END
$chain$;
