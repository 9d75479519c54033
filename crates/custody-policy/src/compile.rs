//! Compiling Rego modules: the check `custody.set_policy` runs before storing
//! a module, the engine a gate is built from, and turning regorus' error text
//! into line, column and message.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::Engine;

/// Every module must declare this package: the gate reads `data.custody.*`.
pub const PACKAGE: &str = "custody";

/// A module the probe evaluates to force regorus' analysis (unsafe variables,
/// recursion, rule conflicts) without evaluating any user rule.
const PROBE_PATH: &str = "<custody-probe>";
const PROBE_SOURCE: &str = "package custody_internal_probe\n\nready := true\n";
const PROBE_RULE: &str = "data.custody_internal_probe.ready";

/// A policy that runs this long on one statement is broken (Rego has no
/// unbounded loops, but a comprehension over a large cross product can take
/// seconds); the statement is denied rather than left hanging.
const EVAL_TIME_LIMIT: Duration = Duration::from_millis(250);

/// Why a module was refused, located in its source when regorus says where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CompileError {}

impl CompileError {
    fn unlocated(message: impl Into<String>) -> Self {
        CompileError {
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

/// One regorus error taken apart. Its text looks like
///
/// ```text
/// \n--> NAME:LINE:COL\n  |\n3 | source line\n  |   ^\nerror: MESSAGE
/// ```
///
/// or is a bare message when regorus has no location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LocatedError {
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
}

impl LocatedError {
    pub(crate) fn parse(text: &str) -> Self {
        let mut found = LocatedError {
            file: None,
            line: None,
            column: None,
            message: String::new(),
        };
        let mut lines = text.lines();
        for l in lines.by_ref() {
            let Some(location) = l.trim_start().strip_prefix("--> ") else {
                continue;
            };
            // NAME may itself contain ':', so split from the right.
            let mut parts = location.rsplitn(3, ':');
            let column = parts.next().and_then(|c| c.trim().parse().ok());
            let line = parts.next().and_then(|l| l.trim().parse().ok());
            if let (Some(line), Some(column), Some(file)) = (line, column, parts.next()) {
                found = LocatedError {
                    file: Some(file.to_string()),
                    line: Some(line),
                    column: Some(column),
                    message: String::new(),
                };
                break;
            }
        }
        if found.line.is_some() {
            // The message follows the quoted source line and its caret.
            let rest: Vec<&str> = lines.collect();
            let start = rest.iter().position(|l| l.starts_with("error: "));
            found.message = match start {
                Some(i) => {
                    let mut m = rest[i..].join("\n");
                    m.replace_range(..("error: ".len()), "");
                    m
                }
                None => rest.join("\n").trim().to_string(),
            };
        } else {
            found.message = text.trim().to_string();
        }
        found
    }

    /// Compact one-line form for a denial reason: `NAME:LINE:COL: MESSAGE`.
    pub(crate) fn one_line(&self) -> String {
        match (&self.file, self.line, self.column) {
            (Some(f), Some(l), Some(c)) => format!("{f}:{l}:{c}: {}", self.message),
            _ => self.message.clone(),
        }
    }
}

impl From<LocatedError> for CompileError {
    fn from(e: LocatedError) -> Self {
        CompileError {
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }
}

/// A fresh engine with the settings every custody engine uses.
pub(crate) fn new_engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_execution_timer_config(ExecutionTimerConfig {
        limit: EVAL_TIME_LIMIT,
        check_interval: NonZeroU32::new(256).expect("non-zero"),
    });
    engine
}

/// Refuses calls to functions that exist nowhere. The interpreter resolves a
/// call only when it is evaluated, so a typo in a rarely taken branch would
/// otherwise pass `set_policy` and deny statements later; regorus' bytecode
/// compiler resolves every call up front, so it is run for that one check
/// (its other complaints are ignored: the interpreter is what evaluates).
pub(crate) fn check_functions(engine: &mut Engine, modules: &[&str]) -> Result<(), CompileError> {
    // Everything a decision can reach starts at one of the contract's rules.
    let entries: Vec<String> = ["deny", "allow", "row_allow"]
        .into_iter()
        .filter(|rule| {
            modules
                .iter()
                .any(|m| engine.has_declared_rule_rooted_at(m, rule).unwrap_or(false))
        })
        .map(|rule| format!("data.{PACKAGE}.{rule}"))
        .collect();
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let entry_refs: Vec<&str> = entries.iter().map(String::as_str).collect();
    let result = engine
        .compile_with_entrypoint(&first.as_str().into())
        .map_err(|e| e.to_string())
        .and_then(|policy| {
            Compiler::compile_from_policy(&policy, &entry_refs)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
    match result {
        Err(text) if text.contains("Unknown function") => {
            let located = LocatedError::parse(&text);
            Err(CompileError::from(located))
        }
        _ => Ok(()),
    }
}

/// Adds one module and checks that it declares `package custody` exactly.
pub(crate) fn add_module(
    engine: &mut Engine,
    name: &str,
    source: &str,
) -> Result<(), CompileError> {
    engine
        .add_policy(name.to_string(), source.to_string())
        .map_err(|e| CompileError::from(LocatedError::parse(&e.to_string())))?;
    let packages = engine
        .get_policy_package_components()
        .map_err(|e| CompileError::unlocated(e.to_string()))?;
    // The module just added is the last one.
    let declared = packages
        .last()
        .map(|p| p.components.clone())
        .unwrap_or_default();
    if declared != [PACKAGE] {
        let span = engine
            .get_modules()
            .last()
            .map(|m| (m.package.span.line, m.package.span.col));
        return Err(CompileError {
            line: span.map(|s| s.0),
            column: span.map(|s| s.1),
            message: format!(
                "a pg_custody policy must declare `package {PACKAGE}`, not `package {}`",
                declared.join(".")
            ),
        });
    }
    Ok(())
}

/// Runs regorus' whole-program analysis (it happens lazily, on first
/// evaluation) by evaluating a constant rule of an internal module.
pub(crate) fn prepare(engine: &mut Engine) -> Result<(), LocatedError> {
    engine
        .add_policy(PROBE_PATH.to_string(), PROBE_SOURCE.to_string())
        .map_err(|e| LocatedError::parse(&e.to_string()))?;
    engine
        .eval_rule(PROBE_RULE.to_string())
        .map(|_| ())
        .map_err(|e| LocatedError::parse(&e.to_string()))
}

/// Compiles one module alone (as set_policy does before storing it). The module must declare `package custody`.
///
/// Catches syntax errors, a wrong package, unsafe variables, recursion and
/// conflicting rule kinds, calls to functions that do not exist.
pub fn compile_check(name: &str, source: &str) -> Result<(), CompileError> {
    let mut engine = new_engine();
    add_module(&mut engine, name, source)?;
    prepare(&mut engine).map_err(CompileError::from)?;
    check_functions(&mut engine, &[name])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_module() {
        let src = "package custody\n\ndeny contains msg if {\n  input.command == \"DROP\"\n  msg := \"no drops\"\n}\n";
        assert_eq!(compile_check("p", src), Ok(()));
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let src = "package custody\n\nallow if { input.x = = 1 }\n";
        let err = compile_check("bad", src).unwrap_err();
        assert_eq!(err.line, Some(3), "{err:?}");
        assert!(err.column.is_some(), "{err:?}");
        assert!(
            !err.message.is_empty() && !err.message.contains("-->"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("line 3, column "), "{err}");
    }

    #[test]
    fn v0_syntax_is_refused_where_it_is() {
        // Rego v1 requires `if`; the error points at the rule body.
        let src = "package custody\nallow { true }\n";
        let err = compile_check("v0", src).unwrap_err();
        assert_eq!((err.line, err.column), (Some(2), Some(7)), "{err:?}");
        assert!(err.message.contains("`if` keyword is required"), "{err:?}");
    }

    #[test]
    fn unsafe_variable_is_a_compile_error() {
        let src = "package custody\n\ndeny contains \"x\" if { y == 1 }\n";
        let err = compile_check("unsafe", src).unwrap_err();
        assert_eq!(err.line, Some(3), "{err:?}");
        assert!(err.message.contains("unsafe"), "{err:?}");
    }

    #[test]
    fn unknown_function_is_a_compile_error() {
        let src = "package custody\n\ndeny contains \"x\" if {\n  input.command == \"DROP\"\n  no_such_function(input.command)\n}\n";
        let err = compile_check("typo", src).unwrap_err();
        assert_eq!(err.line, Some(5), "{err:?}");
        assert!(err.message.contains("no_such_function"), "{err:?}");
        // Builtins and the module's own functions are fine.
        let ok = "package custody\n\nf(x) := upper(x)\n\ndeny contains f(input.command) if regex.match(`^DROP`, input.command)\n";
        assert_eq!(compile_check("ok", ok), Ok(()));
    }

    #[test]
    fn wrong_package_is_refused() {
        for src in [
            "package other\nallow := true\n",
            "package custody.sub\nallow := true\n",
        ] {
            let err = compile_check("pkg", src).unwrap_err();
            assert_eq!(err.line, Some(1), "{err:?}");
            assert!(err.message.contains("package custody"), "{err:?}");
        }
    }

    #[test]
    fn parses_located_and_bare_errors() {
        let text =
            "\n--> a:b.rego:12:5\n   |\n12 | x := \n   |     ^\nerror: unexpected end\nmore detail";
        let e = LocatedError::parse(text);
        assert_eq!(e.file.as_deref(), Some("a:b.rego"));
        assert_eq!((e.line, e.column), (Some(12), Some(5)));
        assert_eq!(e.message, "unexpected end\nmore detail");
        assert_eq!(e.one_line(), "a:b.rego:12:5: unexpected end\nmore detail");
        let bare = LocatedError::parse("not a valid rule path");
        assert_eq!(
            (bare.line, bare.message.as_str()),
            (None, "not a valid rule path")
        );
    }
}
