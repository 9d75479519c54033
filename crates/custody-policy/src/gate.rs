//! The per-backend gate: one compiled engine per snapshot generation, asked
//! once per statement (`decide`) and once per distinct row resource
//! (`row_allow`).
//!
//! Fail closed everywhere: a policy that errors at run time denies the
//! statement; a `row_allow` that errors is an error for the caller to raise.

use std::collections::{BTreeMap, HashMap};

use regorus::{Engine, Value};
use sha2::{Digest, Sha256};

use crate::compile::{add_module, check_functions, new_engine, prepare, LocatedError};
use crate::input::{write_canonical_json, Keys, StatementInput, SubjectInput};
use crate::snapshot::Snapshot;
use crate::split::split;

const DENY: &str = "data.custody.deny";
const ALLOW: &str = "data.custody.allow";
const ROW_ALLOW: &str = "data.custody.row_allow";

/// The outcome of one statement, as recorded in the audit chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Why it was denied (policy messages, a suspension, an error); empty when allowed.
    pub reasons: Vec<String>,
    /// Enabled policies in force, (name, version), sorted by name.
    pub policies: Vec<(String, i64)>,
    /// The suspended role that denied the statement, if that is why.
    pub suspended_role: Option<String>,
    /// Short id of the policy set, as `Gate::policy_set`.
    pub policy_set: String,
}

impl Decision {
    /// `{"allowed":bool,"reasons":[...],"policies":[{"name":..,"version":..}],"policy_set":"<short id>"}`,
    /// plus `"suspended_role"` when a suspension decided.
    pub fn to_json(&self) -> serde_json::Value {
        let policies: Vec<serde_json::Value> = self
            .policies
            .iter()
            .map(|(name, version)| serde_json::json!({"name": name, "version": version}))
            .collect();
        let mut v = serde_json::json!({
            "allowed": self.allowed,
            "reasons": self.reasons,
            "policies": policies,
            "policy_set": self.policy_set,
        });
        if let Some(role) = &self.suspended_role {
            v["suspended_role"] = serde_json::Value::from(role.as_str());
        }
        v
    }
}

/// An attribute with its value already converted for the engine.
struct HeldAttribute {
    key: String,
    json: serde_json::Value,
    value: Value,
    valid_from: i64,
    valid_until: Option<i64>,
}

impl HeldAttribute {
    fn is_valid_at(&self, now: i64) -> bool {
        self.valid_from <= now && self.valid_until.is_none_or(|end| now < end)
    }
}

/// Which of the contract's rules some enabled module declares.
#[derive(Clone, Copy, Default)]
struct Declared {
    deny: bool,
    allow: bool,
    row_allow: bool,
}

pub struct Gate {
    generation: u64,
    policy_set: String,
    policies: Vec<(String, i64)>,
    /// None when no policy is enabled. regorus' tree-walking interpreter, not
    /// its bytecode VM: the VM (0.14.1) is about three times faster but turns
    /// run-time errors (division by zero, conflicting rule values, bad
    /// builtin arguments) into `undefined`, which would make a broken deny
    /// rule allow: the gate must fail closed.
    engine: Option<Engine>,
    declared: Declared,
    /// role -> attributes, ordered by valid_from so a later grant of the same key wins.
    attributes: HashMap<String, Vec<HeldAttribute>>,
    /// role -> reason.
    suspensions: HashMap<String, String>,
    keys: Keys,
    /// The last `objects_json` text and its parsed value: consecutive
    /// statements often touch the same objects.
    objects_cache: Option<(String, Value)>,
    /// (subject, action, canonical resource) -> row_allow, for this statement.
    row_memo: HashMap<String, bool>,
    row_key: String,
    row_evaluations: u64,
    /// Whether decisions depend only on inputs that repeat (see `decisions_cacheable`).
    cacheable: bool,
    /// Memoized statement decisions of this snapshot, keyed by `decision_key`.
    decision_memo: HashMap<String, Result<(), Vec<String>>>,
    /// When not `cacheable` as a whole: the set cut into a part whose outcome is
    /// memoized and a part evaluated on every statement (see `split.rs`).
    split: Option<SplitGate>,
    decision_key_buf: String,
    statement_evaluations: u64,
    /// Every instant an attribute starts or ends, sorted (see `decisions_hold`).
    boundaries: Vec<i64>,
}

