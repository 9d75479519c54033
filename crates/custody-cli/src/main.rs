//! `custody`: generate checkpoint signing keys and verify pg_custody exports
//! offline, with the same chain implementation the extension uses.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::ExitCode;

use custody_chain::export::{verify_export_parallel, Digest, FailureClass, Report};
use custody_chain::hex;
use custody_chain::note::{generate_key, parse_verifier_key, VerifierKey};
use serde_json::json;

mod dsn;

const HELP: &str = "\
custody - keys and offline verification for pg_custody audit chains

USAGE:
    custody keygen --out FILE [--name NAME]
    custody verify --log FILE [--public-key KEY] [--digest FILE ...] [--json]
    custody verify --dsn CONNINFO [--schema NAME] [--origin ORIGIN] [options above]
    custody --help | custody verify --help

COMMANDS:
    keygen   Create an Ed25519 checkpoint signing key. The private key is
             written to FILE (mode 0600, never overwritten); the verifier
             (public) key is printed on stdout.
    verify   Verify an export (custody.export_audit output), or a log read
             straight from a database, end to end.

EXIT STATUS:
    0  everything verified
    1  tampering, a wrong public key or truncation was found
    2  bad usage, or unreadable or malformed input
";

const VERIFY_HELP: &str = "\
custody verify - verify a pg_custody export

USAGE:
    custody verify --log FILE [--public-key KEY] [--digest FILE ...] [--json]
    custody verify --dsn CONNINFO [--schema NAME] [--origin ORIGIN] [...]

OPTIONS:
    --log FILE         The export (JSON lines); '-' reads standard input.
    --dsn CONNINFO     Read the log from a database instead (a libpq
                       connection string, e.g. 'host=/tmp dbname=audit'):
                       the source itself, or a copy kept by logical
                       replication on a server without pg_custody. Reads
                       NAME.audit_log and NAME.checkpoints in one snapshot.
    --schema NAME      The schema of the copy (default: custody).
    --origin ORIGIN    The chain the log must be, as
                       pg_custody/<system identifier>/<database oid>;
                       by default the one its records name.
    --public-key KEY   The verifier key text (name+hash+base64) or a file
                       holding it. Without it the chain, the checkpoints'
                       hashes and Merkle roots and the digests are still
                       verified, but no signature is: the output says so.
    --digest FILE      A digest saved earlier (one JSON object). Proves the
                       chain up to its seq was not rewritten or truncated.
                       May be given several times.
    --json             Print one JSON object instead of a summary.

Recomputes every record hash and link from the genesis hash, checks every
checkpoint's Merkle root, chain hash and (with a key) signature, and every
digest.

EXIT STATUS:
    0  everything verified
    1  tampering, a wrong public key or truncation was found; the first bad
       record is named
    2  bad usage, or unreadable or malformed input
";

/// A failure that ends the program with exit status 2.
struct UsageError(String);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            print!("{HELP}");
            Ok(ExitCode::SUCCESS)
        }
        Some("keygen") => keygen(&args[1..]),
        Some("verify") => verify(&args[1..]),
        Some(other) => Err(UsageError(format!("unknown command {other:?}; see custody --help"))),
    };
    result.unwrap_or_else(|UsageError(msg)| {
        eprintln!("custody: {msg}");
        ExitCode::from(2)
    })
}

/// Minimal option parser: `--opt VALUE`, `--opt=VALUE` and flags.
struct Opts<'a> {
    args: &'a [String],
    i: usize,
}

impl<'a> Opts<'a> {
    /// Next (option name, inline value if `--opt=value`).
    fn next(&mut self) -> Option<(&'a str, Option<&'a str>)> {
        let a = self.args.get(self.i)?;
        self.i += 1;
        Some(match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v)),
            _ => (a.as_str(), None),
        })
    }
    fn value(&mut self, name: &str, inline: Option<&'a str>) -> Result<&'a str, UsageError> {
        if let Some(v) = inline {
            return Ok(v);
        }
        let v = self.args.get(self.i).ok_or_else(|| UsageError(format!("{name} needs a value")))?;
        self.i += 1;
        Ok(v)
    }
}

