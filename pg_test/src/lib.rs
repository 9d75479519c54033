//! Harness for the client-side integration tests of pg_custody (STYLE.md, "Tests, by
//! purpose", 4): real clusters driven through `scripts/cluster.sh`, real connections.
//!
//! Environment: `CUSTODY_TEST_PGDATA` (absolute directory of the shared cluster) and
//! `CUSTODY_TEST_PORT`; defaults `<repo>/target/client-cluster` and 54331. Tests that damage
//! the chain or crash the server use their own cluster (`Cluster::own`), at PGDATA-<suffix>
//! and a port above the shared one. Run with `--test-threads=1`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub use postgres::{Client, NoTls};

/// How long a bounded wait (writer ready, records stored) may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo root")
}

fn base_dir() -> PathBuf {
    match std::env::var("CUSTODY_TEST_PGDATA") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join("target").join("client-cluster"),
    }
}

fn base_port() -> u16 {
    std::env::var("CUSTODY_TEST_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(54331)
}

/// A cluster managed by `scripts/cluster.sh`.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The server's bin directory when it is not the one under test (CUSTODY_TEST_PGBIN):
    /// another major, for pg_upgrade.
    pub pgbin: Option<String>,
}

impl Cluster {
    /// The shared cluster: reused if it accepts connections, started otherwise; the
    /// extension exists and the writer is appending.
    pub fn shared() -> Cluster {
        let c = Cluster { dir: base_dir(), port: base_port(), pgbin: None };
        if c.try_connect("postgres", "harness").is_err() {
            c.start();
        }
        c.setup();
        c
    }

    /// A cluster of one test only (`suffix` names it, `port_offset` is added to the shared
    /// port), wiped and created afresh, extension created, writer appending.
    pub fn own(suffix: &str, port_offset: u16) -> Cluster {
        let c = Cluster::fresh(suffix, port_offset, None);
        c.start();
        c.setup();
        c
    }

    /// A cluster of one test only, wiped and not started, of the server in `pgbin` (None:
    /// the one under test).
    pub fn fresh(suffix: &str, port_offset: u16, pgbin: Option<&str>) -> Cluster {
        let mut dir = base_dir().into_os_string();
        dir.push(format!("-{suffix}"));
        let c = Cluster { dir: PathBuf::from(dir), port: base_port() + port_offset, pgbin: pgbin.map(str::to_string) };
        c.stop("immediate");
        if c.dir.exists() {
            std::fs::remove_dir_all(&c.dir).expect("wipe cluster dir");
        }
        c
    }

    fn script(&self, args: &[&str]) {
        let script = repo_root().join("scripts").join("cluster.sh");
        let mut cmd = Command::new("bash");
        if let Some(bin) = &self.pgbin {
            cmd.env("PGBIN", bin);
        }
        let out = cmd.arg(&script).args(args).output().expect("run cluster.sh");
        assert!(
            out.status.success(),
            "cluster.sh {args:?} failed: {}\n{}\n--- server.log tail ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the cluster (creating it if needed); restarts it if it runs.
    pub fn start(&self) {
        let dir = self.dir.to_str().unwrap().to_string();
        self.script(&["start", &dir, &self.port.to_string()]);
    }

    /// Stops the cluster if it runs (mode: fast | immediate).
    pub fn stop(&self, mode: &str) {
        let dir = self.dir.to_str().unwrap().to_string();
        self.script(&["stop", &dir, mode]);
    }

    /// CREATE EXTENSION IF NOT EXISTS, then wait until the writer is appending.
    pub fn setup(&self) {
        let mut c = self.connect("harness");
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_custody").expect("create extension");
        wait_ready(&mut c);
    }

    /// Removes the heads the writer remembers across restarts (`$PGDATA/pg_custody.<db oid>.head`,
    /// one per database with a chain): the file-system access nothing in the database can stop.
    pub fn remove_head_files(&self) {
        for e in std::fs::read_dir(&self.dir).expect("data directory").flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("pg_custody.") && n.ends_with(".head") {
                std::fs::remove_file(e.path()).expect("remove head file");
            }
        }
    }

    /// Restarts the cluster without the library (nothing is recorded or protected).
    pub fn restart_unloaded(&self) {
        let mut c = self.connect("harness");
        // Not `= ''`: ALTER SYSTEM writes that as '""', and the server then fails to start
        // with `could not access file ""`. plpgsql is a harmless library to preload instead.
        c.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'plpgsql'").expect("unload");
        drop(c);
        self.start();
        let mut c = self.connect("harness");
        let spl: String = c.query_one("SHOW shared_preload_libraries", &[]).unwrap().get(0);
        assert_eq!(spl, "plpgsql", "library still configured");
    }

    /// Restarts the cluster with the library (must run while unloaded) and waits for the writer.
    pub fn restart_loaded(&self) {
        let mut c = self.connect("harness");
        c.batch_execute("ALTER SYSTEM RESET shared_preload_libraries").expect("reload");
        drop(c);
        self.start();
        let mut c = self.connect("harness");
        wait_ready(&mut c);
    }

    pub fn conn_str(&self, user: &str, app: &str) -> String {
        format!("host=/tmp port={} user={user} dbname=postgres application_name={app}", self.port)
    }

    pub fn try_connect(&self, user: &str, app: &str) -> Result<Client, postgres::Error> {
        Client::connect(&self.conn_str(user, app), NoTls)
    }

    /// Connects as postgres with the given application_name.
    pub fn connect(&self, app: &str) -> Client {
        self.connect_as("postgres", app)
    }

    pub fn connect_as(&self, user: &str, app: &str) -> Client {
        // Right after a start the socket may lag slightly; retry within a bound.
        let deadline = Instant::now() + WAIT;
        loop {
            match self.try_connect(user, app) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline && e.as_db_error().is_none() => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("connect to port {} as {user}: {e}\n{}", self.port, self.log_tail()),
            }
        }
    }
}