/// A policy set cut in two by `split::split`.
struct SplitGate {
    stable: Engine,
    volatile: Engine,
    allow_volatile: bool,
    stable_deny: bool,
    volatile_deny: bool,
    /// `decision_key` -> what the stable part says.
    memo: HashMap<String, StableOutcome>,
}

/// The stable part's `deny`, and its `allow` when that is stable and `deny` was empty.
#[derive(Clone)]
struct StableOutcome {
    deny: Result<Value, String>,
    allow: Option<Result<Value, String>>,
}

/// The reason when `allow` is declared and not true.
const NOT_ALLOWED: &str = "not allowed: data.custody.allow is not true";

/// Remembers a decision, starting over when the memo is full. Callers never pass a failed
/// evaluation: it may be a time limit, which another try may not hit.
fn remember<V>(memo: &mut HashMap<String, V>, key: &str, value: V) {
    if memo.len() >= DECISION_MEMO_LIMIT {
        memo.clear();
    }
    memo.insert(key.to_string(), value);
}

/// Most decisions a gate remembers before starting over.
const DECISION_MEMO_LIMIT: usize = 4096;

/// The input paths a policy may read and still have its decisions memoized: everything
/// except `input.time.now`, `input.time.unix` and `input.session`, which change with every
/// statement. Decided by scanning the sources, conservatively: any other use of `input`
/// (the whole document, `input[...]`) or a non-deterministic builtin disables the memo.
/// `input.action` and `input.resource` belong to row checks; in a statement's input they
/// are always absent, so reading them does not vary.
fn decisions_cacheable(sources: &[&str]) -> bool {
    const ALLOWED: [&str; 8] = [
        ".subject",
        ".command",
        ".objects",
        ".client",
        ".time.hour",
        ".time.weekday",
        ".action",
        ".resource",
    ];
    const VOLATILE: [&str; 6] = [
        "time.now_ns",
        "rand.",
        "uuid.",
        "http.send",
        "opa.runtime",
        "trace(",
    ];
    for src in sources {
        if VOLATILE.iter().any(|v| src.contains(v)) {
            return false;
        }
        let bytes = src.as_bytes();
        let mut from = 0;
        while let Some(i) = src[from..].find("input") {
            let at = from + i;
            from = at + 5;
            let before_ok = at == 0
                || !(bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b'.');
            let after = &src[at + 5..];
            let after_ident = after
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !before_ok || after_ident {
                continue; // part of another word (e.g. `my_input`, `inputs`)
            }
            if !ALLOWED.iter().any(|p| {
                after.starts_with(p)
                    && !after[p.len()..]
                        .bytes()
                        .next()
                        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            }) {
                return false;
            }
        }
    }
    true
}

