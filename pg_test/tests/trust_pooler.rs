//! Poolers work: a real pgbouncer (Debian's package, installed by the Makefile) in transaction
//! mode in front of the test cluster, three clients sharing one server connection. pgbouncer
//! applies each client's startup parameters with `SET application_name = ...` on the shared
//! connection when it switches clients; with the pooled role suspended, those SETs must pass
//! (a failed one makes pgbouncer close the connection: the client gets 08P01), each client's
//! query gets the gate's 42501 with the suspension's reason, and after `resume` the same
//! server connection serves the next client.
//!
//! Own cluster (PGDATA-pooler, shared port + 22); pgbouncer listens on shared port + 23.
//! Run with `--test-threads=1`.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pg_custody_client_tests::*;

/// pgbouncer, run as postgres (it refuses root), stopped when dropped.
struct Bouncer {
    child: Child,
    dir: PathBuf,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // runuser's child is pgbouncer itself: stop it by its pid file, then reap runuser.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_bouncer(server_port: u16, port: u16) -> Bouncer {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("pgbouncer is not installed (the Makefile installs Debian's package pgbouncer)");
    let dir = std::env::temp_dir().join(format!("gate-pgbouncer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users.txt"), "\"gate_pool\" \"\"\n\"postgres\" \"\"\n").unwrap();
    let ini = format!(
        "[databases]\n\
         postgres = host=/tmp port={server_port} dbname=postgres\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {dir}/users.txt\n\
         pool_mode = transaction\n\
         default_pool_size = 1\n\
         max_client_conn = 20\n\
         server_lifetime = 3600\n\
         server_idle_timeout = 3600\n\
         logfile = {dir}/pgbouncer.log\n\
         pidfile = {dir}/pgbouncer.pid\n\
         ignore_startup_parameters = extra_float_digits\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
    chown_postgres(&dir);
    for f in ["users.txt", "pgbouncer.ini"] {
        chown_postgres(&dir.join(f));
    }
    let child = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&bin)
        .arg(dir.join("pgbouncer.ini"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    let b = Bouncer { child, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pgbouncer did not listen: {}", b.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    b
}

impl Bouncer {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

/// The one value of a simple query's first row.
fn value(c: &mut Client, sql: &str) -> Result<String, postgres::Error> {
    let msgs = c.simple_query(sql)?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row"))
}

#[test]
fn pgbouncer_transaction_mode_with_a_suspended_role() {
    let cluster = StopOnDrop(Cluster::own("pooler", 22));
    let mut admin = cluster.connect("gate_admin");
    admin
        .batch_execute(
            "CREATE ROLE gate_pool LOGIN; CREATE TABLE public.gate_pooled (id int); \
             INSERT INTO public.gate_pooled VALUES (1), (2); GRANT SELECT ON public.gate_pooled TO gate_pool",
        )
        .unwrap();
    let port = cluster.port + 23;
    let bouncer = start_bouncer(cluster.port, port);
    // Simple protocol only: pgbouncer 1.18 in transaction mode keeps no prepared statements.
    let mut clients: Vec<Client> = (0..3)
        .map(|i| {
            Client::connect(
                &format!("host=127.0.0.1 port={port} user=gate_pool dbname=postgres application_name=pooled_{i}"),
                NoTls,
            )
            .unwrap_or_else(|e| panic!("client {i} through pgbouncer: {e}\n{}", bouncer.log()))
        })
        .collect();
    let query = "SELECT count(*) FROM public.gate_pooled";
    let mut pids = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(value(c, query).unwrap_or_else(|e| panic!("client {i}: {e}")), "2");
        pids.push(value(c, "SELECT pg_backend_pid()").unwrap());
        assert_eq!(value(c, "SHOW application_name").unwrap(), format!("pooled_{i}"), "pgbouncer applies the client's name");
    }
    assert!(pids.windows(2).all(|w| w[0] == w[1]), "the clients do not share one server connection: {pids:?}");

    admin.batch_execute("SELECT custody.suspend('gate_pool', 'contractor offboarded')").unwrap();
    for round in 0..2 {
        for (i, c) in clients.iter_mut().enumerate() {
            let e = value(c, query).expect_err("a suspended role's query");
            let db = e.as_db_error().unwrap_or_else(|| panic!("client {i}, round {round}: not a server error: {e}\n{}", bouncer.log()));
            assert_eq!(db.code().code(), "42501", "client {i}, round {round}: {db:?}\n{}", bouncer.log());
            assert!(db.detail().unwrap_or("").contains("contractor offboarded"), "{db:?}");
        }
    }
    admin.batch_execute("SELECT custody.resume('gate_pool')").unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(value(c, query).unwrap_or_else(|e| panic!("client {i} after resume: {e}\n{}", bouncer.log())), "2");
        assert_eq!(value(c, "SELECT pg_backend_pid()").unwrap(), pids[0], "the server connection did not survive");
    }
    let log = bouncer.log();
    assert!(!log.contains("varcache_apply failed"), "pgbouncer could not apply a client's settings:\n{log}");

    // The pooler's SETs are recorded (not denied) like any statement.
    flush(&mut admin);
    let sets = query_i64(
        &mut admin,
        "SELECT count(*) FROM custody.audit_log WHERE session_user_name = 'gate_pool' AND command = 'SET' \
         AND outcome = 'success' AND statement LIKE '%application_name%'",
        &[],
    );
    eprintln!("pgbouncer's SET application_name on the shared connection: {sets} recorded");
    // The client has its error before the backend queues the record (the error is sent
    // first, the record closed at the abort that follows): wait for all six.
    wait_until(
        &mut admin,
        "SELECT count(*) = 6 FROM custody.audit_log WHERE session_user_name = 'gate_pool' AND outcome = 'denied'",
        &[],
        "each client's query in both rounds recorded as denied",
    );
    drop(clients);
    drop(bouncer);
    drop(cluster);
}