/// Polls `custody.status()->>'state'` until 'appending'.
pub fn wait_ready(c: &mut Client) {
    let deadline = Instant::now() + WAIT;
    loop {
        // Right after a start, a gated statement waits for the writer to publish the policies
        // (custody.failure_timeout) and is denied when it has not yet: ask again.
        let state: Option<String> = match c.query_one("SELECT custody.status()->>'state'", &[]) {
            Ok(row) => row.get(0),
            Err(e) if e.as_db_error().is_some_and(|d| d.message().contains("not known yet")) => None,
            Err(e) => panic!("custody.status(): {e}"),
        };
        if state.as_deref() == Some("appending") {
            return;
        }
        assert!(Instant::now() < deadline, "writer not appending after {WAIT:?}: state {state:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every record this session queued so far is stored.
pub fn flush(c: &mut Client) {
    // Longer than custody.flush()'s default: a loaded machine must not fail a test here.
    let ok: bool = c.query_one("SELECT custody.flush(30000)", &[]).expect("custody.flush()").get(0);
    assert!(ok, "custody.flush() timed out");
}

/// Polls `sql` (one boolean column) until true; panics with `what` after WAIT.
pub fn wait_until(c: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)], what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let done: bool = c.query_one(sql, params).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0);
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn query_i64(c: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> i64 {
    c.query_one(sql, params).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// The result of `custody.verify_audit_chain()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verify {
    pub ok: bool,
    pub checked: i64,
    pub first_bad_seq: Option<i64>,
    pub reason: Option<String>,
}

pub fn verify(c: &mut Client) -> Verify {
    let r = c
        .query_one("SELECT ok, checked, first_bad_seq, reason FROM custody.verify_audit_chain()", &[])
        .expect("verify_audit_chain()");
    Verify { ok: r.get(0), checked: r.get(1), first_bad_seq: r.get(2), reason: r.get(3) }
}

/// Asserts the whole chain verifies and seq is exactly 1..max, without gaps.
pub fn assert_chain_ok(c: &mut Client) {
    let r = c
        .query_one(
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM custody.audit_log",
            &[],
        )
        .unwrap();
    let (n, min, max): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(min, 1, "seq does not start at 1");
    assert_eq!(n, max - min + 1, "seq has gaps or duplicates: count {n}, min {min}, max {max}");
    // Verified after counting: records appended meanwhile only add to `checked`.
    let v = verify(c);
    assert!(v.ok, "verify_audit_chain() failed: {v:?}");
    assert!(v.checked >= n, "verify checked {} of {n} records", v.checked);
}

/// The SQLSTATE of a failed statement (panics if it succeeded or failed without one).
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, postgres::Error>) -> String {
    let e = r.expect_err("statement succeeded but should have failed");
    e.code().unwrap_or_else(|| panic!("error without SQLSTATE: {e}")).code().to_string()
}

/// A token unique to this run, for statement texts and object names.
pub fn marker(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

// ---- Signing keys, checkpoints and exports (tests/checkpoints.rs, tests/offline_verify.rs) ----

/// Stops the cluster when dropped, also when the test panics.
pub struct StopOnDrop(pub Cluster);

impl std::ops::Deref for StopOnDrop {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let dir = self.0.dir.to_str().unwrap().to_string();
        let script = repo_root().join("scripts").join("cluster.sh");
        let mut cmd = Command::new("bash");
        if let Some(bin) = &self.0.pgbin {
            cmd.env("PGBIN", bin);
        }
        let _ = cmd.arg(&script).args(["stop", &dir, "fast"]).output();
    }
}

/// The `custody` command-line tool: the workspace build if present, else the installed one.
pub fn custody_bin() -> PathBuf {
    let local = repo_root().join("target").join("debug").join("custody");
    if local.exists() {
        local
    } else {
        PathBuf::from("custody")
    }
}

/// Runs `custody args...`; returns (exit code, stdout, stderr).
pub fn run_custody(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(custody_bin()).args(args).output().expect("run custody");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `custody keygen --out path --name name`, the file then owned by postgres (the server reads
/// it); returns the verifier key printed on stdout.
pub fn keygen(path: &std::path::Path, name: &str) -> String {
    let (code, out, err) = run_custody(&["keygen", "--out", path.to_str().unwrap(), "--name", name]);
    assert_eq!(code, 0, "custody keygen failed: {out}\n{err}");
    chown_postgres(path);
    let key = out.trim().to_string();
    assert!(key.starts_with(&format!("{name}+")), "unexpected verifier key {key:?}");
    key
}

pub fn chown_postgres(path: &std::path::Path) {
    let st = Command::new("chown").arg("postgres:").arg(path).status().expect("chown");
    assert!(st.success(), "chown postgres: {}", path.display());
}

/// Appends settings to the cluster's postgresql.conf (later lines win) and reloads.
pub fn set_and_reload(cluster: &Cluster, c: &mut Client, settings: &[&str]) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cluster.dir.join("postgresql.conf"))
        .expect("open postgresql.conf");
    for s in settings {
        writeln!(f, "{s}").unwrap();
    }
    drop(f);
    let ok: bool = c.query_one("SELECT pg_reload_conf()", &[]).unwrap().get(0);
    assert!(ok, "pg_reload_conf() failed");
}

/// A cluster of one test only (`Cluster::own`) restarted with `settings` added to its
/// postgresql.conf (postmaster settings such as custody.queue_size), writer appending.
pub fn own_with(suffix: &str, port_offset: u16, settings: &[&str]) -> StopOnDrop {
    let cluster = StopOnDrop(Cluster::own(suffix, port_offset));
    let mut c = cluster.connect(&format!("{suffix}_setup"));
    set_and_reload(&cluster, &mut c, settings);
    drop(c);
    cluster.start();
    wait_ready(&mut cluster.connect(&format!("{suffix}_setup")));
    cluster
}

/// Sets custody.allow_drop = on and waits until the server runs with it: `c` sees it once the
/// postmaster has reloaded (it signals the backends after reloading itself), so every
/// connection made from then on has it too.
pub fn allow_drop(cluster: &Cluster, c: &mut Client) {
    set_and_reload(cluster, c, &["custody.allow_drop = on"]);
    wait_until(c, "SELECT current_setting('custody.allow_drop') = 'on'", &[], "custody.allow_drop reloaded");
}

/// `custody.status()->>'signing_key'`.
pub fn signing_key_status(c: &mut Client) -> String {
    c.query_one("SELECT custody.status()->>'signing_key'", &[]).expect("custody.status()").get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// Polls until the signing_key status starts with `prefix` and contains `needle`; returns it.
pub fn wait_key_status(c: &mut Client, prefix: &str, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = signing_key_status(c);
        if s.starts_with(prefix) && s.contains(needle) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "signing_key status {s:?} did not become {prefix}...{needle}... within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until `custody.status()->>'last_checkpoint_seq'` is at least `min_seq`; returns it.
pub fn wait_checkpoint(c: &mut Client, min_seq: i64) -> i64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let s: Option<i64> = c
            .query_one("SELECT (custody.status()->>'last_checkpoint_seq')::int8", &[])
            .expect("custody.status()")
            .get(0);
        if let Some(s) = s.filter(|&s| s >= min_seq && s > 0) {
            return s;
        }
        assert!(Instant::now() < deadline, "no checkpoint at seq >= {min_seq} within {WAIT:?}: last {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `custody.audit_digest()` as JSON text (panics if there is no checkpoint).
pub fn audit_digest(c: &mut Client) -> String {
    let d: Option<String> = c.query_one("SELECT custody.audit_digest()::text", &[]).expect("audit_digest()").get(0);
    d.expect("audit_digest() is NULL: no checkpoint")
}

/// `verify_audit_chain(trusted_digests => digests, public_key => key)`.
pub fn verify_with(c: &mut Client, digests: Option<&str>, key: Option<&str>) -> Verify {
    let r = c
        .query_one(
            "SELECT ok, checked, first_bad_seq, reason FROM custody.verify_audit_chain(\
             trusted_digests => $1::text::jsonb, public_key => $2)",
            &[&digests, &key],
        )
        .expect("verify_audit_chain(trusted_digests, public_key)");
    Verify { ok: r.get(0), checked: r.get(1), first_bad_seq: r.get(2), reason: r.get(3) }
}

/// Writes `custody.export_audit()` to `path`, one line each, trailing newline.
pub fn export_to_file(c: &mut Client, path: &std::path::Path) -> Vec<String> {
    let lines: Vec<String> =
        c.query("SELECT * FROM custody.export_audit()", &[]).expect("export_audit()").iter().map(|r| r.get(0)).collect();
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write export");
    lines
}

// ---- Helpers of the attack tests (tests/trust_*.rs) ----

pub mod wire;

/// Runs cleanup statements (each on its own, errors ignored) in a fresh superuser session
/// when dropped, also when the test panics: roles, event triggers, tables a test created.
pub struct CleanupOnDrop {
    pub port: u16,
    pub sql: Vec<String>,
}

impl CleanupOnDrop {
    pub fn new(cluster: &Cluster) -> CleanupOnDrop {
        CleanupOnDrop { port: cluster.port, sql: Vec::new() }
    }
    /// Adds a statement; statements run in the order added.
    pub fn add(&mut self, sql: impl Into<String>) {
        self.sql.push(sql.into());
    }
}

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        let conn = format!("host=/tmp port={} user=postgres dbname=postgres application_name=cleanup", self.port);
        if let Ok(mut c) = Client::connect(&conn, NoTls) {
            for sql in &self.sql {
                if let Err(e) = c.simple_query(sql) {
                    eprintln!("cleanup {sql:?}: {e}");
                }
            }
        }
    }
}

/// A program of the PostgreSQL server under test (`CUSTODY_TEST_PGBIN`, as the Makefile
/// sets it; Debian's PostgreSQL 15 by default).
pub fn pg_program(name: &str) -> PathBuf {
    let bin = std::env::var("CUSTODY_TEST_PGBIN").ok().filter(|b| !b.is_empty());
    PathBuf::from(bin.unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())).join(name)
}

/// Runs `psql -X -v ON_ERROR_STOP=1 <args>` (the server's own client); returns (exit code,
/// stdout, stderr).
pub fn psql(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(pg_program("psql"))
        .args(["-X", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .output()
        .expect("run psql");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The server's error report of a failed statement (panics if it succeeded or failed
/// without one).
pub fn server_error<T: std::fmt::Debug>(r: Result<T, postgres::Error>, what: &str) -> postgres::error::DbError {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}) but should have failed"),
        Err(e) => e.as_db_error().cloned().unwrap_or_else(|| panic!("{what}: not a server error: {e}")),
    }
}

/// SQLSTATE, message and HINT of a failed statement (panics if it succeeded).
pub fn db_error<T: std::fmt::Debug>(r: Result<T, postgres::Error>, what: &str) -> (String, String, String) {
    let db = server_error(r, what);
    (db.code().code().to_string(), db.message().to_string(), db.hint().unwrap_or_default().to_string())
}

/// SQLSTATE, message and DETAIL of a failed statement (panics if it succeeded).
pub fn error_detail<T: std::fmt::Debug>(r: Result<T, postgres::Error>, what: &str) -> (String, String, String) {
    let db = server_error(r, what);
    (db.code().code().to_string(), db.message().to_string(), db.detail().unwrap_or_default().to_string())
}

/// Asserts the statement was denied by the policy gate (42501, the documented message);
/// returns DETAIL (the policies' reasons).
pub fn assert_denied<T: std::fmt::Debug>(r: Result<T, postgres::Error>, what: &str) -> String {
    let (code, message, detail) = error_detail(r, what);
    assert_eq!(code, "42501", "{what}: SQLSTATE {code}, message {message:?}, detail {detail:?}");
    assert!(
        message.contains("statement denied by pg_custody policy"),
        "{what}: 42501 but not a policy denial: {message:?} (detail {detail:?})"
    );
    detail
}

/// One stored record, the columns the attack tests look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Rec {
    pub seq: i64,
    pub class: String,
    pub command: String,
    pub outcome: String,
    pub sqlstate: Option<String>,
    pub statement: Option<String>,
    pub message: Option<String>,
    pub nesting_level: i32,
    pub session_user_name: String,
    pub objects: String,
    pub rows: Option<i64>,
}