impl Gate {
    /// Compiles every enabled policy of the snapshot into one engine (done once per snapshot generation per backend).
    pub fn build(snapshot: &Snapshot) -> Result<Gate, String> {
        let mut enabled: Vec<_> = snapshot.policies.iter().filter(|p| p.enabled).collect();
        enabled.sort_by(|a, b| a.name.cmp(&b.name));
        let policies: Vec<(String, i64)> = enabled
            .iter()
            .map(|p| (p.name.clone(), p.version))
            .collect();

        let sources: Vec<&str> = enabled.iter().map(|p| p.source.as_str()).collect();
        let cacheable = decisions_cacheable(&sources);
        let mut declared = Declared::default();
        let engine = if enabled.is_empty() {
            None
        } else {
            let mut engine = new_engine();
            for p in &enabled {
                add_module(&mut engine, &p.name, &p.source)
                    .map_err(|e| format!("policy {} (version {}): {e}", p.name, p.version))?;
                let has = |rule: &str| {
                    engine
                        .has_declared_rule_rooted_at(&p.name, rule)
                        .unwrap_or(false)
                };
                declared.deny |= has("deny");
                declared.allow |= has("allow");
                declared.row_allow |= has("row_allow");
            }
            // Analyse now, so that the first statement does not pay for it
            // and a set that does not compile together is refused here.
            prepare(&mut engine)
                .map_err(|e| format!("policy set does not compile: {}", e.one_line()))?;
            let names: Vec<&str> = enabled.iter().map(|p| p.name.as_str()).collect();
            check_functions(&mut engine, &names)
                .map_err(|e| format!("policy set does not compile: {e}"))?;
            Some(engine)
        };
        let split = if cacheable || engine.is_none() {
            None
        } else {
            SplitGate::build(
                &enabled
                    .iter()
                    .map(|p| (p.name.as_str(), p.source.as_str()))
                    .collect::<Vec<_>>(),
            )
        };

        let mut attributes: HashMap<String, Vec<HeldAttribute>> = HashMap::new();
        for a in &snapshot.attributes {
            attributes
                .entry(a.role.clone())
                .or_default()
                .push(HeldAttribute {
                    key: a.key.clone(),
                    json: a.value.clone(),
                    value: Value::from(a.value.clone()),
                    valid_from: a.valid_from,
                    valid_until: a.valid_until,
                });
        }
        for list in attributes.values_mut() {
            list.sort_by_key(|a| a.valid_from);
        }
        let mut boundaries: Vec<i64> = snapshot
            .attributes
            .iter()
            .flat_map(|a| std::iter::once(a.valid_from).chain(a.valid_until))
            .collect();
        boundaries.sort_unstable();
        boundaries.dedup();

        Ok(Gate {
            generation: snapshot.generation,
            policy_set: policy_set_id(&policies),
            policies,
            engine,
            declared,
            attributes,
            suspensions: snapshot
                .suspensions
                .iter()
                .map(|s| (s.role.clone(), s.reason.clone()))
                .collect(),
            keys: Keys::new(),
            objects_cache: None,
            row_memo: HashMap::new(),
            row_key: String::new(),
            row_evaluations: 0,
            cacheable,
            decision_memo: HashMap::new(),
            split,
            decision_key_buf: String::new(),
            statement_evaluations: 0,
            boundaries,
        })
    }

    /// Evaluates the set once on plain statements, as the gate would: a set whose rules
    /// cannot be evaluated together (a `deny := "text"` beside a `deny contains`, `allow :=
    /// true` beside `allow := false`, a builtin that fails on every input) would deny every
    /// gated statement with an evaluation error, so `set_policy` refuses it first. The error
    /// names the rule and the policy, as a denial would.
    pub fn check_evaluates(&mut self) -> Result<(), String> {
        if self.engine.is_none() {
            return Ok(());
        }
        let subject = SubjectInput {
            session_user: "custody_probe".into(),
            current_user: "custody_probe".into(),
            roles: Vec::new(),
        };
        let table = r#"[{"schema":"public","name":"custody_probe","kind":"table","privileges":["SELECT"],"columns":["id"]}]"#;
        for (command, objects) in [
            ("SELECT", "[]"),
            ("SELECT", table),
            ("INSERT", table),
            ("UPDATE", table),
            ("DELETE", table),
            ("CREATE TABLE", table),
            ("DROP TABLE", table),
        ] {
            let st = StatementInput {
                subject: &subject,
                command,
                objects_json: objects,
                client_addr: None,
                application_name: None,
                now_unix_us: 0,
                pid: 0,
                backend_start_unix_us: 0,
                statements: 1,
            };
            if let Err(reasons) = self.evaluate_statement(&st) {
                if let Some(e) = reasons.iter().find(|r| r.starts_with(EVALUATION_ERROR)) {
                    return Err(e[EVALUATION_ERROR.len()..].to_string());
                }
            }
        }
        self.statement_evaluations = 0;
        if self.declared.row_allow {
            let resource = serde_json::json!({"schema": "public", "table": "custody_probe"});
            self.row_allow(&subject, 0, "SELECT", &resource)?;
            self.row_memo.clear();
            self.row_evaluations = 0;
        }
        Ok(())
    }

