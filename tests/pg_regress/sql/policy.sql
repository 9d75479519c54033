-- pg_custody: continuous authorization as users see it — allowed, denied, dry_run, errors.
-- (Runs after audit.sql in the same cluster, where the extension exists.)
CREATE TABLE regress_docs (id int, tenant text, body text);
INSERT INTO regress_docs VALUES (1, 'a', 'alpha'), (2, 'b', 'beta');
CREATE ROLE regress_reader LOGIN;
GRANT SELECT ON regress_docs TO regress_reader;
CREATE TABLE regress_policy_start (t timestamptz);
INSERT INTO regress_policy_start VALUES (clock_timestamp());

-- a policy that does not compile is refused with its line and column
SELECT custody.set_policy('broken', $rego$package custody
deny contains "x" if {
    input.command ==
}
$rego$);
-- a module outside package custody is refused
SELECT custody.set_policy('elsewhere', 'package other
deny contains "x" if { true }');
SELECT count(*) AS policies FROM custody.policies;

-- readers may not read regress_docs.body
SELECT custody.set_policy('no_body', $rego$package custody
deny contains msg if {
    "regress_reader" in input.subject.roles
    some o in input.objects
    o.name == "regress_docs"
    "body" in o.columns
    msg := sprintf("%s may not read regress_docs.body", [input.subject.current_user])
}
$rego$);
SELECT name, kind, version, enabled FROM custody.policies;

SET ROLE regress_reader;
SELECT id, tenant FROM regress_docs ORDER BY id;          -- allowed
SELECT body FROM regress_docs;                            -- denied
RESET ROLE;

-- suspension: every statement of the role is denied until resumed
SELECT custody.suspend('regress_reader', 'under investigation');
SET ROLE regress_reader;
SELECT id FROM regress_docs ORDER BY id;                  -- denied: suspended
RESET ROLE;
SELECT custody.resume('regress_reader');
SET ROLE regress_reader;
SELECT id FROM regress_docs ORDER BY id;                  -- allowed again
RESET ROLE;

-- attributes: only valid ones reach the policy
SELECT custody.set_policy('need_clearance', $rego$package custody
deny contains "regress_docs needs clearance" if {
    "regress_reader" in input.subject.roles
    some o in input.objects
    o.name == "regress_docs"
    not input.subject.attributes.clearance
}
$rego$);
SELECT custody.set_attribute('regress_reader', 'clearance', 'true', now() + interval '1 second', now());
SELECT custody.set_attribute('regress_reader', 'clearance', 'true',
                             valid_from => now() - interval '2 days', valid_until => now() - interval '1 day');
SET ROLE regress_reader;
SELECT id FROM regress_docs ORDER BY id;                  -- denied: attribute no longer valid
RESET ROLE;
SELECT custody.set_attribute('regress_reader', 'clearance', 'true');
SET ROLE regress_reader;
SELECT id FROM regress_docs ORDER BY id;                  -- allowed
SELECT custody.attribute('clearance') AS clearance;
RESET ROLE;
SELECT role, key, value, valid_now FROM custody.attributes;

-- dry_run: the statement runs, the would-be denial is recorded
SET custody.enforce = dry_run;
SET ROLE regress_reader;
SELECT body FROM regress_docs ORDER BY id;                -- runs
RESET ROLE;
RESET custody.enforce;

-- only superusers and custody_admin manage policies
SET ROLE regress_reader;
SELECT custody.drop_policy('no_body');
SET custody.enforce = off;
RESET ROLE;
SELECT custody.drop_policy('no_such_policy');
SELECT custody.drop_policy('no_body');
SELECT custody.drop_policy('need_clearance');
SELECT custody.clear_attribute('regress_reader', 'clearance');

-- the decisions, as recorded
SELECT custody.flush();
SELECT current_user_name AS who, class, command, outcome, sqlstate,
       decision->>'allowed' AS allowed, decision->'reasons' AS reasons,
       CASE WHEN class = 'policy' THEN objects->0->>'name' END AS policy,
       statement
FROM custody.audit_log
WHERE event_time > (SELECT t FROM regress_policy_start) AND backend_pid = pg_backend_pid()
  AND (decision->>'allowed' = 'false' OR class = 'policy' OR outcome <> 'success')
ORDER BY seq;

SELECT ok FROM custody.verify_audit_chain();
DROP TABLE regress_docs, regress_policy_start;
DROP ROLE regress_reader;
