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
-- inserting there is refused. Give no other role CREATE on this database or on the source
-- schemas (REVOKE CREATE ON DATABASE ... FROM PUBLIC): the copies are only as good as their
-- owners, and are checked against the sources' signed checkpoints anyway.

CREATE FUNCTION custody.route_copy() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $route$
DECLARE
    source name;
    target pg_catalog.oid;
BEGIN
    SELECT s.subname INTO source FROM pg_catalog.pg_stat_subscription s
    WHERE s.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() LIMIT 1;
    IF source IS NULL THEN
        RAISE EXCEPTION 'rows reach %.% only from a subscription', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = '42501';
    END IF;
    -- The copy's table must be a plain table of the owner of custody.*, with no trigger,
    -- rule or row security: otherwise its maker's code would run as the replication worker.
    SELECT c.oid INTO target FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
    WHERE n.nspname OPERATOR(pg_catalog.=) source AND c.relname OPERATOR(pg_catalog.=) TG_TABLE_NAME
      AND c.relkind OPERATOR(pg_catalog.=) 'r' AND NOT c.relrowsecurity AND NOT c.relhasrules
      AND c.relowner OPERATOR(pg_catalog.=) (SELECT relowner FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) TG_RELID)
      AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid);
    IF target IS NULL THEN
        RAISE EXCEPTION '%.% is not a plain table of the owner of %.%, without triggers, rules or row security',
            source, TG_TABLE_NAME, TG_TABLE_SCHEMA, TG_TABLE_NAME USING ERRCODE = '42501';
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