    /// Whether every decision made at `from_us` is still the decision at `to_us` (Unix µs):
    /// the policy set reads nothing that changes with time or with each statement, and no
    /// attribute starts or ends in between. An open portal's next chunk is decided again
    /// only when this is false (or the snapshot changed).
    pub fn decisions_hold(&self, from_us: i64, to_us: i64) -> bool {
        if self.engine.is_some() && !self.cacheable {
            return false;
        }
        // The first instant after from_us at which an attribute starts or ends.
        let next = self.boundaries.partition_point(|&t| t <= from_us);
        self.boundaries.get(next).is_none_or(|&t| t > to_us)
    }

    /// True when there is nothing to check (no enabled policy, no suspension): the statement path then skips everything.
    /// (Enabled policies that declare neither `deny` nor `allow` only serve `row_allow`.)
    pub fn is_trivial(&self) -> bool {
        self.suspensions.is_empty() && !self.declared.deny && !self.declared.allow
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A short stable identifier of the policy set in force: the first 12 hex
    /// digits of SHA-256 over the sorted enabled (name, version) pairs.
    pub fn policy_set(&self) -> &str {
        &self.policy_set
    }

    /// Decides one statement: suspended if any of session_user/current_user/roles is suspended;
    /// else deny if data.custody.deny is non-empty; else if any enabled module defines
    /// data.custody.allow, it must be true.
    pub fn decide(&mut self, input: &StatementInput) -> Decision {
        let mut decision = Decision {
            allowed: true,
            reasons: Vec::new(),
            policies: self.policies.clone(),
            suspended_role: None,
            policy_set: self.policy_set.clone(),
        };
        if let Some((role, reason)) = self.suspended(input.subject) {
            decision.allowed = false;
            decision
                .reasons
                .push(format!("role {role} is suspended: {reason}"));
            decision.suspended_role = Some(role);
            return decision;
        }
        if !self.declared.deny && !self.declared.allow {
            return decision;
        }
        let result = if self.cacheable {
            self.decision_key(input);
            match self.decision_memo.get(&self.decision_key_buf) {
                Some(r) => r.clone(),
                None => {
                    let r = self.evaluate_statement(input);
                    let failed = r.as_ref().is_err_and(|reasons| {
                        reasons.iter().any(|m| m.starts_with(EVALUATION_ERROR))
                    });
                    if !failed {
                        remember(&mut self.decision_memo, &self.decision_key_buf, r.clone());
                    }
                    r
                }
            }
        } else if self.split.is_some() {
            self.evaluate_split(input)
        } else {
            self.evaluate_statement(input)
        };
        if let Err(reasons) = result {
            decision.allowed = false;
            decision.reasons = reasons;
        }
        decision
    }

    /// Everything a cacheable policy set can see of a statement, as one string.
    fn decision_key(&mut self, st: &StatementInput) {
        use std::fmt::Write;
        let civil = crate::time::civil_from_unix_us(st.now_unix_us);
        let attributes = self.attributes_of(&st.subject.current_user, st.now_unix_us);
        let k = &mut self.decision_key_buf;
        k.clear();
        let s = st.subject;
        let _ = write!(
            k,
            "{}\u{0}{}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{}\u{0}{}",
            s.session_user,
            s.current_user,
            s.roles,
            attributes,
            st.command,
            st.objects_json,
            st.client_addr,
            st.application_name,
            civil.hour,
            civil.weekday
        );
    }

    /// The split set: the stable part from the memo (evaluated on a miss), the volatile part
    /// now, their `deny` sets united, then `allow` from whichever part holds it. The same
    /// order and the same outcome as `evaluate_statement` over the whole set.
    fn evaluate_split(&mut self, st: &StatementInput) -> Result<(), Vec<String>> {
        self.decision_key(st);
        let doc = self.statement_doc(st)?;
        let declared_allow = self.declared.allow;
        let sg = self
            .split
            .as_mut()
            .expect("evaluate_split is called with a split");
        let stable = match sg.memo.get(&self.decision_key_buf) {
            Some(outcome) => outcome.clone(),
            None => {
                self.statement_evaluations += 1;
                let outcome = sg.evaluate_stable(doc.clone(), declared_allow);
                if outcome.deny.is_ok() && !matches!(outcome.allow, Some(Err(_))) {
                    remember(&mut sg.memo, &self.decision_key_buf, outcome.clone());
                }
                outcome
            }
        };
        let stable_deny = stable.deny.map_err(|e| vec![e])?;
        sg.volatile.set_input(doc);
        let volatile_deny = if sg.volatile_deny {
            sg.volatile
                .eval_rule(DENY.to_string())
                .map_err(|e| vec![evaluation_error(DENY, e)])?
        } else {
            Value::Undefined
        };
        // Both are sets (a split requires it) or undefined: their union is the whole set's
        // deny. Anything else is not what the analysis allowed for: fail closed.
        let deny = match (&stable_deny, &volatile_deny) {
            (Value::Set(a), Value::Set(b)) => Value::from(
                a.iter()
                    .chain(b.iter())
                    .cloned()
                    .collect::<std::collections::BTreeSet<Value>>(),
            ),
            (Value::Undefined, Value::Set(_) | Value::Undefined) => volatile_deny,
            (Value::Set(_), Value::Undefined) => stable_deny,
            _ => {
                return Err(vec![format!(
                    "{EVALUATION_ERROR}data.custody.deny of a split policy set is not a set"
                )])
            }
        };
        let messages = deny_messages(&deny);
        if !messages.is_empty() {
            return Err(messages);
        }
        if declared_allow {
            let allow = if sg.allow_volatile {
                sg.volatile
                    .eval_rule(ALLOW.to_string())
                    .map_err(|e| evaluation_error(ALLOW, e))
            } else {
                stable
                    .allow
                    .expect("a stable allow is evaluated when deny is empty")
            };
            if allow.map_err(|e| vec![e])? != Value::Bool(true) {
                return Err(vec![NOT_ALLOWED.to_string()]);
            }
        }
        Ok(())
    }

    /// The same gate evaluating its whole set on every statement, to compare against
    /// (tests and the gate benchmark).
    #[doc(hidden)]
    pub fn without_split(mut self) -> Gate {
        self.split = None;
        self
    }

    /// Whether this gate cut its policy set in two (see `split.rs`).
    #[doc(hidden)]
    pub fn is_split(&self) -> bool {
        self.split.is_some()
    }

    /// How many statements were evaluated by the engine (not answered from the memo).
    #[doc(hidden)]
    pub fn statement_evaluations(&self) -> u64 {
        self.statement_evaluations
    }

    /// The first of session_user, current_user, roles that is suspended.
    fn suspended(&self, s: &SubjectInput) -> Option<(String, String)> {
        if self.suspensions.is_empty() {
            return None;
        }
        std::iter::once(&s.session_user)
            .chain(std::iter::once(&s.current_user))
            .chain(s.roles.iter())
            .find_map(|r| {
                self.suspensions
                    .get(r)
                    .map(|reason| (r.clone(), reason.clone()))
            })
    }

    /// Ok when the policies let the statement through, else the reasons.
    fn evaluate_statement(&mut self, st: &StatementInput) -> Result<(), Vec<String>> {
        self.statement_evaluations += 1;
        let doc = self.statement_doc(st)?;
        let engine = self
            .engine
            .as_mut()
            .expect("rules are declared only when an engine exists");
        engine.set_input(doc);

        if self.declared.deny {
            let deny = engine
                .eval_rule(DENY.to_string())
                .map_err(|e| vec![evaluation_error(DENY, e)])?;
            let messages = deny_messages(&deny);
            if !messages.is_empty() {
                return Err(messages);
            }
        }
        if self.declared.allow {
            let allow = engine
                .eval_rule(ALLOW.to_string())
                .map_err(|e| vec![evaluation_error(ALLOW, e)])?;
            if allow != Value::Bool(true) {
                return Err(vec![NOT_ALLOWED.to_string()]);
            }
        }
        Ok(())
    }

    /// The input document of a statement.
    fn statement_doc(&mut self, st: &StatementInput) -> Result<Value, Vec<String>> {
        let objects = self.objects_value(st.objects_json).map_err(|e| vec![e])?;
        let subject = self.keys.subject(
            st.subject,
            self.attribute_value(&st.subject.current_user, st.now_unix_us),
        );
        Ok(self.keys.statement(st, subject, objects))
    }

    fn objects_value(&mut self, json: &str) -> Result<Value, String> {
        if let Some((text, value)) = &self.objects_cache {
            if text == json {
                return Ok(value.clone());
            }
        }
        let value = Value::from_json_str(json)
            .map_err(|e| format!("invalid objects JSON in policy input: {e}"))?;
        self.objects_cache = Some((json.to_string(), value.clone()));
        Ok(value)
    }

    /// Valid attributes of `role` as an engine object.
    fn attribute_value(&self, role: &str, now: i64) -> Value {
        let mut m = BTreeMap::new();
        for a in self
            .attributes
            .get(role)
            .into_iter()
            .flatten()
            .filter(|a| a.is_valid_at(now))
        {
            m.insert(Value::from(a.key.as_str()), a.value.clone());
        }
        Value::from(m)
    }

    /// Attributes of `role` valid at `now` as a JSON object {key: value}.
    pub fn attributes_of(&self, role: &str, now_unix_us: i64) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for a in self
            .attributes
            .get(role)
            .into_iter()
            .flatten()
            .filter(|a| a.is_valid_at(now_unix_us))
        {
            m.insert(a.key.clone(), a.json.clone());
        }
        serde_json::Value::Object(m)
    }

