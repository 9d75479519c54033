//! Statement texts made safe to keep: role passwords, password-like server options and the
//! password of a connection string are redacted before the permanent log ever sees them, in
//! plain SQL and in the code of DO blocks, functions and EXECUTE strings. Also where each
//! statement of a multi-statement query string begins.
//! Pure string processing over PostgreSQL's lexical rules; no pg_sys, unit-tested.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;

/// What a secret is replaced by. It lexes as `<` word `>`, which no rule takes for a value,
/// so redacting twice changes nothing.
const REDACTED: &str = "<redacted>";

/// Words that any text holding a secret must contain. `connection` and `conninfo` are here
/// because a URI such as `postgresql://u:hunter2@h` after CONNECTION or in primary_conninfo
/// need not contain the other three; `connection` is matched by its last eight letters (a
/// false hit only costs a scan). Option names are matched by the first three (`OPTION_NEEDLES`).
/// Lowercase ASCII letters only (see `mentions`).
const NEEDLES: [&[u8]; 5] = [b"pass", b"secret", b"token", b"nnection", b"conninfo"];
const OPTION_NEEDLES: usize = 3;

/// Settings whose value is a libpq connection string. Each must contain a needle.
const CONNINFO_SETTINGS: [&str; 1] = ["primary_conninfo"];

/// Bodies (DO blocks, functions, EXECUTE strings, dollar- or single-quoted) are searched for
/// nested statements this deep; the bound keeps crafted input from exhausting the stack.
const MAX_DEPTH: u8 = 4;

/// The result of redacting one statement text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redacted<'a> {
    /// The text with every secret replaced by `<redacted>` (borrowed when nothing was found).
    pub text: Cow<'a, str>,
    /// The secret values found, as they appeared in the source (for a quoted literal: its
    /// content after unescaping, e.g. `it's` for 'it''s', and inside a quoted body after
    /// unescaping every level; for a bare word: the word), so that callers can scrub them from
    /// error messages. Empty when nothing was found.
    pub secrets: Vec<String>,
}

/// Redacts secrets in one SQL text (it may contain several statements, comments, broken syntax).
pub fn redact(sql: &str) -> Redacted<'_> {
    // Called for every statement on PostgreSQL's hot path: one allocation-free pass rules out
    // nearly all of them before anything is tokenized.
    if !mentions(sql.as_bytes(), NEEDLES.len()) {
        return Redacted { text: Cow::Borrowed(sql), secrets: Vec::new() };
    }
    let mut edits = Vec::new();
    find_secrets(sql.as_bytes(), 0, 0, &mut edits);
    if edits.is_empty() {
        return Redacted { text: Cow::Borrowed(sql), secrets: Vec::new() };
    }
    let (text, secrets) = apply(sql.as_bytes(), edits);
    let mut seen = HashSet::new();
    let secrets = secrets.into_iter().filter(|s| seen.insert(s.clone())).collect();
    Redacted { text: Cow::Owned(utf8(text)), secrets }
}

/// Replaces every occurrence of each secret (non-empty ones only) in `message` by `<redacted>`.
pub fn scrub<'a>(message: &'a str, secrets: &[String]) -> Cow<'a, str> {
    let mut longest_first: Vec<&str> =
        secrets.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
    if longest_first.is_empty() {
        return Cow::Borrowed(message);
    }
    longest_first.sort_by_key(|s| std::cmp::Reverse(s.len()));
    // Matches are found in the original message, not one replacement after another, so a
    // short secret cannot match inside a `<redacted>` that a longer one left behind.
    let mut covered = vec![false; message.len()];
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for s in longest_first {
        for (at, _) in message.match_indices(s) {
            let hit = &mut covered[at..at + s.len()];
            if !hit.contains(&true) {
                hit.fill(true);
                hits.push((at, at + s.len()));
            }
        }
    }
    if hits.is_empty() {
        return Cow::Borrowed(message);
    }
    hits.sort_unstable();
    let parts = hits.into_iter().map(|(start, end)| (start, end, REDACTED.as_bytes()));
    Cow::Owned(utf8(splice(message.as_bytes(), parts)))
}

/// Whether the SQL text references a bind parameter ($1, $2, ...) outside string literals,
/// quoted identifiers, dollar-quoted strings and comments.
pub fn has_bind_params(sql: &str) -> bool {
    // Hot path too: most texts have no `$` at all, and that is a memchr away.
    sql.as_bytes().contains(&b'$')
        && Tokens { b: sql.as_bytes(), i: 0 }.any(|t| t.kind == Kind::Param)
}

/// Where the statement that PostgreSQL says starts at `location` really begins in a
/// (possibly multi-statement) query string: right after the previous top-level `;` (outside
/// literals, quoted identifiers, dollar quotes and comments) before `location`, or 0. Leading
/// whitespace and comments between that point and `location` belong to the statement
/// (PostgreSQL 18 moved `stmt_location` past leading comments; 15 to 17 put it right after
/// the previous `;`).
pub fn statement_start(sql: &str, location: usize) -> usize {
    // Only the text before `location` is lexed: a token that ends before it lexes the same
    // in the cut text, and one the cut splits holds no `;` either way. Bytes, so a location
    // inside a character cannot panic; every `;` found is ASCII, so the result is a boundary.
    let b = &sql.as_bytes()[..location.min(sql.len())];
    if !b.contains(&b';') {
        return 0;
    }
    Tokens { b, i: 0 }.filter(|t| t.kind == Kind::Punct(b';')).last().map_or(0, |t| t.end)
}

/// A range of the text to replace, what replaces it, and the secret values it hides.
struct Edit {
    start: usize,
    end: usize,
    /// `<redacted>`, or for a quoted body the literal re-quoted around its redacted content.
    with: Cow<'static, [u8]>,
    secrets: Vec<String>,
}

impl Edit {
    fn redacted(start: usize, end: usize, secret: String) -> Edit {
        Edit { start, end, with: Cow::Borrowed(REDACTED.as_bytes()), secrets: vec![secret] }
    }
}

/// The text with the edits made, and the secrets they hide in the order of the text.
fn apply(text: &[u8], mut edits: Vec<Edit>) -> (Vec<u8>, Vec<String>) {
    edits.sort_by_key(|e| e.start);
    let out = splice(text, edits.iter().map(|e| (e.start, e.end, e.with.as_ref())));
    (out, edits.into_iter().flat_map(|e| e.secrets).collect())
}

/// Copies `text`, putting each replacement in place of its range (sorted, disjoint). Bytes,
/// not `str`: the content of an E'' literal need not be UTF-8 (`E'\xff'`).
fn splice<'r>(text: &[u8], parts: impl Iterator<Item = (usize, usize, &'r [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut last = 0;
    for (start, end, with) in parts {
        if start < last {
            last = last.max(end); // within the previous range: a URI's odd user info
            continue;
        }
        out.extend_from_slice(&text[last..start]);
        out.extend_from_slice(with);
        last = end;
    }
    out.extend_from_slice(&text[last..]);
    out
}

