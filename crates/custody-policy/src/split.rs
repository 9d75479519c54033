//! Splitting a policy set so that what can be remembered is remembered.
//!
//! A statement's decision can be memoized when the policies read only inputs
//! that repeat (see `gate::decisions_cacheable`). A set in which a few rules
//! read `input.time.unix` or `input.session` would otherwise be evaluated in
//! full on every statement. Because `deny` is a set built as the union of its
//! definitions, the set can be cut in two:
//!
//! * the *stable* part: every module with the `deny` definitions that read
//!   changing inputs blanked out — its `deny` (and `allow`, when `allow` is
//!   stable) is memoized;
//! * the *volatile* part: every module with the other `deny` definitions
//!   blanked out — its `deny` (and `allow`, when `allow` is volatile) is
//!   evaluated on every statement.
//!
//! The statement's `deny` is the union of the two, which is what the whole set
//! gives. Rules other than `deny` stay in both parts, so helpers, functions,
//! `allow` and its default are defined exactly as written; a helper that reads
//! changing inputs only makes the rules that name it volatile.
//!
//! The analysis works on each rule's source text and is conservative: anything
//! it cannot account for (imports of `data` or `input`, a dynamic reference to
//! `data`, a rule that reads `deny` itself, a `deny` that is not a set) means
//! no split, and the whole set is evaluated on every statement, as before.

use std::collections::BTreeSet;

use regorus::unstable::{Rule, RuleHead};
use regorus::Engine;

/// One module cut in two: the same source with some `deny` definitions blanked out.
pub(crate) struct SplitModule {
    pub name: String,
    pub stable: String,
    pub volatile: String,
}

pub(crate) struct Split {
    pub modules: Vec<SplitModule>,
    /// Whether `allow` (if declared) must be evaluated with the volatile part.
    pub allow_volatile: bool,
    pub stable_deny: bool,
    pub volatile_deny: bool,
}

struct RuleText {
    name: String,
    /// Byte range in the module's source.
    start: usize,
    end: usize,
    /// `deny contains ...` / `deny[...]`.
    is_set: bool,
    volatile: bool,
}

/// Identifier-like tokens of `text` ([A-Za-z_][A-Za-z0-9_]*), strings included:
/// a name inside a string only makes the analysis more cautious.
fn tokens(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| {
            t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        })
}

/// The rule's name: the leading identifier of its head's reference.
fn rule_name(rule: &Rule) -> Option<String> {
    let text = match rule {
        Rule::Spec { head, .. } => match head {
            RuleHead::Compr { refr, .. }
            | RuleHead::Set { refr, .. }
            | RuleHead::Func { refr, .. } => refr.span().text(),
        },
        Rule::Default { refr, .. } => refr.span().text(),
    };
    tokens(text).next().map(str::to_string)
}

