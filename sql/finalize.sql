-- pg_custody finalize: runs last in CREATE EXTENSION, after the functions exist.

COMMENT ON SCHEMA custody IS 'pg_custody: tamper-evident audit log and its functions';

COMMENT ON FUNCTION custody.verify_audit_chain(bigint, bigint) IS
    'Recomputes every hash and link of custody.audit_log from from_seq to to_seq; names the first bad record and why';
COMMENT ON FUNCTION custody.audit_head() IS 'seq, hash and logged_at of the last record of the chain';
COMMENT ON FUNCTION custody.flush(integer) IS
    'Waits (up to timeout_ms) until every audit record this session queued so far is stored';
COMMENT ON FUNCTION custody.status() IS 'State of the custody writer: pid, chain head, queue fill, lost records';

REVOKE ALL ON FUNCTION custody.verify_audit_chain(bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.audit_head() FROM PUBLIC;
REVOKE ALL ON FUNCTION custody.status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION custody.verify_audit_chain(bigint, bigint) TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.audit_head() TO custody_auditor;
GRANT EXECUTE ON FUNCTION custody.status() TO custody_auditor;