fn keygen(args: &[String]) -> Result<ExitCode, UsageError> {
    let (mut out, mut name) = (None, "pg_custody");
    let mut o = Opts { args, i: 0 };
    while let Some((k, inline)) = o.next() {
        match k {
            "--out" => out = Some(o.value(k, inline)?),
            "--name" => name = o.value(k, inline)?,
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(ExitCode::SUCCESS);
            }
            _ => return Err(UsageError(format!("keygen: unknown argument {k:?}"))),
        }
    }
    let out = out.ok_or_else(|| UsageError("keygen: --out FILE is required".into()))?;
    let (private, verifier) = generate_key(name).map_err(|e| UsageError(format!("keygen: {e}")))?;
    // create_new: never clobber an existing key; 0600 from the start, so the
    // key is never readable by others, not even briefly.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => UsageError(format!("keygen: {out} already exists; refusing to overwrite a key")),
            _ => UsageError(format!("keygen: cannot create {out}: {e}")),
        })?;
    f.write_all(format!("{private}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| UsageError(format!("keygen: cannot write {out}: {e}")))?;
    println!("{verifier}");
    Ok(ExitCode::SUCCESS)
}

/// KEY is the verifier key itself, or a file containing it.
fn load_key(arg: &str) -> Result<VerifierKey, UsageError> {
    if let Ok(k) = parse_verifier_key(arg) {
        return Ok(k);
    }
    match fs::read_to_string(arg) {
        Ok(text) => parse_verifier_key(&text).map_err(|e| UsageError(format!("--public-key {arg}: {e}"))),
        Err(_) => Err(UsageError(match parse_verifier_key(arg) {
            Err(e) if arg.contains('+') => format!("--public-key: {e}"),
            _ => format!("--public-key {arg:?}: not a verifier key and not a readable file"),
        })),
    }
}

fn verify(args: &[String]) -> Result<ExitCode, UsageError> {
    let (mut log, mut key, mut digest_files, mut as_json) = (None, None, Vec::new(), false);
    let (mut conninfo, mut schema, mut origin) = (None, "custody", None);
    let mut o = Opts { args, i: 0 };
    while let Some((k, inline)) = o.next() {
        match k {
            "--log" => log = Some(o.value(k, inline)?),
            "--dsn" => conninfo = Some(o.value(k, inline)?),
            "--schema" => schema = o.value(k, inline)?,
            "--origin" => origin = Some(o.value(k, inline)?),
            "--public-key" => key = Some(o.value(k, inline)?),
            "--digest" => digest_files.push(o.value(k, inline)?),
            "--json" => as_json = true,
            "-h" | "--help" => {
                print!("{VERIFY_HELP}");
                return Ok(ExitCode::SUCCESS);
            }
            _ => return Err(UsageError(format!("verify: unknown argument {k:?}; see custody verify --help"))),
        }
    }
    if log.is_some() == conninfo.is_some() {
        return Err(UsageError("verify: give one of --log FILE and --dsn CONNINFO".into()));
    }
    // A site that has not configured a signing key yet still has a chain worth checking.
    let key = key.map(load_key).transpose()?;
    let digests = digest_files
        .iter()
        .map(|p| {
            let text = fs::read_to_string(p).map_err(|e| UsageError(format!("--digest {p}: {e}")))?;
            Digest::parse(&text).map_err(|e| UsageError(format!("--digest {p}: not a digest: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let (reader, name): (Box<dyn BufRead>, String) = match (log, conninfo) {
        (Some("-"), _) => (Box::new(io::stdin().lock()), "<stdin>".into()),
        (Some(log), _) => {
            let f = fs::File::open(log).map_err(|e| UsageError(format!("{log}: {e}")))?;
            (Box::new(BufReader::with_capacity(1 << 16, f)), log.into())
        }
        (None, Some(c)) => {
            let (lines, database) = dsn::open(c, schema, origin).map_err(UsageError)?;
            (Box::new(BufReader::with_capacity(1 << 16, lines)), format!("database {database}"))
        }
        (None, None) => unreachable!("checked above"),
    };
    let name = name.as_str();
    // Parsing the JSON lines is the cost; it is spread over the machine's cores, while the
    // checks themselves run in order (custody_chain::export::verify_export_parallel).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = match verify_export_parallel(reader, key.as_ref(), &digests, threads) {
        Ok(r) => r,
        Err(e) => {
            if as_json {
                println!("{}", json!({"ok": false, "error": format!("{name}: {e}")}));
            }
            return Err(UsageError(format!("{name}: {e}")));
        }
    };
    if as_json {
        println!("{}", report_json(&report));
    } else {
        print!("{}", summary(&report, key.as_ref()));
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn report_json(r: &Report) -> serde_json::Value {
    json!({
        "ok": r.ok,
        "database": r.header.as_ref().map(|h| &h.database),
        "records": r.records,
        "checkpoints": r.checkpoints,
        "digests": r.digests,
        "signatures_checked": r.signatures_checked,
        "head_seq": r.head.map(|(s, _)| s),
        "head_hash": r.head.map(|(_, h)| hex::encode(&h)),
        "failure": r.failure.as_ref().map(|f| json!({
            "seq": f.seq,
            "kind": f.class.as_str(),
            "reason": f.reason,
        })),
    })
}

fn summary(r: &Report, key: Option<&VerifierKey>) -> String {
    let db = r.header.as_ref().map_or("?", |h| h.database.as_str());
    let mut s = String::new();
    match &r.failure {
        None => {
            let range = r.head.map_or("no records".into(), |(h, _)| format!("seq 1..{h}"));
            s += &format!("OK: database {db}: {} records verified ({range})\n", r.records);
            if let Some((_, h)) = r.head {
                s += &format!("  head hash {}\n", hex::encode(&h));
            }
            match key {
                Some(key) => {
                    s += &format!(
                        "  {} signed checkpoints verified with key {}+{}; {} digests matched\n",
                        r.checkpoints,
                        key.name(),
                        hex::encode(&key.key_id()),
                        r.digests
                    )
                }
                None => {
                    s += &format!(
                        "  {} checkpoints' hashes and Merkle roots verified; {} digests matched\n",
                        r.checkpoints, r.digests
                    );
                    s += "  no public key given: NO SIGNATURE WAS CHECKED, so nothing proves the chain \
                          was not rewritten as a whole (give --public-key, or --digest files kept outside \
                          the database)\n";
                }
            }
            if key.is_some() && r.checkpoints == 0 && r.digests == 0 {
                s += "  warning: no signed checkpoints or digests: the records are consistent, \
                      but nothing proves the chain was not rewritten as a whole\n";
            }
        }
        Some(f) => {
            let what = match f.class {
                FailureClass::Tamper => "TAMPERED",
                FailureClass::WrongKey => "WRONG KEY",
                FailureClass::Truncated => "TRUNCATED",
            };
            s += &format!("{what}: database {db}: {}\n", f.reason);
            s += &format!("  first bad seq: {}; {} records verified before stopping\n", f.seq, r.records);
        }
    }
    s
}