/// Cuts `modules` (name, source) in two, or None when the set cannot be split safely or
/// there is nothing to split (every rule stable, or no stable `deny` definition to remember).
pub(crate) fn split(modules: &[(&str, &str)], is_stable: impl Fn(&str) -> bool) -> Option<Split> {
    let mut per_module: Vec<Vec<RuleText>> = Vec::with_capacity(modules.len());
    for (name, source) in modules {
        let mut engine = Engine::new();
        engine
            .add_policy(name.to_string(), source.to_string())
            .ok()?;
        let module = engine.get_modules().last()?.clone();
        for import in &module.imports {
            // `import rego.v1` and `import future.keywords...` only change syntax; an alias
            // of data or input would hide what a rule reads.
            let what = import.refr.span().text();
            if !(what == "rego.v1" || what.starts_with("future.keywords")) {
                return None;
            }
        }
        // A rule's span may stop short of its last character (a closing quote): each rule
        // is taken to run up to the next rule, or to the end of the module. What lies
        // between is layout and comments.
        let mut starts: Vec<usize> = module
            .policy
            .iter()
            .map(|r| r.span().start as usize)
            .collect();
        if starts.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        starts.push(source.len());
        let mut rules = Vec::with_capacity(module.policy.len());
        for (i, rule) in module.policy.iter().enumerate() {
            let (start, end) = (starts[i], starts[i + 1]);
            if let Rule::Spec { bodies, .. } = rule.as_ref() {
                // The blanked range must hold the whole rule, else clauses included.
                if bodies
                    .iter()
                    .any(|b| (b.span.end as usize) > end || (b.span.start as usize) < start)
                {
                    return None;
                }
            }
            let name = rule_name(rule)?;
            let text = source.get(start..end)?;
            rules.push(RuleText {
                // `deny contains x` exactly: `deny[k] contains x` and `deny.a contains x` are
                // parsed as set heads too, but build an object.
                is_set: matches!(
                    rule.as_ref(),
                    Rule::Spec { head: RuleHead::Set { refr, key: Some(_), .. }, .. }
                        if refr.span().text() == "deny"
                ),
                volatile: !is_stable(text),
                name,
                start,
                end,
            });
        }
        per_module.push(rules);
    }
    let all = || per_module.iter().flatten();

    // A reference to data other than by a rule's name (data.custody[x], walk(data), ...)
    // could reach any rule.
    for (m, rules) in per_module.iter().enumerate() {
        for r in rules {
            let text = &modules[m].1[r.start..r.end];
            let mut rest = text;
            while let Some(at) = rest.find("data") {
                let before = &rest[..at];
                let after = &rest[at + 4..];
                rest = after;
                let word_start =
                    !before.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.');
                let word_end = !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
                if word_start && word_end {
                    let named = after.strip_prefix(".custody.").is_some_and(|n| {
                        n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    });
                    if !named {
                        return None;
                    }
                }
            }
        }
    }

    // deny must be a set that nothing else reads.
    for (m, rules) in per_module.iter().enumerate() {
        for r in rules {
            if r.name == "deny" && !r.is_set {
                return None;
            }
            if r.name != "deny" && tokens(&modules[m].1[r.start..r.end]).any(|t| t == "deny") {
                return None;
            }
        }
    }

    // Volatility spreads through names: a rule that names a volatile rule is volatile.
    let mut volatile: BTreeSet<String> = all()
        .filter(|r| r.volatile)
        .map(|r| r.name.clone())
        .collect();
    loop {
        let mut grew = false;
        for (m, rules) in per_module.iter().enumerate() {
            for r in rules {
                if volatile.contains(&r.name) {
                    continue;
                }
                let text = &modules[m].1[r.start..r.end];
                if tokens(text).any(|t| t != r.name && volatile.contains(t)) {
                    volatile.insert(r.name.clone());
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let deny_is_volatile = |m: usize, r: &RuleText| {
        r.volatile
            || tokens(&modules[m].1[r.start..r.end]).any(|t| t != r.name && volatile.contains(t))
    };

    let mut stable_deny = false;
    let mut volatile_deny = false;
    let mut out = Vec::with_capacity(modules.len());
    for (m, rules) in per_module.iter().enumerate() {
        let (name, source) = modules[m];
        let mut stable = source.as_bytes().to_vec();
        let mut volatile_src = source.as_bytes().to_vec();
        for r in rules.iter().filter(|r| r.name == "deny") {
            let blank = if deny_is_volatile(m, r) {
                volatile_deny = true;
                &mut stable
            } else {
                stable_deny = true;
                &mut volatile_src
            };
            for b in &mut blank[r.start..r.end] {
                if *b != b'\n' {
                    *b = b' ';
                }
            }
        }
        out.push(SplitModule {
            name: name.to_string(),
            // Only ASCII spaces replaced whole rules: still UTF-8.
            stable: String::from_utf8(stable).ok()?,
            volatile: String::from_utf8(volatile_src).ok()?,
        });
    }
    if !stable_deny || !volatile_deny {
        // Nothing to remember, or nothing that changes: no reason to split.
        return None;
    }
    Some(Split {
        modules: out,
        allow_volatile: volatile.contains("allow"),
        stable_deny,
        volatile_deny,
    })
}
