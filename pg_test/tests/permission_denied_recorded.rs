//! A read refused by PostgreSQL's own privilege check is recorded under the refused role,
//! with its SQLSTATE and the table it tried to read.

use pg_custody_client_tests::*;

#[test]
fn permission_denied_recorded() {
    let cluster = Cluster::shared();
    let m = marker("perm");
    let role = format!("{m}_role");
    let table = format!("{m}_secret");
    let mut admin = cluster.connect(&format!("{m}_admin"));
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE TABLE public.{table} (id int, secret text); \
             INSERT INTO public.{table} VALUES (1, 's')"
        ))
        .unwrap();

    let app = format!("{m}_user");
    let select = format!("SELECT secret FROM public.{table}");
    {
        let mut user = cluster.connect_as(&role, &app);
        assert_eq!(sqlstate(user.simple_query(&select)), "42501");
    }

    // The refused session's record is stored once its statement finished (bounded wait).
    wait_until(
        &mut admin,
        "SELECT count(*) >= 1 FROM custody.audit_log WHERE application_name = $1 AND statement = $2",
        &[&app, &select],
        "record of the refused SELECT",
    );
    let rows = admin
        .query(
            "SELECT session_user_name, current_user_name, outcome, sqlstate, command, \
                    objects::text, \
                    EXISTS (SELECT 1 FROM jsonb_array_elements(objects) o \
                            WHERE o->>'schema' = 'public' AND o->>'name' = $3) \
             FROM custody.audit_log WHERE application_name = $1 AND statement = $2",
            &[&app, &select, &table],
        )
        .unwrap();
    assert_eq!(rows.len(), 1, "exactly one record of the refused SELECT");
    let r = &rows[0];
    assert_eq!(r.get::<_, String>(0), role);
    assert_eq!(r.get::<_, String>(1), role);
    assert_eq!(r.get::<_, String>(2), "error");
    assert_eq!(r.get::<_, Option<String>>(3).as_deref(), Some("42501"));
    assert_eq!(r.get::<_, String>(4), "SELECT");
    assert!(r.get::<_, bool>(6), "objects do not name public.{table}: {}", r.get::<_, String>(5));
    assert_chain_ok(&mut admin);
}