    /// `input.subject` as policies see it, for `custody.current_subject()`.
    pub fn subject_json(&self, subject: &SubjectInput, now_unix_us: i64) -> serde_json::Value {
        serde_json::json!({
            "session_user": subject.session_user,
            "current_user": subject.current_user,
            "roles": subject.roles,
            "attributes": self.attributes_of(&subject.current_user, now_unix_us),
        })
    }

    /// Row-level check for custody.check(action, resource): evaluates data.custody.row_allow with input {subject, action, resource};
    /// false when undefined. Memoized on (subject, action, canonical resource JSON) until `new_statement()` is called.
    pub fn row_allow(
        &mut self,
        subject: &SubjectInput,
        now_unix_us: i64,
        action: &str,
        resource: &serde_json::Value,
    ) -> Result<bool, String> {
        if !self.declared.row_allow {
            return Ok(false);
        }
        // Key layout: subject fields, action, then the resource last so that
        // its canonical text can be sliced back out for parsing on a miss.
        let key = &mut self.row_key;
        key.clear();
        for part in [&subject.session_user, &subject.current_user]
            .into_iter()
            .chain(&subject.roles)
        {
            key.push_str(part);
            key.push('\u{1f}');
        }
        key.push('\u{1e}');
        key.push_str(action);
        key.push('\u{1e}');
        let resource_at = key.len();
        write_canonical_json(resource, key);
        if let Some(&hit) = self.row_memo.get(key.as_str()) {
            return Ok(hit);
        }

        self.row_evaluations += 1;
        let resource_value =
            Value::from_json_str(&key[resource_at..]).map_err(|e| e.to_string())?;
        let subject_value = self.keys.subject(
            subject,
            self.attribute_value(&subject.current_user, now_unix_us),
        );
        let doc = self.keys.row(subject_value, action, resource_value);
        let engine = self
            .engine
            .as_mut()
            .expect("rules are declared only when an engine exists");
        engine.set_input(doc);
        let result = engine
            .eval_rule(ROW_ALLOW.to_string())
            .map_err(|e| evaluation_error(ROW_ALLOW, e))?;
        let allowed = result == Value::Bool(true);
        self.row_memo.insert(self.row_key.clone(), allowed);
        Ok(allowed)
    }

