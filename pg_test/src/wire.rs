//! A minimal PostgreSQL v3 frontend over the Unix socket `/tmp/.s.PGSQL.<port>`, std only,
//! for what the `postgres` crate cannot send: the fast-path FunctionCall message ('F') and
//! hand-made extended-protocol exchanges (Parse/Bind/Execute/Sync) whose failure happens at a
//! chosen step. Trust authentication only (the test clusters use `initdb --auth=trust`).
//!
//! Message layouts: PostgreSQL documentation, "Frontend/Backend Protocol", "Message Formats".

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// An ErrorResponse: its SQLSTATE ('C') and message ('M'), and every field by its code.
#[derive(Debug, Clone, PartialEq)]
pub struct PgError {
    pub sqlstate: String,
    pub message: String,
    pub fields: Vec<(u8, String)>,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.sqlstate, self.message)
    }
}

/// A value sent as a function argument or a bind parameter.
#[derive(Debug, Clone)]
pub enum Arg {
    Null,
    /// Text format (format code 0).
    Text(String),
    /// Binary format (format code 1), already in network byte order.
    Binary(Vec<u8>),
}

impl Arg {
    /// An int4 in binary format.
    pub fn int4(v: i32) -> Arg {
        Arg::Binary(v.to_be_bytes().to_vec())
    }
    /// An int8 in binary format.
    pub fn int8(v: i64) -> Arg {
        Arg::Binary(v.to_be_bytes().to_vec())
    }
    pub fn text(v: &str) -> Arg {
        Arg::Text(v.to_string())
    }
    fn format(&self) -> i16 {
        matches!(self, Arg::Binary(_)) as i16
    }
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Arg::Null => buf.extend_from_slice(&(-1i32).to_be_bytes()),
            Arg::Text(s) => put_bytes(buf, s.as_bytes()),
            Arg::Binary(b) => put_bytes(buf, b),
        }
    }
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
    buf.extend_from_slice(b);
}

fn put_cstr(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
}

/// One backend message: its type byte and body.
struct Msg {
    tag: u8,
    body: Vec<u8>,
}

/// An open, authenticated connection, idle (ReadyForQuery seen).
pub struct Conn {
    sock: UnixStream,
    /// ParameterStatus values sent by the server (server_version, ...).
    pub params: Vec<(String, String)>,
    /// Backend process id from BackendKeyData.
    pub pid: i32,
    /// NoticeResponse messages received so far, as (sqlstate, message).
    pub notices: Vec<(String, String)>,
}