/// Every edit starts and ends next to an ASCII byte (or an escape's backslash) and puts UTF-8
/// in (see `requote`), so UTF-8 stays UTF-8; lossy only so that nothing here can panic.
fn utf8(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Whether `b` contains one of the first `n` of `NEEDLES`, ignoring ASCII case. Every
/// statement passes here: the text is lowercased a block at a time (`| 0x20` lowercases letters
/// and makes no other byte a lowercase letter, so it compares as eq_ignore_ascii_case would)
/// and searched with memchr's vectorized substring search, ≈ 0.2–0.6 ns a byte for a 5.5 kB
/// text where a byte-at-a-time window took ≈ 2–3.5 (docs/benchmarks.md). Blocks overlap by a needle's
/// length less one, so a needle across two blocks is found in the second.
fn mentions(b: &[u8], n: usize) -> bool {
    static FINDERS: std::sync::OnceLock<Vec<memchr::memmem::Finder<'static>>> = std::sync::OnceLock::new();
    let finders = FINDERS.get_or_init(|| NEEDLES.iter().map(|w| memchr::memmem::Finder::new(*w)).collect());
    let finders = &finders[..n.min(finders.len())];
    let mut buf = [0u8; MENTIONS_BLOCK];
    let mut at = 0;
    loop {
        let end = (at + MENTIONS_BLOCK).min(b.len());
        let block = &mut buf[..end - at];
        for (lower, &c) in block.iter_mut().zip(&b[at..end]) {
            *lower = c | 0x20;
        }
        if finders.iter().any(|f| f.find(block).is_some()) {
            return true;
        }
        if end == b.len() {
            return false;
        }
        at = end - MENTIONS_OVERLAP;
    }
}

/// The block `mentions` lowercases at a time: small, because every statement zeroes it (a
/// 4 kB block made pgbench's 52-byte statements slower: 80–134 ns against 67–109 with 512
/// bytes, docs/benchmarks.md), and far longer than a needle.
const MENTIONS_BLOCK: usize = 512;
const MENTIONS_OVERLAP: usize = longest(&NEEDLES) - 1;

/// The length of the longest needle.
const fn longest(needles: &[&[u8]]) -> usize {
    let (mut max, mut i) = (0, 0);
    while i < needles.len() {
        if needles[i].len() > max {
            max = needles[i].len();
        }
        i += 1;
    }
    max
}

// ---- Rules -------------------------------------------------------------------------------

/// Walks the tokens of `b` from `from` on and records secrets. Offsets are into `b`: a
/// dollar-quoted body is searched as `b` cut at the body's end; a single-quoted one, whose
/// content is not its source, as a text of its own (see `quoted_code`).
fn find_secrets(b: &[u8], from: usize, depth: u8, edits: &mut Vec<Edit>) {
    // Comments and whitespace may separate a keyword from its value: only the rest counts.
    let toks: Vec<Token> =
        Tokens { b, i: from }.filter(|t| !matches!(t.kind, Kind::Space | Kind::Comment)).collect();
    let word = |i: usize, w: &str| {
        toks.get(i)
            .is_some_and(|t| t.kind == Kind::Word && t.text(b).eq_ignore_ascii_case(w.as_bytes()))
    };
    let kind = |i: usize| toks.get(i).map(|t| t.kind);
    // Bare words after PASSWORD count only in role statements: elsewhere `password` is most
    // likely a column, as in `SELECT password FROM t`.
    let mut in_role = false;
    // In CREATE FUNCTION|PROCEDURE, whose literals after AS are its code.
    let mut routine = false;
    // Parenthesis depth inside an OPTIONS ( ... ) list; 0 outside.
    let mut options = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let value = toks.get(i + 1).copied();
        match t.kind {
            Kind::Punct(b';') => (in_role, routine, options) = (false, false, 0),
            Kind::Punct(b'(') if options > 0 => options += 1,
            Kind::Punct(b')') if options > 0 => options -= 1,
            Kind::Word if word(i, "options") && kind(i + 1) == Some(Kind::Punct(b'(')) => {
                options = 1;
                i += 1;
            }
            Kind::Word if is_role_statement(&word, i) => {
                in_role = true;
                // The role's own name is never a value: `CREATE ROLE password PASSWORD 'x'`.
                i +=
                    if matches!(kind(i + 2), Some(Kind::Word | Kind::QuotedIdent)) { 2 } else { 1 };
            }
            Kind::Word if is_routine_statement(&word, i) => routine = true,
            Kind::Word if routine && word(i, "as") => {
                // `AS 'body'`, or for C `AS 'obj_file', 'link_symbol'`: searched too, and no
                // statement is found in a file name or a symbol.
                let mut j = i + 1;
                while let Some(&v) = toks.get(j).filter(|v| v.is_string()) {
                    code(b, v, depth, edits);
                    j += if kind(j + 1) == Some(Kind::Punct(b',')) { 2 } else { 1 };
                }
                i = j - 1;
            }
            Kind::Word if word(i, "do") => {
                // `DO [LANGUAGE name] code`, either way round. ON CONFLICT's `DO UPDATE` and
                // `DO NOTHING` take no literal, so nothing is read there.
                let mut j = i + 1;
                loop {
                    let name =
                        matches!(kind(j + 1), Some(Kind::Word | Kind::QuotedIdent | Kind::Str(_)));
                    if word(j, "language") && name {
                        j += 2;
                    } else if let Some(&v) = toks.get(j).filter(|v| v.is_string()) {
                        code(b, v, depth, edits);
                        j += 1;
                    } else {
                        break;
                    }
                }
                i = j - 1;
            }
            Kind::Word if depth > 0 && word(i, "execute") => {
                // PL/pgSQL's dynamic SQL runs the literal as a statement (a Dollar one is read
                // below anyway). `EXECUTE format(..)` and `'..' || x` are not put together.
                let mut j = i + 1;
                while kind(j) == Some(Kind::Punct(b'(')) {
                    j += 1;
                }
                if let Some(&v) = toks.get(j).filter(|v| matches!(v.kind, Kind::Str(_))) {
                    code(b, v, depth, edits);
                    i = j;
                }
            }
            Kind::Word if word(i, "password") => {
                // In `IN ROLE password LOGIN` or `ADD USER a, password` it names a role.
                let names_role = i > 0
                    && (kind(i - 1) == Some(Kind::Punct(b','))
                        || ["role", "user", "group", "admin"].iter().any(|w| word(i - 1, w)));
                let bare_ok = in_role && !names_role;
                if let Some(v) = value.filter(|v| is_password_value(b, v, bare_ok)) {
                    edits.push(token_secret(b, v));
                    i += 1;
                }
            }
            Kind::Word if word(i, "connection") => {
                if let Some(v) = value.filter(Token::is_string) {
                    conninfo(&content(b, v), 0, edits);
                    i += 1;
                }
            }
            Kind::Word | Kind::QuotedIdent if is_conninfo_setting(b, &t) => {
                // `SET primary_conninfo = '..'` or `TO '..'`, in ALTER SYSTEM, ALTER ROLE or a
                // session; an UPDATE of a column so named is redacted too, which does no harm.
                let to = kind(i + 1) == Some(Kind::Punct(b'=')) || word(i + 1, "to");
                if let Some(&v) = toks.get(i + 2).filter(|v| to && v.is_string()) {
                    conninfo(&content(b, v), 0, edits);
                    i += 2;
                }
            }
            Kind::Word | Kind::QuotedIdent if options > 0 && mentions(t.text(b), OPTION_NEEDLES) => {
                if let Some(v) = value.filter(Token::is_string) {
                    edits.push(token_secret(b, v));
                    i += 1;
                }
            }
            // Wherever it is: a DO block or function body is code, `CREATE ROLE .. PASSWORD`
            // inside it too. Single-quoted literals are code only where read so above.
            Kind::Dollar(_) => code(b, t, depth, edits),
            _ => {}
        }
        i += 1;
    }
}

/// Searches the code in a string literal one level deeper, if that is not too deep.
fn code(b: &[u8], t: Token, depth: u8, edits: &mut Vec<Edit>) {
    if depth >= MAX_DEPTH {
        return;
    }
    match t.kind {
        Kind::Dollar(_) => {
            let (start, end) = dollar_body(b, t);
            find_secrets(&b[..end], start, depth + 1, edits);
        }
        Kind::Str(escapes) => quoted_code(b, t, escapes, depth, edits),
        _ => {}
    }
}

/// Code in a single-quoted literal: its content, unescaped, is searched as a text of its own;
/// if that finds anything, the whole literal gives way to one quoted around the redacted
/// content, so that the stored text still reads as SQL. Otherwise it is left byte for byte.
fn quoted_code(b: &[u8], t: Token, escapes: bool, depth: u8, edits: &mut Vec<Edit>) {
    let c = content(b, t);
    // The search reads the content, so the check does too: escapes can spell a needle.
    if !mentions(&c.bytes, NEEDLES.len()) {
        return;
    }
    let mut inner = Vec::new();
    find_secrets(&c.bytes, 0, depth + 1, &mut inner);
    if inner.is_empty() {
        return;
    }
    let (text, secrets) = apply(&c.bytes, inner);
    let source = t.text(b);
    let prefix = &source[..source.iter().position(|&x| x == b'\'').unwrap_or(0)];
    let with = Cow::Owned(requote(prefix, &text, escapes));
    edits.push(Edit { start: t.start, end: t.end, with, secrets });
}

