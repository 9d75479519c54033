-- pg_custody finalize: runs last in CREATE EXTENSION, after the functions exist.

COMMENT ON SCHEMA custody IS 'pg_custody: tamper-evident audit log and its functions';

COMMENT ON FUNCTION custody.verify_audit_chain(bigint, bigint, jsonb, text) IS
    'Recomputes every hash and link of custody.audit_log from from_seq to to_seq and names the first bad record and why; with trusted_digests and/or public_key also checks every checkpoint''s Merkle root and signature and each digest';
COMMENT ON FUNCTION custody.audit_head() IS 'seq, hash and logged_at of the last record of the chain';
COMMENT ON FUNCTION custody.audit_digest() IS
    '{seq, hash, merkle_root, signed_note} of the latest checkpoint: keep it outside the database';
COMMENT ON FUNCTION custody.export_audit(bigint, bigint) IS
    'The chain as JSON lines (header, records, checkpoints) for the custody command-line verifier';
COMMENT ON FUNCTION custody.flush(integer) IS
    'Waits (up to timeout_ms) until every audit record this session queued so far is stored';
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
