//! Building the Rego input document straight as regorus values.
//!
//! The gate runs on every statement, so the input is not written as JSON text
//! and parsed back: the fixed keys are allocated once per gate and shared by
//! reference count, and only the per-statement strings are allocated.

use std::collections::BTreeMap;

use regorus::Value;

use crate::time::{civil_from_unix_us, rfc3339_from_unix_us, unix_seconds, WEEKDAYS};

/// The identity a statement runs under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectInput {
    pub session_user: String,
    pub current_user: String,
    /// Every role current_user is a member of, transitively, incl. itself.
    pub roles: Vec<String>,
}

/// Everything about one statement that goes into the input document.
#[derive(Clone, Copy, Debug)]
pub struct StatementInput<'a> {
    pub subject: &'a SubjectInput,
    /// Command tag, e.g. `SELECT`, `CREATE TABLE`.
    pub command: &'a str,
    /// JSON array text of {schema,name,kind,privileges,columns}.
    pub objects_json: &'a str,
    pub client_addr: Option<&'a str>,
    pub application_name: Option<&'a str>,
    pub now_unix_us: i64,
    pub pid: i32,
    pub backend_start_unix_us: i64,
    /// Statements run by this session so far.
    pub statements: u64,
}

/// Interned key strings of the input document.
pub(crate) struct Keys {
    subject: Value,
    session_user: Value,
    current_user: Value,
    roles: Value,
    attributes: Value,
    command: Value,
    objects: Value,
    client: Value,
    addr: Value,
    application_name: Value,
    time: Value,
    now: Value,
    unix: Value,
    hour: Value,
    weekday: Value,
    session: Value,
    pid: Value,
    backend_start: Value,
    statements: Value,
    action: Value,
    resource: Value,
    weekdays: [Value; 7],
}

impl Keys {
    pub(crate) fn new() -> Self {
        let k = |s: &str| Value::from(s);
        Keys {
            subject: k("subject"),
            session_user: k("session_user"),
            current_user: k("current_user"),
            roles: k("roles"),
            attributes: k("attributes"),
            command: k("command"),
            objects: k("objects"),
            client: k("client"),
            addr: k("addr"),
            application_name: k("application_name"),
            time: k("time"),
            now: k("now"),
            unix: k("unix"),
            hour: k("hour"),
            weekday: k("weekday"),
            session: k("session"),
            pid: k("pid"),
            backend_start: k("backend_start"),
            statements: k("statements"),
            action: k("action"),
            resource: k("resource"),
            weekdays: WEEKDAYS.map(Value::from),
        }
    }

    /// `{session_user, current_user, roles, attributes}`.
    pub(crate) fn subject(&self, s: &SubjectInput, attributes: Value) -> Value {
        let roles: Vec<Value> = s.roles.iter().map(|r| Value::from(r.as_str())).collect();
        let mut m = BTreeMap::new();
        m.insert(
            self.session_user.clone(),
            Value::from(s.session_user.as_str()),
        );
        m.insert(
            self.current_user.clone(),
            Value::from(s.current_user.as_str()),
        );
        m.insert(self.roles.clone(), Value::from(roles));
        m.insert(self.attributes.clone(), attributes);
        Value::from(m)
    }

    /// The whole document for one statement; `objects` is already parsed.
    pub(crate) fn statement(&self, st: &StatementInput, subject: Value, objects: Value) -> Value {
        let opt = |s: Option<&str>| s.map_or(Value::Null, Value::from);
        let c = civil_from_unix_us(st.now_unix_us);

        let mut client = BTreeMap::new();
        client.insert(self.addr.clone(), opt(st.client_addr));
        client.insert(self.application_name.clone(), opt(st.application_name));

        let mut time = BTreeMap::new();
        time.insert(
            self.now.clone(),
            Value::from(rfc3339_from_unix_us(st.now_unix_us)),
        );
        time.insert(self.unix.clone(), Value::from(unix_seconds(st.now_unix_us)));
        time.insert(self.hour.clone(), Value::from(c.hour));
        time.insert(
            self.weekday.clone(),
            self.weekdays[c.weekday as usize].clone(),
        );

        let mut session = BTreeMap::new();
        session.insert(self.pid.clone(), Value::from(st.pid));
        session.insert(
            self.backend_start.clone(),
            Value::from(rfc3339_from_unix_us(st.backend_start_unix_us)),
        );
        session.insert(self.statements.clone(), Value::from(st.statements));

        let mut doc = BTreeMap::new();
        doc.insert(self.subject.clone(), subject);
        doc.insert(self.command.clone(), Value::from(st.command));
        doc.insert(self.objects.clone(), objects);
        doc.insert(self.client.clone(), Value::from(client));
        doc.insert(self.time.clone(), Value::from(time));
        doc.insert(self.session.clone(), Value::from(session));
        Value::from(doc)
    }

    /// `{subject, action, resource}` for `custody.check`.
    pub(crate) fn row(&self, subject: Value, action: &str, resource: Value) -> Value {
        let mut doc = BTreeMap::new();
        doc.insert(self.subject.clone(), subject);
        doc.insert(self.action.clone(), Value::from(action));
        doc.insert(self.resource.clone(), resource);
        Value::from(doc)
    }
}

/// Appends `v` as JSON with object keys sorted, so that equal JSON values
/// give equal text whatever order their keys came in (serde_json keeps
/// insertion order when another crate enables its `preserve_order`).
pub(crate) fn write_canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => write_json_string(s, out),
        J::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(e, out);
            }
            out.push(']');
        }
        J::Object(o) => {
            let mut entries: Vec<(&String, &J)> = o.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, e)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(k, out);
                out.push(':');
                write_canonical_json(e, out);
            }
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    // serde_json's own escaping; writing a &str to a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("string serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_and_escapes() {
        let mut a = String::new();
        write_canonical_json(
            &json!({"b": [1, {"z": null, "a": "q\"\n"}], "a": 1.5}),
            &mut a,
        );
        assert_eq!(a, r#"{"a":1.5,"b":[1,{"a":"q\"\n","z":null}]}"#);
        let mut b = String::new();
        write_canonical_json(
            &serde_json::from_str(r#"{"a":1.5,"b":[1,{"z":null,"a":"q\"\n"}]}"#).unwrap(),
            &mut b,
        );
        assert_eq!(a, b);
    }
}