    /// Forgets row decisions: call at the start of each statement.
    pub fn new_statement(&mut self) {
        self.row_memo.clear();
    }

    /// How many times `row_allow` actually evaluated Rego (for tests of the memo).
    #[doc(hidden)]
    pub fn row_evaluations(&self) -> u64 {
        self.row_evaluations
    }
}

impl SplitGate {
    /// None when the set cannot be split, or the parts do not compile on their own (then the
    /// whole set is evaluated on every statement, as without a split).
    fn build(modules: &[(&str, &str)]) -> Option<SplitGate> {
        let parts = split(modules, |rule| decisions_cacheable(&[rule]))?;
        let engine_of = |part: &dyn Fn(&crate::split::SplitModule) -> &str| -> Option<Engine> {
            let mut engine = new_engine();
            for m in &parts.modules {
                add_module(&mut engine, &m.name, part(m)).ok()?;
            }
            prepare(&mut engine).ok()?;
            Some(engine)
        };
        Some(SplitGate {
            stable: engine_of(&|m| m.stable.as_str())?,
            volatile: engine_of(&|m| m.volatile.as_str())?,
            allow_volatile: parts.allow_volatile,
            stable_deny: parts.stable_deny,
            volatile_deny: parts.volatile_deny,
            memo: HashMap::new(),
        })
    }