/// `prefix` (`E`, `U&`, ...: kept, so the literal means what it meant) and `content` in quotes,
/// escaped to read back as `content`: `'` doubled, which E'' takes too whatever backslash_quote
/// says; in E'' also `\` doubled, and NUL and bytes that are not UTF-8, which text cannot
/// hold, as `\xNN`. Only E'' content can hold those, so a plain literal passes them on to the
/// E'' around it.
fn requote(prefix: &[u8], content: &[u8], escapes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + content.len() + 2);
    out.extend_from_slice(prefix);
    out.push(b'\'');
    for chunk in content.utf8_chunks() {
        for &c in chunk.valid().as_bytes() {
            match c {
                b'\'' => out.extend_from_slice(b"''"),
                b'\\' if escapes => out.extend_from_slice(b"\\\\"),
                0 if escapes => out.extend_from_slice(&hex_escape(c)),
                _ => out.push(c),
            }
        }
        for &c in chunk.invalid() {
            if escapes {
                out.extend_from_slice(&hex_escape(c));
            } else {
                out.push(c);
            }
        }
    }
    out.push(b'\'');
    out
}

/// `\xNN`, two digits always, so that a hex digit after it is not read as a third.
fn hex_escape(c: u8) -> [u8; 4] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [b'\\', b'x', DIGITS[usize::from(c >> 4)], DIGITS[usize::from(c & 15)]]
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`.
fn is_routine_statement(word: &impl Fn(usize, &str) -> bool, i: usize) -> bool {
    let at = if word(i + 1, "or") && word(i + 2, "replace") { i + 3 } else { i + 1 };
    word(i, "create") && (word(at, "function") || word(at, "procedure"))
}

/// A setting in CONNINFO_SETTINGS, named as a word or a quoted identifier: setting names
/// ignore case either way.
fn is_conninfo_setting(b: &[u8], t: &Token) -> bool {
    let text = t.text(b);
    let name = match t.kind {
        Kind::QuotedIdent => text.strip_prefix(b"\"").and_then(|n| n.strip_suffix(b"\"")),
        _ => Some(text),
    };
    name.is_some_and(|n| CONNINFO_SETTINGS.iter().any(|s| n.eq_ignore_ascii_case(s.as_bytes())))
}

/// `CREATE|ALTER ROLE|USER|GROUP`, but not `CREATE|ALTER USER MAPPING`.
fn is_role_statement(word: &impl Fn(usize, &str) -> bool, i: usize) -> bool {
    (word(i, "create") || word(i, "alter"))
        && (word(i + 1, "role") || word(i + 1, "user") || word(i + 1, "group"))
        && !word(i + 2, "mapping")
}

fn is_password_value(b: &[u8], v: &Token, bare_ok: bool) -> bool {
    match v.kind {
        Kind::Str(_) | Kind::Dollar(_) => true,
        // Syntax errors (`PASSWORD hunter2`, `PASSWORD "hunter2"`) still carry the password.
        Kind::Word => bare_ok && !v.text(b).eq_ignore_ascii_case(b"null"),
        Kind::Number | Kind::QuotedIdent => bare_ok,
        _ => false,
    }
}

/// The whole token is the secret; what is recorded is its value.
fn token_secret(b: &[u8], t: Token) -> Edit {
    let secret = match t.kind {
        Kind::Str(_) | Kind::Dollar(_) => {
            String::from_utf8_lossy(&content(b, t).bytes).into_owned()
        }
        Kind::QuotedIdent => {
            let inner = &t.text(b)[1..];
            let inner = inner.strip_suffix(b"\"").unwrap_or(inner);
            String::from_utf8_lossy(inner).replace("\"\"", "\"")
        }
        _ => String::from_utf8_lossy(t.text(b)).into_owned(),
    };
    Edit::redacted(t.start, t.end, secret)
}

/// A literal's content after unescaping, with the offset in the source each byte came from
/// and one more for the end of the content, so that a part of it maps back to the source.
#[derive(Default)]
struct Content {
    bytes: Vec<u8>,
    pos: Vec<usize>,
}

fn content(b: &[u8], t: Token) -> Content {
    let mut c = Content::default();
    if let Kind::Dollar(_) = t.kind {
        let (start, end) = dollar_body(b, t);
        c.bytes.extend_from_slice(&b[start..end]);
        c.pos.extend(start..=end);
    } else if let Kind::Str(escapes) = t.kind {
        let quote = t.start + t.text(b).iter().position(|&x| x == b'\'').unwrap_or(0);
        let (end, closed) = scan_string(b, quote, escapes, &mut |x, at| {
            c.bytes.push(x);
            c.pos.push(at);
        });
        c.pos.push(if closed { end - 1 } else { end });
    }
    c
}

/// Redacts the password in a libpq connection string: `password=` values and the password
/// of a `postgres[ql]://user:password@host` URI. `dbname` may itself hold a connection string.
fn conninfo(c: &Content, depth: u8, edits: &mut Vec<Edit>) {
    let s = &c.bytes;
    if s.starts_with(b"postgresql://") || s.starts_with(b"postgres://") {
        return uri(c, edits);
    }
    let mut i = 0;
    loop {
        i = skip(s, i, is_space);
        let key_start = i;
        i = skip(s, i, |x| !is_space(x) && x != b'=');
        let key = &s[key_start..i];
        i = skip(s, i, is_space);
        if s.get(i) != Some(&b'=') {
            return; // not key=value: libpq rejects it, nothing more to read
        }
        let start = skip(s, i + 1, is_space);
        let (value, value_end, end) = conn_value(s, start);
        let bytes: Vec<u8> = value.iter().map(|&k| s[k]).collect();
        // libpq's keys are case-sensitive; matching `PASSWORD` too only redacts more.
        if key.eq_ignore_ascii_case(b"password") {
            push_part(c, start..end, &bytes, edits);
        } else if key == b"dbname" && depth < 2 {
            // libpq expands a dbname holding `=` or a URI as a connection string of its own.
            let pos = value.iter().chain([&value_end]).map(|&k| c.pos[k]).collect();
            conninfo(&Content { bytes, pos }, depth + 1, edits);
        }
        i = end;
    }
}

/// The value starting at `i`, quoted or bare, with libpq's backslash escapes: the indices of
/// its bytes, where its content ends, and where the value ends (after any closing quote).
fn conn_value(s: &[u8], i: usize) -> (Vec<usize>, usize, usize) {
    let quoted = s.get(i) == Some(&b'\'');
    let mut idx = Vec::new();
    let mut j = i + quoted as usize;
    while j < s.len() {
        match s[j] {
            b'\\' if j + 1 < s.len() => {
                idx.push(j + 1);
                j += 2;
                continue;
            }
            b'\'' if quoted => return (idx, j, j + 1),
            x if !quoted && is_space(x) => break,
            _ => idx.push(j),
        }
        j += 1;
    }
    (idx, j, j)
}

fn uri(c: &Content, edits: &mut Vec<Edit>) {
    let s = &c.bytes;
    let host = if s.starts_with(b"postgresql://") { 13 } else { 11 };
    // As in libpq, user info ends at an `@` before the first `/`; here the last such `@`, so
    // that a raw `@` or `?` in the password is not left half-shown.
    let path = s[host..].iter().position(|&x| x == b'/').map_or(s.len(), |k| host + k);
    if let Some(at) = s[host..path].iter().rposition(|&x| x == b'@').map(|k| host + k) {
        if let Some(colon) = s[host..at].iter().position(|&x| x == b':').map(|k| host + k) {
            push_part(c, colon + 1..at, &s[colon + 1..at], edits);
        }
    }
    for p in host..s.len() {
        let key = s[p..].get(..9).is_some_and(|k| k.eq_ignore_ascii_case(b"password="));
        if key && matches!(s[p - 1], b'?' | b'&') {
            let end = s[p..].iter().position(|&x| x == b'&').map_or(s.len(), |k| p + k);
            push_part(c, p + 9..end, &s[p + 9..end], edits);
        }
    }
}

/// Records content bytes `start..end` as a secret, unless empty or already redacted.
fn push_part(c: &Content, part: Range<usize>, value: &[u8], edits: &mut Vec<Edit>) {
    if !part.is_empty() && value != REDACTED.as_bytes() {
        let secret = String::from_utf8_lossy(value).into_owned();
        edits.push(Edit::redacted(c.pos[part.start], c.pos[part.end], secret));
    }
}

