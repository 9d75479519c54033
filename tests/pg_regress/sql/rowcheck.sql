-- pg_custody: custody.check() in row policies. A resource written
-- jsonb_build_object('key', column, ...) is planned as custody._check_fields, which decides
-- the same without building the jsonb on every row; anything else stays custody.check.
-- (Runs after policy.sql in the same cluster.)
CREATE ROLE regress_tenant7 LOGIN;
SELECT custody.set_attribute('regress_tenant7', 'tenant', '7');
SELECT custody.set_policy('rows', $rego$package custody
row_allow if {
    input.action == "read"
    input.resource.tenant == input.subject.attributes.tenant
}
row_allow if {
    input.action == "read"
    input.resource.label == "public"
}
row_allow if {
    input.action == "audit"
    input.resource == {"tenant": 7, "label": null, "big": 9000000000, "flag": true, "v": "x"}
}
$rego$);
CREATE TABLE regress_rows (id int, tenant int, label text, big bigint, flag boolean, v varchar(4), n numeric);
INSERT INTO regress_rows VALUES
    (1, 7, 'secret', 1, false, 'a', 1), (2, 8, 'secret', 2, true, 'b', 2), (3, 8, 'public', 3, NULL, NULL, 3),
    (4, NULL, NULL, NULL, NULL, NULL, NULL), (5, 7, NULL, 9000000000, true, 'x', 5), (6, 70, 'Public', 6, false, 'c', 6);
GRANT SELECT ON regress_rows TO regress_tenant7;
SELECT custody.create_row_policy('regress_by_tenant', 'regress_rows', 'select',
       using_expr => $$ custody.check('read', jsonb_build_object('tenant', tenant, 'label', label)) $$);

-- the planner rewrites the call: no jsonb is built per row
EXPLAIN (COSTS OFF) SELECT id FROM regress_rows WHERE custody.check('read', jsonb_build_object('tenant', tenant, 'label', label));
SET ROLE regress_tenant7;
SELECT id, tenant, label FROM regress_rows ORDER BY id;    -- its tenant's rows and public ones
RESET ROLE;

-- in parallel workers too: the plain and the custody row policy alike can use a Parallel Seq Scan
SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SET parallel_leader_participation = off;  -- only workers scan: the counts are theirs
SET ROLE regress_tenant7;
EXPLAIN (COSTS OFF) SELECT count(*) FROM regress_rows;
SELECT count(*) FROM regress_rows;
EXPLAIN (COSTS OFF) SELECT count(*) FROM regress_rows
WHERE custody.attribute('tenant') = '7' AND custody.current_subject()->'roles' ? 'regress_tenant7';
SELECT count(*) FROM regress_rows
WHERE custody.attribute('tenant') = '7' AND custody.current_subject()->'roles' ? 'regress_tenant7';
RESET ROLE;
RESET parallel_setup_cost; RESET parallel_tuple_cost; RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather; RESET parallel_leader_participation;

-- the same answer as with the jsonb built, for every type _check_fields reads, nulls included
-- (`|| '{}'` keeps the planner from rewriting the second call; as superuser, every row)
SELECT id,
       custody.check('audit', jsonb_build_object('tenant', tenant, 'label', label, 'big', big, 'flag', flag, 'v', v)) AS fields,
       custody.check('audit', jsonb_build_object('tenant', tenant, 'label', label, 'big', big, 'flag', flag, 'v', v) || '{}') AS jsonb
FROM regress_rows ORDER BY id;
-- not rewritten: a type it does not read, a key that is not a constant, a repeated key,
-- a resource that is not jsonb_build_object
EXPLAIN (COSTS OFF) SELECT id FROM regress_rows WHERE custody.check('read', jsonb_build_object('tenant', n));
EXPLAIN (COSTS OFF) SELECT id FROM regress_rows WHERE custody.check('read', jsonb_build_object(label, tenant));
EXPLAIN (COSTS OFF) SELECT id FROM regress_rows WHERE custody.check('read', jsonb_build_object('tenant', 1, 'tenant', tenant));
EXPLAIN (COSTS OFF) SELECT id FROM regress_rows WHERE custody.check('read', to_jsonb(regress_rows));
-- as jsonb_build_object would: a NULL key is an error, a NULL action is NULL
SELECT custody.check('read', jsonb_build_object(NULL::text, tenant)) FROM regress_rows WHERE id = 1;
SELECT custody.check(NULL, jsonb_build_object('tenant', tenant)) FROM regress_rows WHERE id = 1;
-- custody._check_fields called directly with what it does not read: 22023
DO $$ BEGIN
    PERFORM custody._check_fields('read', 'tenant', 1.5);
EXCEPTION WHEN invalid_parameter_value THEN RAISE NOTICE 'refused (22023): %', SQLERRM;
END $$;
DO $$ BEGIN
    PERFORM custody._check_fields('read', 'tenant');
EXCEPTION WHEN invalid_parameter_value THEN RAISE NOTICE 'refused (22023): %', SQLERRM;
END $$;

-- answers are remembered for one statement only: an attribute that expires between two
-- statements of an open session changes the next one's rows
SELECT custody.clear_attribute('regress_tenant7', 'tenant');
SELECT custody.set_attribute('regress_tenant7', 'tenant', '7', valid_until => now() + interval '1 second');
SET ROLE regress_tenant7;
SELECT id FROM regress_rows ORDER BY id;                  -- tenant 7 and public
SELECT pg_sleep(1.2);
SELECT id FROM regress_rows ORDER BY id;                  -- public only
RESET ROLE;

-- an error inside pg_custody's own work (here PostgreSQL refusing the expression), caught
-- by an EXCEPTION block, leaves capture and the gate on for the rest of the session
DO $$ BEGIN
    PERFORM custody.create_row_policy('regress_bad', 'regress_rows', 'select', using_expr => 'no_such_column = 1');
EXCEPTION WHEN undefined_column THEN RAISE NOTICE 'refused: %', SQLERRM;
END $$;
SELECT 'recorded after the caught error' AS probe;
SELECT custody.flush();
SELECT count(*) AS recorded FROM custody.audit_log
WHERE backend_pid = pg_backend_pid() AND statement LIKE 'SELECT ''recorded after the caught error''%';

SELECT custody.drop_row_policy('regress_by_tenant');
SELECT custody.drop_policy('rows');
SELECT custody.clear_attribute('regress_tenant7', 'tenant');
DROP TABLE regress_rows;
DROP ROLE regress_tenant7;
