-- pg_custody central store: several sources' logs in one database of a server WITHOUT
-- pg_custody (docs/operations.md, "A central audit store"). Run once in that database, after
-- `CREATE SCHEMA custody` and the CREATE TABLE statements printed by the source (the tables
-- logical replication matches by name). Then, per source, with the subscription's name as
-- its schema:
--     CREATE SCHEMA app1;
--     CREATE TABLE app1.audit_log (LIKE custody.audit_log);
--     CREATE TABLE app1.checkpoints (LIKE custody.checkpoints);
--     CREATE TABLE app1.public_keys (LIKE custody.public_keys);
--     CREATE SUBSCRIPTION app1 CONNECTION '...' PUBLICATION custody_audit;
-- and verify each on its own: custody verify --dsn '...' --schema app1 --public-key ...
--
-- Logical replication writes every source into custody.*; the trigger below moves each row
-- into the schema named like the subscription that brought it (the replication worker
-- inserting is found in pg_stat_subscription), so custody.* stays empty. Anything else
-- inserting there is refused.

CREATE FUNCTION custody.route_copy() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $route$
DECLARE
    source name;
BEGIN
    SELECT s.subname INTO source FROM pg_catalog.pg_stat_subscription s
    WHERE s.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() LIMIT 1;
    IF source IS NULL THEN
        RAISE EXCEPTION 'rows reach %.% only from a subscription', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '42501';
    END IF;
    EXECUTE pg_catalog.format('INSERT INTO %I.%I SELECT ($1).*', source, TG_TABLE_NAME) USING NEW;
    RETURN NULL;
END
$route$;

DO $triggers$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['audit_log', 'checkpoints', 'public_keys'] LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER route_copy BEFORE INSERT ON custody.%I FOR EACH ROW EXECUTE FUNCTION custody.route_copy()', t);
        -- Replication workers run with session_replication_role = replica: fire there too.
        EXECUTE pg_catalog.format('ALTER TABLE custody.%I ENABLE ALWAYS TRIGGER route_copy', t);
    END LOOP;
END
$triggers$;