/// Records of `table` (e.g. `custody.audit_log`) matching `condition` (SQL over its columns,
/// parameters $1..), in seq order.
pub fn records_where(
    c: &mut Client,
    table: &str,
    condition: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Vec<Rec> {
    let sql = format!(
        "SELECT seq, class, command, outcome, sqlstate, statement, message, nesting_level, \
         session_user_name, objects::text, rows FROM {table} WHERE {condition} ORDER BY seq"
    );
    c.query(sql.as_str(), params)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| Rec {
            seq: r.get(0),
            class: r.get(1),
            command: r.get(2),
            outcome: r.get(3),
            sqlstate: r.get(4),
            statement: r.get(5),
            message: r.get(6),
            nesting_level: r.get(7),
            session_user_name: r.get(8),
            objects: r.get(9),
            rows: r.get(10),
        })
        .collect()
}

/// Records of custody.audit_log whose statement is exactly `statement`.
pub fn records_of_statement(c: &mut Client, statement: &str) -> Vec<Rec> {
    records_where(c, "custody.audit_log", "statement = $1", &[&statement])
}

/// Asserts `statement` has exactly one record, with this outcome and SQLSTATE; returns it.
pub fn assert_recorded(c: &mut Client, statement: &str, outcome: &str, sqlstate: Option<&str>) -> Rec {
    let recs = records_of_statement(c, statement);
    assert_eq!(recs.len(), 1, "expected one record of {statement:?}, found {recs:?}");
    let r = recs.into_iter().next().unwrap();
    assert_eq!(
        (r.outcome.as_str(), r.sqlstate.as_deref()),
        (outcome, sqlstate),
        "record of {statement:?}: {r:?}"
    );
    r
}

