//! Cost of the gate per statement and of `custody.check` per row.
//! A benchmark, not a test: it measures and prints, it never fails.
//!
//!     cargo run --release -p custody-policy --example gate_bench

use std::time::Instant;

use custody_policy::*;
use serde_json::json;

const US: i64 = 1_000_000;
/// 2026-11-23T09:00:00Z, a Monday morning.
const MONDAY_9AM: i64 = 1_795_424_400 * US;

/// Twenty rules of the kinds a site writes: roles, commands, objects, time,
/// attributes, client; one allow with its default.
const POLICY: &str = include_str!("site_policy.rego");

fn percentiles(mut ns: Vec<u64>) -> (f64, f64, f64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    (
        at(0.5),
        at(0.99),
        ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0,
    )
}

fn report(what: &str, ns: Vec<u64>) {
    let n = ns.len();
    let (median, p99, mean) = percentiles(ns);
    println!(
        "{what:<46} n={n:<8} median {median:>7.2} µs   p99 {p99:>7.2} µs   mean {mean:>7.2} µs"
    );
}

fn main() {
    let attr = |role: &str, key: &str, value: serde_json::Value| Attribute {
        role: role.into(),
        key: key.into(),
        value,
        valid_from: 0,
        valid_until: None,
    };
    let snapshot = Snapshot {
        generation: 1,
        policies: vec![PolicySource {
            name: "site".into(),
            version: 1,
            source: POLICY.into(),
            enabled: true,
        }],
        attributes: vec![
            attr("alice", "tenant", json!(7)),
            attr("alice", "writer", json!(true)),
            attr("bob", "tenant", json!(8)),
            attr("bob", "pii_clearance", json!(true)),
            attr("carol", "contract_end", json!(1_900_000_000)),
            attr("carol", "tenant", json!(9)),
        ],
        suspensions: vec![Suspension {
            role: "mallory".into(),
            reason: "incident".into(),
        }],
    };

    let t = Instant::now();
    let mut gate = Gate::build(&snapshot).expect("policy compiles");
    println!(
        "Gate::build (20 rules)                          {:>7.1} µs",
        t.elapsed().as_nanos() as f64 / 1000.0
    );

    let subject = |user: &str, roles: &[&str]| SubjectInput {
        session_user: user.into(),
        current_user: user.into(),
        roles: std::iter::once(user)
            .chain(roles.iter().copied())
            .map(String::from)
            .collect(),
    };
    let subjects = [
        subject("alice", &["analysts", "writers"]),
        subject("bob", &["hr", "analysts"]),
        subject("carol", &["contractors"]),
        subject("dave", &["admins", "migrator", "security"]),
    ];
    let commands = [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "SELECT",
        "CREATE TABLE",
        "SELECT",
        "GRANT",
    ];
    let objects: Vec<String> = (0..8)
        .map(|i| {
            let schemas = ["public", "sales", "public", "tenant_data"];
            let objs: Vec<serde_json::Value> = (0..(1 + i % 3))
                .map(|j| {
                    json!({
                        "schema": schemas[(i + j) % 4],
                        "name": format!("t7_orders_{j}"),
                        "kind": "table",
                        "privileges": ["SELECT"],
                        "columns": ["id", "amount", "customer", "created_at"],
                    })
                })
                .collect();
            serde_json::to_string(&objs).unwrap()
        })
        .collect();

    const N: usize = 100_000;
    let decide_all = |gate: &mut Gate| {
        let mut times = Vec::with_capacity(N);
        let mut denied = 0;
        for i in 0..N {
            let st = StatementInput {
                subject: &subjects[i % 4],
                command: commands[i % 8],
                objects_json: &objects[(i / 3) % 8],
                client_addr: Some(if i % 50 == 0 {
                    "192.168.1.9"
                } else {
                    "10.1.2.3"
                }),
                application_name: Some("psql"),
                // Office hours, Monday to Friday, so that most statements pass
                // every rule (the costlier case: nothing short-circuits).
                now_unix_us: MONDAY_9AM
                    + (i as i64 % 5) * 86_400 * US
                    + (i as i64 % 9) * 3_600 * US
                    + (i as i64 % 3_600) * US,
                pid: 4242,
                backend_start_unix_us: MONDAY_9AM - 3_600 * US,
                statements: i as u64,
            };
            let t = Instant::now();
            let d = gate.decide(&st);
            times.push(t.elapsed().as_nanos() as u64);
            denied += usize::from(!d.allowed);
        }
        (times, denied)
    };
    // Two of the 20 rules read inputs that change with every statement (input.time.unix,
    // input.session): the gate splits the set, remembers the other 18 rules' outcome and
    // evaluates those two on every statement.
    assert!(gate.is_split(), "the benchmark policy is split");
    let (times, denied) = decide_all(&mut gate);
    report(
        &format!("decide, 20 rules, split ({}% denied)", denied * 100 / N),
        times,
    );
    let mut whole = Gate::build(&snapshot)
        .expect("policy compiles")
        .without_split();
    let (times, denied) = decide_all(&mut whole);
    report(
        &format!("decide, 20 rules, whole set ({}% denied)", denied * 100 / N),
        times,
    );

    // The same 20 rules without the two that read inputs changing with every statement
    // (input.time.unix, input.session): the gate then memoizes decisions per snapshot.
    let cacheable_policy = POLICY
        .replace(
            "input.time.unix > input.subject.attributes.contract_end",
            "input.subject.attributes.contract_ended == true",
        )
        .replace(
            "deny contains \"session too long\" if input.session.statements > 1000000",
            "deny contains \"too many objects\" if count(input.objects) > 1000",
        );
    let mut cached_snapshot = snapshot.clone();
    cached_snapshot.policies[0].source = cacheable_policy;
    let mut cached = Gate::build(&cached_snapshot).expect("policy compiles");
    // The same statements: their seconds and statement counts change, but these rules
    // read only the hour and the weekday.
    let (times, denied) = decide_all(&mut cached);
    report(
        &format!("decide, 20 memoizable rules ({}% denied)", denied * 100 / N),
        times,
    );
    println!(
        "decide, memoizable: {} engine evaluations for {N} statements",
        cached.statement_evaluations()
    );

    let empty = Gate::build(&Snapshot::default()).unwrap();
    let mut times = Vec::with_capacity(N);
    let mut trivial = 0;
    for i in 0..N {
        let t = Instant::now();
        // What the statement path does with no policy: one check, nothing else.
        trivial += usize::from(std::hint::black_box(&empty).is_trivial());
        times.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(i);
    }
    assert_eq!(trivial, N);
    report("no policy: is_trivial()", times);
    let mut empty = Gate::build(&Snapshot::default()).unwrap();
    let mut times = Vec::with_capacity(N);
    for i in 0..N {
        let st = StatementInput {
            subject: &subjects[i % 4],
            command: commands[i % 8],
            objects_json: &objects[i % 8],
            client_addr: None,
            application_name: None,
            now_unix_us: MONDAY_9AM,
            pid: 1,
            backend_start_unix_us: MONDAY_9AM,
            statements: i as u64,
        };
        let t = Instant::now();
        std::hint::black_box(empty.decide(&st));
        times.push(t.elapsed().as_nanos() as u64);
    }
    report("no policy: decide() anyway", times);

    // custody.check over 1M rows with 100 distinct resources, one statement.
    let resources: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"tenant": i % 10, "table": "orders", "region": format!("r{}", i / 10)}))
        .collect();
    const ROWS: usize = 1_000_000;
    gate.new_statement();
    let mut times = Vec::with_capacity(ROWS);
    let mut allowed = 0;
    let t_all = Instant::now();
    for i in 0..ROWS {
        let t = Instant::now();
        let ok = gate
            .row_allow(
                &subjects[0],
                MONDAY_9AM,
                "read",
                &resources[(i * 7919) % 100],
            )
            .unwrap();
        times.push(t.elapsed().as_nanos() as u64);
        allowed += usize::from(ok);
    }
    let total = t_all.elapsed();
    report(
        &format!(
            "row_allow, 100 resources ({}% allowed)",
            allowed * 100 / ROWS
        ),
        times,
    );
    println!(
        "row_allow: {} evaluations for {ROWS} calls, {:.0} ms in all",
        gate.row_evaluations(),
        total.as_secs_f64() * 1000.0
    );
    gate.new_statement();
    let mut times = Vec::with_capacity(100);
    for r in &resources {
        let t = Instant::now();
        std::hint::black_box(gate.row_allow(&subjects[0], MONDAY_9AM, "read", r).unwrap());
        times.push(t.elapsed().as_nanos() as u64);
    }
    report("row_allow, memo misses only", times);
}
