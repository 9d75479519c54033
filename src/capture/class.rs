//! Statement classes, named as pgAudit names them, and the `custody.audit` list parser.
//! Pure: no pg_sys, unit-tested.

/// A statement class. The discriminant is the bit in a [`ClassSet`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Class {
    Read = 0,
    Write = 1,
    Function = 2,
    Role = 3,
    Ddl = 4,
    Misc = 5,
    MiscSet = 6,
    Policy = 7,
    System = 8,
    /// Connections: successful and failed authentication.
    Login = 9,
}

pub const CLASS_NAMES: [&str; 10] =
    ["read", "write", "function", "role", "ddl", "misc", "misc_set", "policy", "system", "login"];

const ALL_CLASSES: [Class; 10] = [
    Class::Read,
    Class::Write,
    Class::Function,
    Class::Role,
    Class::Ddl,
    Class::Misc,
    Class::MiscSet,
    Class::Policy,
    Class::System,
    Class::Login,
];

impl Class {
    pub fn name(self) -> &'static str {
        CLASS_NAMES[self as usize]
    }

    pub fn from_u8(v: u8) -> Option<Class> {
        ALL_CLASSES.get(v as usize).copied()
    }

    pub fn from_name(name: &str) -> Option<Class> {
        CLASS_NAMES.iter().position(|n| *n == name).map(|i| ALL_CLASSES[i])
    }
}

/// A set of classes, one bit each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClassSet(u16);

impl ClassSet {
    pub const ALL: ClassSet = ClassSet((1 << 10) - 1);
    pub const NONE: ClassSet = ClassSet(0);
    /// `all, -misc_set`
    pub const DEFAULT: ClassSet = ClassSet(((1 << 10) - 1) & !(1 << Class::MiscSet as u16));

    pub fn contains(self, c: Class) -> bool {
        self.0 & (1 << c as u16) != 0
    }

    /// Parses a `custody.audit` value: comma-separated class names, `all`, `none`, and
    /// `-class` to subtract, applied left to right. Case-insensitive; blanks ignored.
    /// On error returns the offending word.
    pub fn parse(text: &str) -> Result<ClassSet, String> {
        let mut set = ClassSet::NONE;
        for raw in text.split(',') {
            let word = raw.trim().to_ascii_lowercase();
            if word.is_empty() {
                continue;
            }
            let (subtract, name) = match word.strip_prefix('-') {
                Some(rest) => (true, rest.trim()),
                None => (false, word.as_str()),
            };
            let bits = match name {
                "all" => ClassSet::ALL.0,
                "none" => 0,
                other => match Class::from_name(other) {
                    Some(c) => 1 << c as u16,
                    None => return Err(raw.trim().to_string()),
                },
            };
            if subtract {
                set.0 &= !bits;
            } else if name == "none" {
                set.0 = 0;
            } else {
                set.0 |= bits;
            }
        }
        Ok(set)
    }
}

/// Class and command of a statement known only by its text (it failed before PostgreSQL
/// could parse or plan it): from its first keyword, `misc` when unknown.
pub fn classify_text(text: &str) -> (Class, &'static str) {
    let word: String = text
        .trim_start_matches(|c: char| c.is_whitespace() || c == '(')
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    match word.as_str() {
        "SELECT" | "WITH" | "VALUES" | "TABLE" => (Class::Read, "SELECT"),
        "INSERT" => (Class::Write, "INSERT"),
        "UPDATE" => (Class::Write, "UPDATE"),
        "DELETE" => (Class::Write, "DELETE"),
        "MERGE" => (Class::Write, "MERGE"),
        "TRUNCATE" => (Class::Write, "TRUNCATE TABLE"),
        "COPY" if copy_reads(text) => (Class::Read, "COPY"),
        "COPY" => (Class::Write, "COPY"),
        "CREATE" => (Class::Ddl, "CREATE"),
        "ALTER" => (Class::Ddl, "ALTER"),
        "DROP" => (Class::Ddl, "DROP"),
        "GRANT" => (Class::Role, "GRANT"),
        "REVOKE" => (Class::Role, "REVOKE"),
        "CALL" => (Class::Function, "CALL"),
        "DO" => (Class::Function, "DO"),
        "SET" | "RESET" => (Class::MiscSet, "SET"),
        "COMMIT" | "END" => (Class::Misc, "COMMIT"),
        _ => (Class::Misc, "UNKNOWN"),
    }
}