// ---- Tokenizer ---------------------------------------------------------------------------
// Every token ends on an ASCII byte or at the end of the text, so no slice falls inside a
// UTF-8 character; anything unterminated runs to the end; every token is at least one byte.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Space,
    Comment,
    /// A string literal with its continuations; true for E'' (backslash escapes).
    Str(bool),
    /// A dollar-quoted string; the length of its `$tag$`.
    Dollar(usize),
    QuotedIdent,
    Word,
    Number,
    Param,
    Punct(u8),
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

impl Token {
    fn text<'b>(&self, b: &'b [u8]) -> &'b [u8] {
        &b[self.start..self.end]
    }

    fn is_string(&self) -> bool {
        matches!(self.kind, Kind::Str(_) | Kind::Dollar(_))
    }
}

struct Tokens<'b> {
    b: &'b [u8],
    i: usize,
}

impl Iterator for Tokens<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let start = self.i;
        if start >= self.b.len() {
            return None;
        }
        let (kind, end) = lex(self.b, start);
        self.i = end.max(start + 1); // progress, whatever a scanner returned
        Some(Token { kind, start, end: self.i })
    }
}

/// The token starting at `i`: its kind and where it ends.
fn lex(b: &[u8], i: usize) -> (Kind, usize) {
    let at = |k: usize| b.get(k).copied().unwrap_or(0);
    match b[i] {
        c if is_space(c) => (Kind::Space, skip(b, i, is_space)),
        b'-' if at(i + 1) == b'-' => (Kind::Comment, skip(b, i, |c| c != b'\n')),
        b'/' if at(i + 1) == b'*' => (Kind::Comment, block_comment_end(b, i)),
        b'\'' => (Kind::Str(false), scan_string(b, i, false, &mut |_, _| {}).0),
        b'"' => (Kind::QuotedIdent, quoted_ident_end(b, i)),
        b'$' => dollar(b, i),
        c if c.is_ascii_digit() || (c == b'.' && at(i + 1).is_ascii_digit()) => {
            (Kind::Number, number_end(b, i))
        }
        c if is_ident_start(c) => prefixed(b, i).unwrap_or((Kind::Word, skip(b, i, is_ident_cont))),
        c => (Kind::Punct(c), i + 1),
    }
}

/// `E'..'`, `B'..'`, `X'..'`, `N'..'`, `U&'..'` and `U&".."`, which start like a word.
fn prefixed(b: &[u8], i: usize) -> Option<(Kind, usize)> {
    let at = |k: usize| b.get(k).copied().unwrap_or(0);
    let plain = |q| (Kind::Str(false), scan_string(b, q, false, &mut |_, _| {}).0);
    match (b[i].to_ascii_lowercase(), at(i + 1), at(i + 2)) {
        (b'e', b'\'', _) => Some((Kind::Str(true), scan_string(b, i + 1, true, &mut |_, _| {}).0)),
        (b'b' | b'x' | b'n', b'\'', _) => Some(plain(i + 1)),
        (b'u', b'&', b'\'') => Some(plain(i + 2)),
        (b'u', b'&', b'"') => Some((Kind::QuotedIdent, quoted_ident_end(b, i + 2))),
        _ => None,
    }
}

/// Scans the literal whose opening quote is at `q`, with its continuations (another literal
/// after whitespace holding a newline); `emit` gets each content byte and where it came from.
/// Returns the end and whether the last part was closed. Plain literals take backslashes as
/// they are (standard_conforming_strings = on, PostgreSQL's default since 9.1).
fn scan_string(
    b: &[u8],
    q: usize,
    escapes: bool,
    emit: &mut impl FnMut(u8, usize),
) -> (usize, bool) {
    let mut i = q + 1;
    loop {
        match b.get(i) {
            None => return (i, false),
            Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                emit(b'\'', i);
                i += 2;
            }
            Some(b'\'') => match continuation(b, i + 1) {
                Some(next) => i = next + 1,
                None => return (i + 1, true),
            },
            Some(b'\\') if escapes => i = unescape(b, i, emit),
            Some(&c) => {
                emit(c, i);
                i += 1;
            }
        }
    }
}

/// Where the next part of a continued literal opens, if the text at `i` continues one.
/// As in PostgreSQL, `--` comments may sit in the gap; block comments may not.
fn continuation(b: &[u8], mut i: usize) -> Option<usize> {
    let mut newline = false;
    loop {
        match b.get(i)? {
            b'\n' => newline = true,
            b'-' if b.get(i + 1) == Some(&b'-') => i = skip(b, i, |c| c != b'\n') - 1,
            b'\'' if newline => return Some(i),
            &c if is_space(c) => {}
            _ => return None,
        }
        i += 1;
    }
}

/// Decodes the backslash escape at `i` in an E'' string; returns where it ends.
fn unescape(b: &[u8], i: usize, emit: &mut impl FnMut(u8, usize)) -> usize {
    let Some(&c) = b.get(i + 1) else { return i + 1 };
    let simple = match c {
        b'b' => 8,
        b'f' => 12,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => 0,
    };
    let (radix, max, from) = match c {
        b'0'..=b'7' => (8, 3, i + 1),
        b'x' => (16, 2, i + 2),
        b'u' => (16, 4, i + 2),
        b'U' => (16, 8, i + 2),
        _ => (0, 0, 0),
    };
    let digits = if max > 0 {
        b[from..].iter().take(max).take_while(|d| (**d as char).is_digit(radix)).count()
    } else {
        0
    };
    if digits == 0 {
        emit(if simple != 0 { simple } else { c }, i); // `\'`, `\\`, `\n`, ...
        return i + 2;
    }
    let v = b[from..from + digits].iter().fold(0u32, |v, d| {
        v.wrapping_mul(radix).wrapping_add((*d as char).to_digit(radix).unwrap_or(0))
    });
    if matches!(c, b'u' | b'U') {
        let mut buf = [0; 4];
        for &x in char::from_u32(v).unwrap_or('\u{FFFD}').encode_utf8(&mut buf).as_bytes() {
            emit(x, i);
        }
    } else {
        emit(v as u8, i);
    }
    from + digits
}

fn quoted_ident_end(b: &[u8], q: usize) -> usize {
    let mut i = q + 1;
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) != Some(&b'"') {
                return i + 1;
            }
            i += 1;
        }
        i += 1;
    }
    b.len()
}

/// Block comments nest in PostgreSQL: `/* a /* b */ still a comment */`.
fn block_comment_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => depth += 1,
            (b'*', b'/') if depth == 1 => return i + 2,
            (b'*', b'/') => depth -= 1,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    b.len()
}

/// `$1` (a parameter), `$tag$ .. $tag$` (a dollar-quoted string) or a lone `$`.
fn dollar(b: &[u8], i: usize) -> (Kind, usize) {
    let first = b.get(i + 1).copied().unwrap_or(0);
    if first.is_ascii_digit() {
        return (Kind::Param, skip(b, i + 1, |c| c.is_ascii_digit()));
    }
    let tag_end = if is_ident_start(first) {
        skip(b, i + 1, |c| c != b'$' && is_ident_cont(c))
    } else {
        i + 1
    };
    if b.get(tag_end) != Some(&b'$') {
        return (Kind::Punct(b'$'), i + 1);
    }
    let tag = &b[i..=tag_end];
    let body = tag_end + 1;
    let end = b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |k| body + k + tag.len());
    (Kind::Dollar(tag.len()), end)
}

/// The body of a dollar-quoted token, without its tags (an unterminated one runs to the end).
fn dollar_body(b: &[u8], t: Token) -> (usize, usize) {
    let Kind::Dollar(tag) = t.kind else { return (t.start, t.end) };
    let closed = t.end - t.start >= 2 * tag && b[t.end - tag..t.end] == b[t.start..t.start + tag];
    (t.start + tag, if closed { t.end - tag } else { t.end })
}

/// Lenient on purpose: `1e-5`, `0x1F`, `1_000` and even trailing junk such as `123abc` are
/// one token, so that a numeric password is redacted whole.
fn number_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        let exponent_sign = matches!(c, b'+' | b'-') && matches!(b[j - 1], b'e' | b'E');
        if !(c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || exponent_sign) {
            break;
        }
        j += 1;
    }
    j
}

