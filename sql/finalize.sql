-- pg_custody finalize: runs last in CREATE EXTENSION, after the functions exist.

COMMENT ON SCHEMA custody IS 'pg_custody: tamper-evident audit log and its functions';

COMMENT ON FUNCTION custody.verify_audit_chain(bigint, bigint, jsonb, text) IS
    'Recomputes every hash and link of custody.audit_log from from_seq to to_seq and names the first bad record and why; with trusted_digests and/or public_key also checks every checkpoint''s Merkle root and signature and each digest';
COMMENT ON FUNCTION custody.audit_head() IS 'seq, hash and logged_at of the last record of the chain';
COMMENT ON FUNCTION custody.audit_digest() IS
    '{seq, hash, merkle_root, signed_note} of the latest checkpoint: keep it outside the database';
-- The export streams in slices of 10,000 records (custody._export_chunk, in Rust).
CREATE FUNCTION custody.export_audit(from_seq bigint DEFAULT 1, to_seq bigint DEFAULT NULL)
RETURNS SETOF text LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT custody._export_chunk(s, least(s + 9999, b.hi), s = b.lo)
    FROM (SELECT greatest(from_seq, 1) AS lo,
                 coalesce(to_seq, (SELECT max(seq) FROM custody.audit_log)) AS hi) b,
         generate_series(b.lo, b.hi, 10000) AS s
$$;
COMMENT ON FUNCTION custody.export_audit(bigint, bigint) IS
    'The chain as JSON lines (header, records, checkpoints) for the custody command-line verifier';
COMMENT ON FUNCTION custody._export_chunk(bigint, bigint, boolean) IS
    'One slice of custody.export_audit(); call that instead';
REVOKE ALL ON FUNCTION custody._export_chunk(bigint, bigint, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION custody._export_chunk(bigint, bigint, boolean) TO custody_auditor;
COMMENT ON FUNCTION custody.flush(integer) IS
    'Waits (up to timeout_ms) until every audit record this session queued so far is stored, then flushes WAL so they are on disk';
COMMENT ON FUNCTION custody.standby_records(bytea, bigint) IS
    'Called by a hot standby''s pg_custody standby worker: stores the records of the standby''s statements in this chain (superusers and custody_standby members only)';
COMMENT ON FUNCTION custody.status() IS
    'State of the custody writer: pid, chain head, queue fill, lost records, last checkpoint, signing key';

REVOKE ALL ON FUNCTION custody.verify_audit_chain(bigint, bigint, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.audit_head() FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.audit_digest() FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.export_audit(bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION custody.verify_audit_chain(bigint, bigint, jsonb, text) TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.audit_head() TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.audit_digest() TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.export_audit(bigint, bigint) TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.status() TO custody_auditor;

-- Row policies take the table as regclass; the implementation takes its OID.
CREATE FUNCTION custody.create_row_policy(name text, tbl regclass, command text DEFAULT 'all',
                                          using_expr text DEFAULT NULL, check_expr text DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT custody._create_row_policy(name, tbl::oid, command, using_expr, check_expr) $$;

COMMENT ON FUNCTION custody.create_row_policy(text, regclass, text, text, text) IS
    'Creates a RESTRICTIVE row-security policy on tbl, enables and forces row security, and records it (superusers and custody_admin)';
COMMENT ON FUNCTION custody._create_row_policy(text, oid, text, text, text) IS
    'Implementation of custody.create_row_policy(); call that instead';
COMMENT ON FUNCTION custody.drop_row_policy(text) IS 'Drops a row policy created by custody.create_row_policy()';
COMMENT ON FUNCTION custody.set_policy(text, text) IS
    'Compiles a Rego module (package custody) and stores it as the next version of the named policy; in force at the next statement of every session (superusers and custody_admin)';
COMMENT ON FUNCTION custody.drop_policy(text) IS 'Removes a Rego policy';
COMMENT ON FUNCTION custody.enable_policy(text, boolean) IS 'Turns a Rego policy on or off (a new version)';
COMMENT ON FUNCTION custody.set_attribute(text, text, jsonb, timestamptz, timestamptz) IS
    'Gives a role an attribute, valid from valid_from until valid_until (policies see only valid attributes)';
COMMENT ON FUNCTION custody.clear_attribute(text, text) IS 'Removes an attribute of a role';
COMMENT ON FUNCTION custody.suspend(text, text) IS
    'Denies every statement of the role (and of roles acting through it), in every session, from the next statement on';
COMMENT ON FUNCTION custody.resume(text) IS 'Lifts a suspension';
COMMENT ON FUNCTION custody.attribute(text) IS 'The current user''s attribute, if valid now';
COMMENT ON FUNCTION custody.current_subject() IS '{session_user, current_user, roles, attributes} as policies see them';
COMMENT ON FUNCTION custody.check(text, jsonb) IS
    'Evaluates data.custody.row_allow for {subject, action, resource}; memoized within a statement; for row policies';

-- custody.check(action, jsonb_build_object('k', col, ...)) is planned as
-- custody._check_fields(action, 'k', col, ...): the same decision without building the
-- jsonb on every row (see src/policy/rows.rs).
CREATE FUNCTION custody._check_fields(action text, VARIADIC "any") RETURNS boolean
    LANGUAGE c STABLE PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'custody_check_fields';
COMMENT ON FUNCTION custody._check_fields(text, "any") IS
    'custody.check(action, jsonb_build_object(VARIADIC pairs)) without the jsonb: what the planner makes of such a call';
CREATE FUNCTION custody._check_support(internal) RETURNS internal
    LANGUAGE c STRICT
    AS 'MODULE_PATHNAME', 'custody_check_support';
COMMENT ON FUNCTION custody._check_support(internal) IS
    'Planner support for custody.check: rewrites a jsonb_build_object resource into custody._check_fields';
REVOKE ALL ON FUNCTION custody._check_support(internal) FROM PUBLIC;
ALTER FUNCTION custody.check(text, jsonb) SUPPORT custody._check_support;