/// Restarts the cluster with the library (must run while unloaded) without waiting for the
/// writer to append (for tests where it is expected to refuse, or the schema was renamed).
pub fn restart_loaded_nowait(cluster: &Cluster) {
    let mut c = cluster.connect("harness");
    c.batch_execute("ALTER SYSTEM RESET shared_preload_libraries").expect("reload");
    drop(c);
    cluster.start();
}

/// The writer's pid from `custody.status()` (None when no writer runs).
pub fn writer_pid(c: &mut Client) -> Option<i32> {
    let pid: Option<i64> = c
        .query_one("SELECT (custody.status()->>'writer_pid')::int8", &[])
        .expect("custody.status()")
        .get(0);
    pid.map(|p| p as i32)
}

/// Waits (bounded by `within`) until a writer other than `old` runs and appends; returns its pid.
pub fn wait_new_writer(c: &mut Client, old: i32, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let r = c
            .query_one("SELECT (custody.status()->>'writer_pid')::int8, custody.status()->>'state'", &[])
            .expect("custody.status()");
        let (pid, state): (Option<i64>, Option<String>) = (r.get(0), r.get(1));
        if let Some(p) = pid.filter(|&p| p as i32 != old) {
            if state.as_deref() == Some("appending") {
                return p as i32;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new appending writer within {within:?} after pid {old} ended: pid {pid:?}, state {state:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` and returns its result with the time it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// Runs a command as the postgres OS user (for files the server must own or write).
pub fn as_postgres(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .output()
        .expect("run as postgres");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
