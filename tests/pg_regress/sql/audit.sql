-- pg_custody: the records a fixed script produces, as users see them.
-- Timestamps, pids, xids and hashes vary from run to run and are not shown.
CREATE EXTENSION pg_custody;
-- auditing starts once the custody writer has found the new table
DO $$
BEGIN
    FOR i IN 1..200 LOOP
        EXIT WHEN custody.status()->>'state' = 'appending';
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
SELECT custody.status()->>'state' AS writer_state;
-- what this session did after the start mark, in order
CREATE TABLE regress_start (t timestamptz);
CREATE VIEW recent AS
SELECT row_number() OVER (ORDER BY seq) AS n, nesting_level AS lvl, class, command,
       objects, rows, outcome, sqlstate, message, statement, statement_sha256 IS NOT NULL AS truncated
FROM custody.audit_log
WHERE event_time > (SELECT t FROM regress_start) AND backend_pid = pg_backend_pid()
  -- the record of the flush call itself may or may not be stored yet: leave it out
  AND statement IS DISTINCT FROM 'SELECT custody.flush()';
INSERT INTO regress_start VALUES (clock_timestamp());

-- read, write, ddl
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric);
INSERT INTO accounts VALUES (1, 'alice', 100), (2, 'bob', 50);
UPDATE accounts SET balance = balance - 10 WHERE owner = 'alice';
SELECT owner FROM accounts WHERE id = 2;
DELETE FROM accounts WHERE id = 2;
COPY accounts TO STDOUT;
TRUNCATE accounts;

-- failures: planning, parsing, execution, a missing table, inside a rolled-back transaction
SELECT 1/0;
SELEC 1;
INSERT INTO accounts VALUES (1, 'alice', 1), (1, 'again', 2);
SELECT * FROM no_such_table;
BEGIN;
SELECT count(*) FROM accounts;
ROLLBACK;

-- role class, and PostgreSQL's own permission check (runs before ExecutorCheckPerms_hook)
CREATE ROLE regress_custody_reader;
SET ROLE regress_custody_reader;
SELECT * FROM accounts;
RESET ROLE;
GRANT SELECT ON accounts TO regress_custody_reader;
REVOKE SELECT ON accounts FROM regress_custody_reader;
DROP ROLE regress_custody_reader;

-- statements inside functions are recorded with their nesting level
CREATE FUNCTION add_account(i int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO accounts VALUES (i, 'carol', 0);
END $$;
SELECT add_account(3);
DO $$ BEGIN PERFORM count(*) FROM accounts; END $$;

-- the audit log is append-only, for superusers too; every refused attempt is recorded
DELETE FROM custody.audit_log WHERE seq = 1;
UPDATE custody.audit_log SET statement = 'nothing to see' WHERE seq = 1;
INSERT INTO custody.audit_log SELECT * FROM custody.audit_log WHERE seq = 1;
TRUNCATE custody.audit_log;
ALTER TABLE custody.audit_log DISABLE TRIGGER ALL;
ALTER TABLE custody.audit_log RENAME TO old_log;
CREATE RULE no_delete AS ON DELETE TO custody.audit_log DO INSTEAD NOTHING;
DROP EXTENSION pg_custody CASCADE;

-- settings: a change to custody.* is always recorded, even one that turns auditing off
SET custody.audit = 'none';
SELECT 'not recorded' AS during_none;
SET custody.audit = 'all';
SET application_name = 'regress';
SET custody.max_statement_length = 64;
SELECT 'a statement longer than sixty-four bytes is truncated, and its SHA-256 kept' AS long_text;
RESET custody.max_statement_length;
SET custody.audit_statement = none;
SELECT 'text not recorded' AS no_text;
RESET custody.audit_statement;
RESET custody.audit;
SET custody.audit = 'read, bogus';
-- only superusers may change them
SET ROLE regress_custody_nobody;
CREATE ROLE regress_custody_nobody;
SET ROLE regress_custody_nobody;
SET custody.audit = 'none';
RESET ROLE;
DROP ROLE regress_custody_nobody;

SELECT custody.flush();
SELECT n, lvl, class, command,
       CASE WHEN command = 'SETTINGS CHANGED'
            THEN jsonb_build_object('audit', objects->0->'settings'->'custody.audit',
                                    'audit_statement', objects->0->'settings'->'custody.audit_statement',
                                    'max_statement_length', objects->0->'settings'->'custody.max_statement_length')
            ELSE objects END AS objects,
       rows, outcome, sqlstate, message, statement, truncated
FROM recent ORDER BY n;

-- the chain verifies
SELECT ok, first_bad_seq, reason FROM custody.verify_audit_chain();
SELECT seq = (SELECT max(seq) FROM custody.audit_log) AS head_is_last FROM custody.audit_head();