fn skip(b: &[u8], i: usize, keep: impl Fn(u8) -> bool) -> usize {
    b[i..].iter().position(|&c| !keep(c)).map_or(b.len(), |k| i + k)
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Bytes from 0x80 up are letters to PostgreSQL's lexer, so non-ASCII never splits a word.
fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts the exact output and secrets, and that redacting the output changes nothing.
    fn check(sql: &str, text: &str, secrets: &[&str]) {
        let r = redact(sql);
        let expected: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        assert_eq!((r.text.as_ref(), &r.secrets), (text, &expected), "redacting {sql:?}");
        assert_eq!(matches!(r.text, Cow::Borrowed(_)), secrets.is_empty(), "{sql:?}");
        assert_eq!(redact(&r.text), Redacted { text: r.text.clone(), secrets: vec![] });
    }

    fn unchanged(sql: &str) {
        check(sql, sql, &[]);
    }

    /// A password `value` in a role statement, followed by more options.
    fn pw(value: &str, secret: &str) {
        let sql = format!("ALTER ROLE r PASSWORD {value} LOGIN");
        check(&sql, "ALTER ROLE r PASSWORD <redacted> LOGIN", &[secret]);
    }

    /// A connection string literal, as written and as redacted.
    fn conn(literal: &str, redacted: &str, secrets: &[&str]) {
        let sql = format!("CREATE SUBSCRIPTION s CONNECTION {literal} PUBLICATION p");
        check(&sql, &format!("CREATE SUBSCRIPTION s CONNECTION {redacted} PUBLICATION p"), secrets);
    }

    #[test]
    fn role_statements() {
        check("CREATE ROLE r PASSWORD 'x'", "CREATE ROLE r PASSWORD <redacted>", &["x"]);
        check(
            "create user u encrypted password 'x'",
            "create user u encrypted password <redacted>",
            &["x"],
        );
        check(
            "CREATE GROUP g WITH PASSWORD 'x'",
            "CREATE GROUP g WITH PASSWORD <redacted>",
            &["x"],
        );
        check("ALTER USER u PASSWORD hunter2;", "ALTER USER u PASSWORD <redacted>;", &["hunter2"]);
        check(
            "CREATE ROLE password PASSWORD 'x'",
            "CREATE ROLE password PASSWORD <redacted>",
            &["x"],
        );
        // What psql's \password sends.
        let scram = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVkS2V5:c2VydmVyS2V5";
        check(
            &format!("ALTER USER u PASSWORD '{scram}'"),
            "ALTER USER u PASSWORD <redacted>",
            &[scram],
        );
        check(
            "ALTER ROLE r PASSWORD /* c */ -- c\n 'x'",
            "ALTER ROLE r PASSWORD /* c */ -- c\n <redacted>",
            &["x"],
        );
        unchanged("ALTER ROLE r PASSWORD NULL");
        unchanged("alter role r password null");
        unchanged("ALTER ROLE r PASSWORD");
        unchanged("CREATE ROLE r IN ROLE password LOGIN");
        unchanged("ALTER GROUP g ADD USER bob, password, eve");
    }

    #[test]
    fn password_value_forms() {
        pw("'x'", "x");
        pw("'it''s'", "it's");
        pw("''", "");
        pw("'a\\'", "a\\"); // standard_conforming_strings: a backslash is a character
        pw("E'it\\'s \\\\'", "it's \\");
        pw("e'a''b\\n\\x41\\101\\u00e9\\q'", "a'b\nAAéq");
        pw("U&'d\\0061ta'", "d\\0061ta");
        pw("B'101'", "101");
        pw("X'ff'", "ff");
        pw("N'x'", "x");
        pw("'ab'\n  'cd'", "abcd");
        pw("E'a\\'' -- why\n'b'", "a'b");
        pw("$$x$$", "x");
        pw("$pw$a$b$$pw$", "a$b$");
        pw("hunter2", "hunter2");
        pw("\"hunter\"\"2\"", "hunter\"2");
        pw("12345", "12345");
        pw("1e-5", "1e-5");
        pw("'pässwörd✓'", "pässwörd✓");
        pw("mötdepasse", "mötdepasse");
        // Without a newline between them two literals are two tokens (and a syntax error).
        check("ALTER ROLE r PASSWORD 'a' 'b'", "ALTER ROLE r PASSWORD <redacted> 'b'", &["a"]);
    }

    #[test]
    fn several_statements_and_bodies() {
        check(
            "CREATE ROLE a PASSWORD 'x'; CREATE ROLE «b» PASSWORD 'y'; ALTER ROLE c PASSWORD 'x'",
            "CREATE ROLE a PASSWORD <redacted>; CREATE ROLE «b» PASSWORD <redacted>; \
             ALTER ROLE c PASSWORD <redacted>",
            &["x", "y"],
        );
        // The role statement ends at `;`: afterwards `password` is a column again.
        check(
            "ALTER USER u PASSWORD 'x'; SELECT password FROM t",
            "ALTER USER u PASSWORD <redacted>; SELECT password FROM t",
            &["x"],
        );
        check(
            "DO $do$ BEGIN IF true THEN CREATE ROLE app PASSWORD 'p'; END IF; END $do$",
            "DO $do$ BEGIN IF true THEN CREATE ROLE app PASSWORD <redacted>; END IF; END $do$",
            &["p"],
        );
        check(
            "SELECT $a$ $b$ alter user u password pw $b$ $a$",
            "SELECT $a$ $b$ alter user u password <redacted> $b$ $a$",
            &["pw"],
        );
    }

    #[test]
    fn options() {
        check(
            "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'p')",
            "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password <redacted>)",
            &["p"],
        );
        check(
            "ALTER SERVER s OPTIONS (ADD api_token 't', SET \"Client_Secret\" $$c$$, DROP password)",
            "ALTER SERVER s OPTIONS (ADD api_token <redacted>, SET \"Client_Secret\" <redacted>, DROP password)",
            &["t", "c"],
        );
        check(
            "ALTER USER MAPPING FOR u SERVER s OPTIONS (SET PassWord E'q\\'')",
            "ALTER USER MAPPING FOR u SERVER s OPTIONS (SET PassWord <redacted>)",
            &["q'"],
        );
        check(
            "CREATE FOREIGN TABLE f (c int OPTIONS (column_name 'secret')) SERVER s OPTIONS (secret 'k')",
            "CREATE FOREIGN TABLE f (c int OPTIONS (column_name 'secret')) SERVER s OPTIONS (secret <redacted>)",
            &["k"],
        );
        unchanged("CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host 'h', dbname 'password')");
        unchanged("ALTER USER MAPPING FOR password SERVER s OPTIONS (DROP password)");
        unchanged("SELECT secret_key 'k'"); // an option-like name outside OPTIONS is just a name
    }

    #[test]
    fn connection_strings() {
        conn(
            "'host=h password=hunter2 dbname=d'",
            "'host=h password=<redacted> dbname=d'",
            &["hunter2"],
        );
        conn("'PASSWORD = ''a \\''b'' user=u'", "'PASSWORD = <redacted> user=u'", &["a 'b"]);
        conn("E'password=\\'x y\\''", "E'password=<redacted>'", &["x y"]);
        conn("'password=a\\ b port=1'", "'password=<redacted> port=1'", &["a b"]);
        // No needle but `connection` in this text: the pre-check must still let it through.
        conn(
            "'postgresql://rep:s3cr@t@db/d?ssl=1'",
            "'postgresql://rep:<redacted>@db/d?ssl=1'",
            &["s3cr@t"],
        );
        conn(
            "$$postgres://rep@h/d?password=pw&x=1$$",
            "$$postgres://rep@h/d?password=<redacted>&x=1$$",
            &["pw"],
        );
        conn(
            "'dbname=''postgres://u:pw@h/d'' port=5'",
            "'dbname=''postgres://u:<redacted>@h/d'' port=5'",
            &["pw"],
        );
        conn("'dbname=''password=x port=5'''", "'dbname=''password=<redacted> port=5'''", &["x"]);
        conn("'postgresql://u:pa?ss@h/d'", "'postgresql://u:<redacted>@h/d'", &["pa?ss"]);
        let app = "'postgres://h/d?application_name=a@b&password=";
        conn(&format!("{app}pw'"), &format!("{app}<redacted>'"), &["pw"]);
        conn(
            "'postgres://h:5?password=x&a@b'",
            "'postgres://h:<redacted>@b'",
            &["5?password=x&a", "x"],
        );
        unchanged("ALTER SUBSCRIPTION s CONNECTION 'host=h user=u dbname=d'");
        unchanged("ALTER SUBSCRIPTION s CONNECTION 'postgresql://u@h/d'");
        unchanged("ALTER SUBSCRIPTION s CONNECTION 'password= '");
    }

    #[test]
    fn nothing_else_is_a_secret() {
        unchanged("SELECT * FROM users WHERE password = 'x'");
        unchanged("SELECT 'password'");
        unchanged("SELECT password, token FROM users u WHERE u.secret IS NOT NULL");
        unchanged("INSERT INTO t (password) VALUES ('x')");
        unchanged("-- ALTER ROLE r PASSWORD 'x'\nSELECT 1");
        unchanged("/* outer /* ALTER ROLE r PASSWORD 'x' */ still comment */ SELECT 1");
        unchanged("SELECT \"password\" 'x'");
        unchanged("SELECT 'CREATE ROLE r PASSWORD ''x'''");
        unchanged("SELECT E'\\' PASSWORD \\'x'");
        unchanged("SELECT mypassword 'x'");
        unchanged("SELECT 1");
    }

    #[test]
    fn unterminated_inputs() {
        check("ALTER ROLE r PASSWORD 'never", "ALTER ROLE r PASSWORD <redacted>", &["never"]);
        check("ALTER ROLE r PASSWORD E'never\\'", "ALTER ROLE r PASSWORD <redacted>", &["never'"]);
        check(
            "ALTER ROLE r PASSWORD $t$ never $t",
            "ALTER ROLE r PASSWORD <redacted>",
            &[" never $t"],
        );
        check("ALTER ROLE r PASSWORD \"never", "ALTER ROLE r PASSWORD <redacted>", &["never"]);
        check(
            "ALTER SUBSCRIPTION s CONNECTION 'password=x",
            "ALTER SUBSCRIPTION s CONNECTION 'password=<redacted>",
            &["x"],
        );
        unchanged("SELECT 1 /* /* */ password 'x'");
        unchanged("SELECT 'password 'x");
        unchanged("ALTER ROLE r PASSWORD $");
    }

    /// `s` as a plain literal.
    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// A DO whose body holds `innermost` `levels` literals deep: each level but the first an
    /// EXECUTE, the odd ones dollar-quoted if `dollar`, all others single-quoted.
    fn nested(levels: u8, dollar: bool, innermost: &str) -> String {
        let mut sql = innermost.to_string();
        for k in (1..=levels).rev() {
            let literal =
                if dollar && k % 2 == 1 { format!("$t{k}${sql}$t{k}$") } else { quote(&sql) };
            sql = if k == 1 {
                format!("DO {literal}")
            } else {
                format!("BEGIN EXECUTE {literal}; END")
            };
        }
        sql
    }

    #[test]
    fn quoted_do_bodies() {
        check(
            "DO 'BEGIN ALTER ROLE r PASSWORD ''s3cret''; END'",
            "DO 'BEGIN ALTER ROLE r PASSWORD <redacted>; END'",
            &["s3cret"],
        );
        check(
            "DO LANGUAGE plpgsql 'BEGIN CREATE ROLE a PASSWORD ''it''''s''; END'",
            "DO LANGUAGE plpgsql 'BEGIN CREATE ROLE a PASSWORD <redacted>; END'",
            &["it's"],
        );
        // The rest of the body is quoted as before; secrets come in the order of the text, once.
        check(
            "DO 'BEGIN RAISE NOTICE ''it''''s a\\b''; ALTER ROLE a PASSWORD ''x''; \
             ALTER ROLE b PASSWORD ''y''; END' LANGUAGE plpgsql; \
             ALTER ROLE c PASSWORD 'x'",
            "DO 'BEGIN RAISE NOTICE ''it''''s a\\b''; ALTER ROLE a PASSWORD <redacted>; \
             ALTER ROLE b PASSWORD <redacted>; END' LANGUAGE plpgsql; \
             ALTER ROLE c PASSWORD <redacted>",
            &["x", "y"],
        );
        check(
            "do language 'plpgsql' /* c */ 'begin alter user u password pw; end'",
            "do language 'plpgsql' /* c */ 'begin alter user u password <redacted>; end'",
            &["pw"],
        );
        check(
            "DO 'BEGIN ALTER ROLE «r» PASSWORD ''pässwörd✓''; END'",
            "DO 'BEGIN ALTER ROLE «r» PASSWORD <redacted>; END'",
            &["pässwörd✓"],
        );
        // Continued parts become one literal; an unterminated one is closed.
        check(
            "DO 'BEGIN ALTER ROLE r PASSWORD ''x'';'\n  ' END'",
            "DO 'BEGIN ALTER ROLE r PASSWORD <redacted>; END'",
            &["x"],
        );
        check(
            "DO 'ALTER ROLE r PASSWORD ''never",
            "DO 'ALTER ROLE r PASSWORD <redacted>'",
            &["never"],
        );
        // A U&'' literal keeps its prefix, so that its escapes still mean what they meant.
        check(
            r"DO U&'BEGIN RAISE NOTICE ''\00e9''; ALTER ROLE r PASSWORD ''x''; END'",
            r"DO U&'BEGIN RAISE NOTICE ''\00e9''; ALTER ROLE r PASSWORD <redacted>; END'",
            &["x"],
        );
        // No secret: byte for byte, even where quoting again would write it differently.
        unchanged("DO 'BEGIN RAISE NOTICE ''password''; END'");
        unchanged("DO 'BEGIN ALTER ROLE r PASSWORD NULL; END'\n' '");
        unchanged(r"DO E'BEGIN RAISE NOTICE \'password\\n\'; END'");
        unchanged("DO $$BEGIN RAISE NOTICE 'password'; END$$");
        // Not a DO body: ON CONFLICT's DO takes no literal, and a literal is just a literal.
        unchanged(
            "INSERT INTO t VALUES (1) ON CONFLICT (a) \
             DO UPDATE SET c = 'ALTER ROLE r PASSWORD ''x'''",
        );
        unchanged("SELECT 'DO ''ALTER ROLE r PASSWORD x'''");
        unchanged("DO; SELECT 'ALTER ROLE r PASSWORD ''x'''");
    }

    #[test]
    fn quoted_function_bodies() {
        check(
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'ALTER ROLE r PASSWORD ''x'''",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'ALTER ROLE r PASSWORD <redacted>'",
            &["x"],
        );
        check(
            "create or replace procedure p(a text default 'password') as \
             'begin create user u password ''x''; end' language plpgsql",
            "create or replace procedure p(a text default 'password') as \
             'begin create user u password <redacted>; end' language plpgsql",
            &["x"],
        );
        check(
            "CREATE FUNCTION f() RETURNS void AS $f$ BEGIN \
             EXECUTE 'ALTER ROLE r PASSWORD ''x'''; END $f$ LANGUAGE plpgsql",
            "CREATE FUNCTION f() RETURNS void AS $f$ BEGIN \
             EXECUTE 'ALTER ROLE r PASSWORD <redacted>'; END $f$ LANGUAGE plpgsql",
            &["x"],
        );
        // An argument's default is no body; a C function's file and symbol hold no statement.
        unchanged(
            "CREATE FUNCTION f(a text DEFAULT 'ALTER ROLE r PASSWORD ''x''') RETURNS text \
             AS 'SELECT a' LANGUAGE sql",
        );
        unchanged("CREATE FUNCTION f() RETURNS text AS 'plain text without secrets' LANGUAGE sql");
        unchanged("CREATE FUNCTION f() RETURNS text AS 'SELECT ''password''' LANGUAGE sql");
        unchanged("CREATE FUNCTION f(int) RETURNS int AS 'password_lib', 'f' LANGUAGE C");
        // AS takes a body only in CREATE FUNCTION|PROCEDURE, which ends at `;`.
        unchanged(
            "CREATE FUNCTION f() RETURNS int RETURN 1; SELECT 1 AS 'ALTER ROLE r PASSWORD ''x'''",
        );
        unchanged("CREATE AGGREGATE a AS 'ALTER ROLE r PASSWORD ''x'''");
    }

    #[test]
    fn execute_strings() {
        check(
            "DO $$BEGIN EXECUTE 'CREATE ROLE x PASSWORD ''s3cret'''; END$$",
            "DO $$BEGIN EXECUTE 'CREATE ROLE x PASSWORD <redacted>'; END$$",
            &["s3cret"],
        );
        check(
            "DO 'BEGIN EXECUTE ''CREATE ROLE x PASSWORD ''''s3cret''''''; END'",
            "DO 'BEGIN EXECUTE ''CREATE ROLE x PASSWORD <redacted>''; END'",
            &["s3cret"],
        );
        check(
            "DO $$BEGIN FOR r IN EXECUTE ('ALTER ROLE a PASSWORD ''x''') LOOP END LOOP; \
             RETURN QUERY execute E'ALTER ROLE b PASSWORD \\'y\\''; END$$",
            "DO $$BEGIN FOR r IN EXECUTE ('ALTER ROLE a PASSWORD <redacted>') LOOP END LOOP; \
             RETURN QUERY execute E'ALTER ROLE b PASSWORD <redacted>'; END$$",
            &["x", "y"],
        );
        check(
            "DO $$BEGIN EXECUTE 'ALTER SUBSCRIPTION s \
             CONNECTION ''host=h password=pw'''; END$$",
            "DO $$BEGIN EXECUTE 'ALTER SUBSCRIPTION s \
             CONNECTION ''host=h password=<redacted>'''; END$$",
            &["pw"],
        );
        // Outside a body, EXECUTE runs a prepared statement, never a literal.
        unchanged("SELECT 'EXECUTE ''x'' password'");
        unchanged("EXECUTE 'ALTER ROLE r PASSWORD ''x'''");
        // Only the literal EXECUTE runs, as written: nothing is put together.
        unchanged("DO $$BEGIN EXECUTE 'ALTER ROLE r PASSWORD ' || quote_literal(p); END$$");
        unchanged("DO $$BEGIN EXECUTE format('ALTER ROLE r PASSWORD %L', 'x'); END$$");
        unchanged("DO $$BEGIN PERFORM 'ALTER ROLE r PASSWORD ''x'''; END$$");
    }

    #[test]
    fn e_strings_are_quoted_again_as_e_strings() {
        check(
            r"DO E'BEGIN RAISE NOTICE \'C:\\tmp\n\'; ALTER ROLE r PASSWORD \'x\\y\'; END'",
            "DO E'BEGIN RAISE NOTICE ''C:\\\\tmp\n''; ALTER ROLE r PASSWORD <redacted>; END'",
            &["x\\y"],
        );
        // Text cannot hold NUL nor other than UTF-8: those are escaped again.
        check(
            r"DO e'\x00\xff\u00e9 ALTER ROLE r PASSWORD ''x'''",
            r"DO e'\x00\xffé ALTER ROLE r PASSWORD <redacted>'",
            &["x"],
        );
        // The secret is the value after both levels of unescaping.
        check(
            r"DO $$BEGIN EXECUTE E'ALTER ROLE r PASSWORD ''a\\''''b\x41'''; END$$",
            r"DO $$BEGIN EXECUTE E'ALTER ROLE r PASSWORD <redacted>'; END$$",
            &["a\\'bA"],
        );
        // The check within a body reads its content: an escape can spell a keyword there.
        check(
            r"DO $$BEGIN RAISE NOTICE 'token'; EXECUTE E'ALTER ROLE r \120ASSWORD ''x'''; END$$",
            r"DO $$BEGIN RAISE NOTICE 'token'; EXECUTE E'ALTER ROLE r PASSWORD <redacted>'; END$$",
            &["x"],
        );
        // In a plain body an E'' literal keeps its own escapes: the body only doubles quotes.
        check(
            r"DO 'BEGIN EXECUTE E''ALTER ROLE r PASSWORD \''x\'' -- \\''; END'",
            r"DO 'BEGIN EXECUTE E''ALTER ROLE r PASSWORD <redacted> -- \\''; END'",
            &["x"],
        );
    }

    #[test]
    fn nested_bodies() {
        for dollar in [false, true] {
            for levels in 1..=MAX_DEPTH {
                let sql = nested(levels, dollar, "ALTER ROLE r PASSWORD 'x'");
                check(&sql, &nested(levels, dollar, "ALTER ROLE r PASSWORD <redacted>"), &["x"]);
            }
            // Deeper is not searched: the bound is the same for both kinds of quotes.
            unchanged(&nested(MAX_DEPTH + 1, dollar, "ALTER ROLE r PASSWORD 'x'"));
        }
        assert_eq!(
            nested(3, true, "ALTER ROLE r PASSWORD 'x'"),
            "DO $t1$BEGIN EXECUTE 'BEGIN EXECUTE $t3$ALTER ROLE r PASSWORD ''x''$t3$; END'; END$t1$"
        );
    }

    #[test]
    fn conninfo_settings() {
        check(
            "ALTER SYSTEM SET primary_conninfo = 'host=h password=secret'",
            "ALTER SYSTEM SET primary_conninfo = 'host=h password=<redacted>'",
            &["secret"],
        );
        // No needle but `conninfo` in this text.
        check(
            "ALTER SYSTEM SET primary_conninfo TO 'postgresql://rep:pw@h/d'",
            "ALTER SYSTEM SET primary_conninfo TO 'postgresql://rep:<redacted>@h/d'",
            &["pw"],
        );
        check(
            "SET SESSION Primary_Conninfo = E'user=u password=\\'a b\\''",
            "SET SESSION Primary_Conninfo = E'user=u password=<redacted>'",
            &["a b"],
        );
        check(
            "set \"primary_conninfo\" to $$password=x$$",
            "set \"primary_conninfo\" to $$password=<redacted>$$",
            &["x"],
        );
        check(
            "ALTER ROLE r SET primary_conninfo = 'password=x'; \
             SET primary_conninfo TO 'password=y'",
            "ALTER ROLE r SET primary_conninfo = 'password=<redacted>'; \
             SET primary_conninfo TO 'password=<redacted>'",
            &["x", "y"],
        );
        unchanged("ALTER SYSTEM SET primary_conninfo = 'host=h user=u'");
        unchanged("ALTER SYSTEM RESET primary_conninfo");
        unchanged("SET primary_conninfo TO DEFAULT");
        unchanged("SHOW primary_conninfo");
        unchanged("SET application_name = 'password=x'");
        for name in CONNINFO_SETTINGS {
            assert!(mentions(name.as_bytes(), NEEDLES.len()), "{name} escapes the pre-check");
        }
    }

    #[test]
    fn statement_starts() {
        assert_eq!(statement_start("/* m */ SELECT 1", 8), 0);
        assert_eq!(statement_start("SELECT 1; /* m */ UPDATE t", 18), 9);
        assert_eq!(statement_start("SELECT ';'; SELECT 2", 12), 11);
        assert_eq!(statement_start("SELECT 1; -- c\nSELECT 2", 15), 9);
        // PostgreSQL 15 to 17 give the place right after the `;`.
        assert_eq!(statement_start("SELECT 1;SELECT 2", 9), 9);
        assert_eq!(statement_start("SELECT 1; SELECT 2; SELECT 3", 20), 19);
        // `;` that end no statement.
        let sql = "SELECT 1 /* ; /* ; */ ; */, \"a;b\", $q$;$q$, E'\\';', ';' -- ;\n; SELECT 2";
        assert_eq!(statement_start(sql, sql.len() - 8), sql.len() - 9);
        assert_eq!(statement_start("SELECT 'a;'\n'b;'; SELECT 2", 18), 17);
        // Odd locations: 0, the `;` itself, past the end, inside a character or a literal.
        assert_eq!(statement_start("SELECT 1; SELECT 2", 0), 0);
        assert_eq!(statement_start("SELECT 1; SELECT 2", 8), 0);
        assert_eq!(statement_start("SELECT 1; SELECT 2", 100), 9);
        assert_eq!(statement_start("", 5), 0);
        assert_eq!(statement_start("SELECT 1;é", 10), 9);
        assert_eq!(statement_start("SELECT 'é;'; SELECT 2", 9), 0);
        assert_eq!(statement_start("SELECT 'é;'; SELECT 2", 11), 0);
        assert_eq!(statement_start("SELECT 1; SELECT ';", usize::MAX), 9);
    }

    /// The pre-check searches long texts a block at a time: a needle anywhere, across a
    /// block's end included, is found, as the plain definition finds it.
    #[test]
    fn pre_check_finds_needles_across_blocks() {
        let plain = |b: &[u8], n: usize| {
            NEEDLES[..n].iter().any(|w| b.windows(w.len()).any(|x| x.eq_ignore_ascii_case(w)))
        };
        let (block, step) = (MENTIONS_BLOCK, MENTIONS_BLOCK - MENTIONS_OVERLAP);
        for len in [0, 1, 7, 8, block - 1, block, block + 1, 2 * step, 2 * step + 1, 3 * block + 5, 12_000] {
            let filler = vec![b'x'; len];
            assert!(!mentions(&filler, NEEDLES.len()), "{len} bytes of filler");
            // Around every block boundary (a needle ending just before, across, just after).
            for at in (0..=len).filter(|a| a % step < 12 || a % step + 12 > step || *a + 12 > len) {
                for w in ["PassWord", "conninfo", "CONNECTION", "token"] {
                    let mut t = filler.clone();
                    t.splice(at..at, w.bytes());
                    assert!(mentions(&t, NEEDLES.len()), "{w} at {at} of {}", t.len());
                    assert_eq!(mentions(&t, OPTION_NEEDLES), plain(&t, OPTION_NEEDLES), "{w} at {at}");
                }
            }
        }
    }

    #[test]
    fn pre_check_ignores_ascii_case_only() {
        for text in ["x PaSsWoRd", "tOkEn", "SECRET", "CONNECTION", "«pass»", "Primary_ConnInfo"]
        {
            assert!(mentions(text.as_bytes(), NEEDLES.len()), "{text}");
        }
        assert!(!mentions("p\x01ss P@SS pasś t0ken secre connect conninf".as_bytes(), NEEDLES.len()));
    }

    #[test]
    fn bind_params() {
        assert!(has_bind_params("SELECT $1"));
        assert!(has_bind_params("UPDATE t SET a = 1 WHERE x = $12"));
        assert!(has_bind_params("SELECT $$x$$, $2"));
        assert!(!has_bind_params("SELECT 1"));
        assert!(!has_bind_params("SELECT '$1'"));
        assert!(!has_bind_params("SELECT $$ $1 $$"));
        assert!(!has_bind_params("SELECT $q$ $1 $q$"));
        assert!(!has_bind_params("SELECT 1 -- $1"));
        assert!(!has_bind_params("SELECT /* $1 /* $2 */ $3 */ 1"));
        assert!(!has_bind_params("SELECT \"$1\", a$1, E'\\'$1'"));
        assert!(!has_bind_params("SELECT $ 1, $a"));
    }

    #[test]
    fn scrub_replaces_longest_first() {
        let secrets = ["hunter", "hunter2", "", "red"].map(String::from);
        let message = "bad hunter2 and hunter, red";
        assert_eq!(scrub(message, &secrets), "bad <redacted> and <redacted>, <redacted>");
        assert!(matches!(scrub("nothing here", &secrets), Cow::Borrowed(_)));
        assert!(matches!(scrub("x", &[]), Cow::Borrowed(_)));
        assert_eq!(scrub("é-pässé", &["ä".to_string()]), "é-p<redacted>ssé");
    }

    /// xorshift64: deterministic, no crates.
    fn next(state: &mut u64) -> usize {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state as usize
    }

    #[rustfmt::skip]
    const FRAGMENTS: &[&str] = &[
        " ", "\n", ";", "(", ")", ",", "'", "''", "\"", "$", "$$", "$t$", "/*", "*/", "--", "\\",
        "E'", "U&'", "é", "✓", "x", "1", "$1", "NULL", "PASSWORD", "password ", "OPTIONS (",
        "CONNECTION ", "CREATE ROLE r ", "ALTER USER u ", "token", "'host=h password=",
        "postgres://u:", "@h", "E'\\'", "/* /* */", "'a'\n'b'", "DO $$", "«",
        "DO ", "DO '", "DO E'", "LANGUAGE plpgsql ", "CREATE FUNCTION f() ", "CREATE OR REPLACE ",
        "PROCEDURE p() ", " AS ", "AS '", "EXECUTE ", "EXECUTE '", "EXECUTE ''", "''''", "\\\\",
        "\\x00", "\\xff", "\\120", "BEGIN ", " END'", "SET primary_conninfo ", "primary_conninfo",
        "= ", " TO ", "'password=", "conninfo",
    ];

    /// What `statement_start` answers, found the slow way: lexing the whole text.
    fn statement_start_by_full_lex(sql: &str, location: usize) -> usize {
        let ends = Tokens { b: sql.as_bytes(), i: 0 }.filter(|t| t.kind == Kind::Punct(b';'));
        ends.map(|t| t.end).filter(|&end| end <= location).last().unwrap_or(0)
    }

    #[test]
    fn fuzz_fragments() {
        let (mut state, mut marker, mut found) = (0x9E37_79B9_7F4A_7C15u64, 0, 0);
        let mut found_in_bodies = 0;
        for _ in 0..20_000 {
            let mut sql = String::new();
            for _ in 0..next(&mut state) % 14 {
                marker += 1;
                // Secrets that occur nowhere else, as standalone quoted literals or in bodies.
                match next(&mut state) % 9 {
                    0 => sql.push_str(&format!(" PASSWORD 'mk{marker}q' ")),
                    1 => sql.push_str(&format!(" OPTIONS (api_secret E'mk{marker}q') ")),
                    2 => sql.push_str(&format!(
                        "DO 'BEGIN ALTER ROLE r PASSWORD ''mk{marker}b''; END'"
                    )),
                    3 => sql.push_str(&format!(
                        "; CREATE FUNCTION f() AS E'BEGIN EXECUTE ''ALTER ROLE r PASSWORD \
                         ''''mk{marker}b''''''; END' "
                    )),
                    4 => sql.push_str(&format!(" SET primary_conninfo = 'password=mk{marker}q' ")),
                    _ => sql.push_str(FRAGMENTS[next(&mut state) % FRAGMENTS.len()]),
                }
            }
            let r = redact(&sql);
            assert_eq!(redact(&r.text), Redacted { text: r.text.clone(), secrets: vec![] });
            let scrubbed = scrub(&sql, &r.secrets);
            for s in r.secrets.iter().filter(|s| s.starts_with("mk")) {
                found += 1;
                found_in_bodies += s.contains('b') as usize;
                assert!(!r.text.contains(s.as_str()), "{s:?} left in {:?} from {sql:?}", r.text);
                assert!(!scrubbed.contains(s.as_str()), "{s:?} not scrubbed from {sql:?}");
            }
            has_bind_params(&sql);
            let location = next(&mut state) % (sql.len() + 3);
            let start = statement_start(&sql, location);
            assert!(sql.is_char_boundary(start) && start <= location, "{location} in {sql:?}");
            assert_eq!(start, statement_start_by_full_lex(&sql, location), "{location} in {sql:?}");
        }
        assert!(found > 5_000, "the fuzz found only {found} secrets");
        assert!(found_in_bodies > 1_000, "the fuzz found only {found_in_bodies} in bodies");
    }

    #[test]
    fn fuzz_characters() {
        let alphabet: Vec<char> = "'\"$-/*\\\n e&Ux1;().=@:é✓".chars().collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            let len = next(&mut state) % 24;
            let noise: String =
                (0..len).map(|_| alphabet[next(&mut state) % alphabet.len()]).collect();
            for sql in [
                format!("ALTER ROLE r PASSWORD {noise}"),
                format!("CONNECTION '{noise}"),
                format!("DO 'ALTER ROLE r PASSWORD {noise}"),
                format!("DO E'BEGIN EXECUTE ''ALTER ROLE r PASSWORD {noise}"),
                format!("SET primary_conninfo = 'password={noise}"),
            ] {
                let r = redact(&sql);
                assert_eq!(redact(&r.text), Redacted { text: r.text.clone(), secrets: vec![] });
                has_bind_params(&sql);
                for location in [0, sql.len() / 2, sql.len()] {
                    assert_eq!(
                        statement_start(&sql, location),
                        statement_start_by_full_lex(&sql, location)
                    );
                }
            }
        }
    }
}