    fn evaluate_stable(&mut self, doc: Value, declared_allow: bool) -> StableOutcome {
        self.stable.set_input(doc);
        let deny = if self.stable_deny {
            self.stable
                .eval_rule(DENY.to_string())
                .map_err(|e| evaluation_error(DENY, e))
        } else {
            Ok(Value::Undefined)
        };
        let deny_empty = deny.as_ref().is_ok_and(|d| deny_messages(d).is_empty());
        let allow = (declared_allow && !self.allow_volatile && deny_empty).then(|| {
            self.stable
                .eval_rule(ALLOW.to_string())
                .map_err(|e| evaluation_error(ALLOW, e))
        });
        StableOutcome { deny, allow }
    }
}

/// Messages of `data.custody.deny`. The contract says a set of messages, but
/// a boolean `deny if ...` or an array is what people write too: a true
/// boolean denies with a generic message; non-string members are shown as JSON.
fn deny_messages(deny: &Value) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.to_string(),
        other => other.to_json_str().unwrap_or_else(|_| format!("{other:?}")),
    };
    match deny {
        Value::Undefined | Value::Null | Value::Bool(false) => Vec::new(),
        Value::Bool(true) => vec!["denied by data.custody.deny".to_string()],
        Value::Set(s) => s.iter().map(text).collect(),
        Value::Array(a) => a.iter().map(text).collect(),
        Value::Object(o) => o.keys().map(text).collect(),
        other => vec![text(other)],
    }
}

/// How every reason that is an evaluation error (not a policy's message) begins.
const EVALUATION_ERROR: &str = "policy evaluation error: ";

/// `policy evaluation error: rule deny of policy NAME (NAME:LINE:COL): MESSAGE` from a
/// regorus error raised while `rule` (a `data.custody.` path) was evaluated: which module
/// and which rule failed, and where.
fn evaluation_error(rule: &str, e: impl std::fmt::Display) -> String {
    let rule = rule.strip_prefix("data.custody.").unwrap_or(rule);
    let located = LocatedError::parse(&e.to_string());
    match (&located.file, located.line, located.column) {
        (Some(f), Some(l), Some(c)) => format!(
            "{EVALUATION_ERROR}rule {rule} of policy {f} ({f}:{l}:{c}): {}",
            located.message
        ),
        _ => format!("{EVALUATION_ERROR}rule {rule}: {}", located.message),
    }
}

fn policy_set_id(policies: &[(String, i64)]) -> String {
    let mut h = Sha256::new();
    for (name, version) in policies {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(version.to_string().as_bytes());
        h.update([b'\n']);
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}