impl Conn {
    /// Connects to `/tmp/.s.PGSQL.<port>` as `user` to `database`. A refused startup
    /// (unknown role, unknown database, ...) is the server's ErrorResponse.
    pub fn connect(port: u16, user: &str, database: &str, application_name: &str) -> Result<Conn, PgError> {
        let path = format!("/tmp/.s.PGSQL.{port}");
        let sock = UnixStream::connect(&path).map_err(|e| local_error(format!("connect {path}: {e}")))?;
        sock.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut c = Conn { sock, params: Vec::new(), pid: 0, notices: Vec::new() };
        // StartupMessage: no type byte; length, protocol 3.0, name/value pairs, terminator.
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [("user", user), ("database", database), ("application_name", application_name)] {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        c.sock.write_all(&msg).map_err(io_error)?;
        loop {
            let m = c.read()?;
            match m.tag {
                b'R' => {
                    let code = i32::from_be_bytes(m.body[0..4].try_into().unwrap());
                    if code != 0 {
                        return Err(local_error(format!("authentication request {code}: only trust is supported")));
                    }
                }
                b'S' => {
                    let mut parts = m.body.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
                    let (k, v) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                    c.params.push((k, v));
                }
                b'K' => c.pid = i32::from_be_bytes(m.body[0..4].try_into().unwrap()),
                b'Z' => return Ok(c),
                b'E' => return Err(parse_error(&m.body)),
                b'N' => c.notice(&m.body),
                t => return Err(local_error(format!("unexpected message {:?} during startup", t as char))),
            }
        }
    }

    /// Fast-path FunctionCall of the function with OID `fn_oid`; the result is requested in
    /// `result_format` (0 text, 1 binary). Ok(None) is a NULL result.
    pub fn function_call(&mut self, fn_oid: u32, args: &[Arg], result_format: i16) -> Result<Option<Vec<u8>>, PgError> {
        let mut b = Vec::new();
        b.extend_from_slice(&fn_oid.to_be_bytes());
        b.extend_from_slice(&(args.len() as i16).to_be_bytes());
        for a in args {
            b.extend_from_slice(&a.format().to_be_bytes());
        }
        b.extend_from_slice(&(args.len() as i16).to_be_bytes());
        for a in args {
            a.put(&mut b);
        }
        b.extend_from_slice(&result_format.to_be_bytes());
        self.send(b'F', &b)?;
        let mut result = None;
        let mut error = None;
        loop {
            let m = self.read()?;
            match m.tag {
                b'V' => {
                    let n = i32::from_be_bytes(m.body[0..4].try_into().unwrap());
                    result = (n >= 0).then(|| m.body[4..4 + n as usize].to_vec());
                }
                b'E' => error = Some(parse_error(&m.body)),
                b'N' => self.notice(&m.body),
                b'Z' => break,
                _ => {}
            }
        }
        error.map_or(Ok(result), Err)
    }

    /// Parse (unnamed statement, parameter types `param_types`), Bind (text-format
    /// `params`, text results), Execute (all rows), Sync. Returns the rows as text values, or
    /// the first error (PostgreSQL skips to Sync after it).
    pub fn extended(&mut self, sql: &str, param_types: &[u32], params: &[Arg]) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let mut p = Vec::new();
        put_cstr(&mut p, "");
        put_cstr(&mut p, sql);
        p.extend_from_slice(&(param_types.len() as i16).to_be_bytes());
        for t in param_types {
            p.extend_from_slice(&t.to_be_bytes());
        }
        let mut b = Vec::new();
        put_cstr(&mut b, "");
        put_cstr(&mut b, "");
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for a in params {
            b.extend_from_slice(&a.format().to_be_bytes());
        }
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for a in params {
            a.put(&mut b);
        }
        b.extend_from_slice(&0i16.to_be_bytes()); // results: all text
        let mut e = Vec::new();
        put_cstr(&mut e, "");
        e.extend_from_slice(&0i32.to_be_bytes());
        self.send(b'P', &p)?;
        self.send(b'B', &b)?;
        self.send(b'E', &e)?;
        self.send(b'S', &[])?;
        self.collect_rows()
    }

    /// A simple Query; rows of every statement in it, as text, or the first error.
    pub fn simple(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let mut q = Vec::new();
        put_cstr(&mut q, sql);
        self.send(b'Q', &q)?;
        self.collect_rows()
    }

    /// Reads until ReadyForQuery, gathering DataRows and the first ErrorResponse.
    fn collect_rows(&mut self) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let m = self.read()?;
            match m.tag {
                b'D' => rows.push(parse_row(&m.body)),
                b'E' => {
                    if error.is_none() {
                        error = Some(parse_error(&m.body))
                    }
                }
                b'N' => self.notice(&m.body),
                b'Z' => break,
                _ => {} // ParseComplete, BindComplete, RowDescription, CommandComplete, ...
            }
        }
        error.map_or(Ok(rows), Err)
    }

    fn notice(&mut self, body: &[u8]) {
        let e = parse_error(body);
        self.notices.push((e.sqlstate, e.message));
    }

    fn send(&mut self, tag: u8, body: &[u8]) -> Result<(), PgError> {
        let mut msg = vec![tag];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(body);
        self.sock.write_all(&msg).map_err(io_error)
    }

    fn read(&mut self) -> Result<Msg, PgError> {
        let mut head = [0u8; 5];
        self.sock.read_exact(&mut head).map_err(io_error)?;
        let len = i32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.sock.read_exact(&mut body).map_err(io_error)?;
        Ok(Msg { tag: head[0], body })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Terminate, so the server ends the session cleanly.
        let _ = self.send(b'X', &[]);
    }
}

fn parse_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes(body[0..2].try_into().unwrap()) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned()));
            at += len as usize;
        }
    }
    row
}

fn parse_error(body: &[u8]) -> PgError {
    let mut e = PgError { sqlstate: String::new(), message: String::new(), fields: Vec::new() };
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => e.sqlstate = value.clone(),
            b'M' => e.message = value.clone(),
            _ => {}
        }
        e.fields.push((field[0], value));
    }
    e
}

/// An error of this client (I/O, unsupported authentication), not of the server: no SQLSTATE.
fn local_error(message: String) -> PgError {
    PgError { sqlstate: String::new(), message, fields: Vec::new() }
}

fn io_error(e: std::io::Error) -> PgError {
    local_error(format!("socket: {e}"))
}