/// Whether a COPY statement's text copies out (`TO`: class read, as pgAudit has it) rather
/// than in (`FROM`: write): `COPY (query) TO ...`, or `COPY name [(columns)] TO ...`.
fn copy_reads(text: &str) -> bool {
    let b = text.trim_start().as_bytes();
    let mut i = 4; // past COPY
    let skip_blank = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_blank(&mut i);
    if b.get(i) == Some(&b'(') {
        return true; // only COPY (query) TO exists
    }
    // the table's (qualified, possibly quoted) name
    while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'(' {
        if b[i] == b'"' {
            i += 1;
            while i < b.len() && !(b[i] == b'"' && b.get(i + 1) != Some(&b'"')) {
                i += if b[i] == b'"' { 2 } else { 1 };
            }
        }
        i += 1;
    }
    skip_blank(&mut i);
    if b.get(i) == Some(&b'(') {
        // the column list
        let mut quoted = false;
        while i < b.len() && (quoted || b[i] != b')') {
            quoted ^= b[i] == b'"';
            i += 1;
        }
        i += 1;
        skip_blank(&mut i);
    }
    b.len() >= i + 2 && b[i..i + 2].eq_ignore_ascii_case(b"TO") && b.get(i + 2).is_none_or(|c| !c.is_ascii_alphanumeric() && *c != b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_all_but_misc_set() {
        assert_eq!(ClassSet::parse("all, -misc_set").unwrap(), ClassSet::DEFAULT);
        assert!(ClassSet::DEFAULT.contains(Class::Read));
        assert!(!ClassSet::DEFAULT.contains(Class::MiscSet));
        assert!(ClassSet::DEFAULT.contains(Class::System));
    }

    #[test]
    fn lists_subtractions_and_none() {
        let s = ClassSet::parse("read, WRITE ,ddl").unwrap();
        assert!(s.contains(Class::Read) && s.contains(Class::Write) && s.contains(Class::Ddl));
        assert!(!s.contains(Class::Misc));
        assert_eq!(ClassSet::parse("none").unwrap(), ClassSet::NONE);
        assert_eq!(ClassSet::parse("").unwrap(), ClassSet::NONE);
        assert_eq!(ClassSet::parse("all,none,read").unwrap(), ClassSet::parse("read").unwrap());
        let s = ClassSet::parse("all, -read, -write").unwrap();
        assert!(!s.contains(Class::Read) && !s.contains(Class::Write) && s.contains(Class::Role));
    }

    #[test]
    fn unknown_class_is_named() {
        assert_eq!(ClassSet::parse("read, wirte").unwrap_err(), "wirte");
        assert_eq!(ClassSet::parse("-bogus").unwrap_err(), "-bogus");
    }

    #[test]
    fn text_classification() {
        assert_eq!(classify_text("  select 1/0"), (Class::Read, "SELECT"));
        assert_eq!(classify_text("(SELECT 1)"), (Class::Read, "SELECT"));
        assert_eq!(classify_text("insert into nope values (1)"), (Class::Write, "INSERT"));
        assert_eq!(classify_text("commit"), (Class::Misc, "COMMIT"));
        assert_eq!(classify_text("selct 1"), (Class::Misc, "UNKNOWN"));
        // COPY out is a read, as pgAudit and the utility hook have it; COPY in a write.
        assert_eq!(classify_text("COPY t TO STDOUT"), (Class::Read, "COPY"));
        assert_eq!(classify_text("copy s.t (a, \"b c\") to '/tmp/x'"), (Class::Read, "COPY"));
        assert_eq!(classify_text("COPY \"we\"\"ird\" TO STDOUT"), (Class::Read, "COPY"));
        assert_eq!(classify_text("COPY (SELECT 1 FROM t) TO STDOUT"), (Class::Read, "COPY"));
        assert_eq!(classify_text("COPY t FROM STDIN"), (Class::Write, "COPY"));
        assert_eq!(classify_text("COPY t (a) FROM '/tmp/x'"), (Class::Write, "COPY"));
        assert_eq!(classify_text("COPY tokens FROM STDIN"), (Class::Write, "COPY"));
        assert_eq!(classify_text(""), (Class::Misc, "UNKNOWN"));
    }

    #[test]
    fn names_round_trip() {
        for (i, n) in CLASS_NAMES.iter().enumerate() {
            let c = Class::from_name(n).unwrap();
            assert_eq!(c as usize, i);
            assert_eq!(c.name(), *n);
            assert_eq!(Class::from_u8(i as u8), Some(c));
        }
        assert_eq!(Class::from_u8(10), None);
    }
}
