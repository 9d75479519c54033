//! The queue's wire format: how a session hands a captured record to the custody writer.
//! Pure: no pg_sys, unit-tested. This is an internal, same-binary format (never stored);
//! the stored, hashed format is `custody_chain::Record`.

use super::class::Class;

/// What a session knows about a statement. The writer adds `seq`, `logged_at` and the hashes.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Captured {
    pub event_time: i64,
    pub database_name: String,
    pub session_user_name: String,
    pub current_user_name: String,
    pub client_addr: Option<String>,
    pub application_name: Option<String>,
    pub backend_pid: i32,
    pub nesting_level: i32,
    pub xid: Option<i64>,
    pub class: u8,
    pub command: String,
    /// Canonical JSON text of the objects array.
    pub objects: String,
    pub statement: Option<String>,
    pub statement_sha256: Option<[u8; 32]>,
    pub rows: Option<i64>,
    pub outcome: Outcome,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    /// Canonical JSON text of the decision, if any.
    pub decision: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Outcome {
    #[default]
    Success = 0,
    Error = 1,
    Denied = 2,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
        }
    }
    fn from_u8(v: u8) -> Option<Outcome> {
        match v {
            0 => Some(Outcome::Success),
            1 => Some(Outcome::Error),
            2 => Some(Outcome::Denied),
            _ => None,
        }
    }
}

impl Captured {
    pub fn class(&self) -> Class {
        Class::from_u8(self.class).unwrap_or(Class::Misc)
    }

    /// Appends the encoding to `out`. Layout: fixed-width integers little-endian, strings as
    /// u32 length + bytes, optional values behind a 0/1 byte.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.event_time.to_le_bytes());
        put_str(out, &self.database_name);
        put_str(out, &self.session_user_name);
        put_str(out, &self.current_user_name);
        put_opt_str(out, self.client_addr.as_deref());
        put_opt_str(out, self.application_name.as_deref());
        out.extend_from_slice(&self.backend_pid.to_le_bytes());
        out.extend_from_slice(&self.nesting_level.to_le_bytes());
        put_opt_i64(out, self.xid);
        out.push(self.class);
        put_str(out, &self.command);
        put_str(out, &self.objects);
        put_opt_str(out, self.statement.as_deref());
        match &self.statement_sha256 {
            Some(h) => {
                out.push(1);
                out.extend_from_slice(h);
            }
            None => out.push(0),
        }
        put_opt_i64(out, self.rows);
        out.push(self.outcome as u8);
        put_opt_str(out, self.sqlstate.as_deref());
        put_opt_str(out, self.message.as_deref());
        put_opt_str(out, self.decision.as_deref());
    }

    pub fn encoded_len_hint(&self) -> usize {
        96 + self.database_name.len()
            + self.session_user_name.len()
            + self.current_user_name.len()
            + self.command.len()
            + self.objects.len()
            + self.statement.as_ref().map_or(0, |s| s.len())
            + self.message.as_ref().map_or(0, |s| s.len())
    }

    pub fn decode(buf: &[u8]) -> Result<Captured, WireError> {
        let mut c = Captured::default();
        c.decode_into(buf)?;
        Ok(c)
    }

    /// `decode` into this record, reusing the memory its strings hold (the writer decodes
    /// every record of a batch into records it keeps from batch to batch). After an Err the
    /// fields are partly overwritten.
    pub fn decode_into(&mut self, buf: &[u8]) -> Result<(), WireError> {
        let mut r = Reader { buf, pos: 0 };
        self.event_time = r.i64()?;
        r.string(&mut self.database_name)?;
        r.string(&mut self.session_user_name)?;
        r.string(&mut self.current_user_name)?;
        r.opt_string(&mut self.client_addr)?;
        r.opt_string(&mut self.application_name)?;
        self.backend_pid = r.i32()?;
        self.nesting_level = r.i32()?;
        self.xid = r.opt_i64()?;
        self.class = r.u8()?;
        r.string(&mut self.command)?;
        r.string(&mut self.objects)?;
        r.opt_string(&mut self.statement)?;
        self.statement_sha256 = if r.u8()? == 1 {
            let mut h = [0u8; 32];
            h.copy_from_slice(r.take(32)?);
            Some(h)
        } else {
            None
        };
        self.rows = r.opt_i64()?;
        self.outcome = Outcome::from_u8(r.u8()?).ok_or(WireError)?;
        r.opt_string(&mut self.sqlstate)?;
        r.opt_string(&mut self.message)?;
        r.opt_string(&mut self.decision)?;
        if r.pos != buf.len() {
            return Err(WireError);
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct WireError;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().map_err(|_| WireError)?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| WireError)?))
    }
    /// A string into `out`, in the memory it holds already when that is large enough.
    fn string(&mut self, out: &mut String) -> Result<(), WireError> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| WireError)?) as usize;
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| WireError)?;
        out.clear();
        out.push_str(s);
        Ok(())
    }
    fn opt_string(&mut self, out: &mut Option<String>) -> Result<(), WireError> {
        if self.u8()? == 1 {
            self.string(out.get_or_insert_with(String::new))
        } else {
            *out = None;
            Ok(())
        }
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, WireError> {
        Ok(if self.u8()? == 1 { Some(self.i64()?) } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Captured {
        Captured {
            event_time: 1_700_000_000_123_456,
            database_name: "postgres".into(),
            session_user_name: "alice".into(),
            current_user_name: "app_rw".into(),
            client_addr: Some("192.0.2.7".into()),
            application_name: Some("psql".into()),
            backend_pid: 4242,
            nesting_level: 1,
            xid: Some(7_000_000_001),
            class: Class::Write as u8,
            command: "INSERT".into(),
            objects: r#"[{"kind":"table","name":"t","schema":"public"}]"#.into(),
            statement: Some("INSERT INTO t VALUES (1) -- é".into()),
            statement_sha256: Some([7u8; 32]),
            rows: Some(1),
            outcome: Outcome::Error,
            sqlstate: Some("23505".into()),
            message: Some("duplicate key".into()),
            decision: None,
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let mut buf = Vec::new();
        c.encode_into(&mut buf);
        assert_eq!(Captured::decode(&buf).unwrap(), c);
        let d = Captured::default();
        buf.clear();
        d.encode_into(&mut buf);
        assert_eq!(Captured::decode(&buf).unwrap(), d);
    }

    /// Decoding into a record that held another one (the writer's reused records) leaves
    /// nothing of the old one: every optional field present in one and absent in the other.
    #[test]
    fn decode_into_overwrites_every_field() {
        let (full, empty) = (sample(), Captured { decision: Some("{}".into()), ..Captured::default() });
        let (mut a, mut b) = (Vec::new(), Vec::new());
        full.encode_into(&mut a);
        empty.encode_into(&mut b);
        let mut c = full.clone();
        c.decode_into(&b).unwrap();
        assert_eq!(c, empty);
        c.decode_into(&a).unwrap();
        assert_eq!(c, full);
    }

    #[test]
    fn truncated_or_padded_input_is_refused() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        for cut in [0, 1, 8, buf.len() / 2, buf.len() - 1] {
            assert_eq!(Captured::decode(&buf[..cut]), Err(WireError), "cut at {cut}");
        }
        buf.push(0);
        assert_eq!(Captured::decode(&buf), Err(WireError));
    }
}
