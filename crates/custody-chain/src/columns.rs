//! The row of `custody.audit_log`, defined once: its columns, their SQL types, their order,
//! which may be NULL, and which `Record` field each one holds. The extension reads rows
//! (scan.rs), builds them (writer/rows.rs) and checks the table (protect/table.rs) through
//! this list, by name; tests here tie it to `Record`, to the canonical encoding and to the
//! export's record lines, and a test in the extension to the table its SQL creates.
//!
//! The first `RECORD_COLUMNS` columns are the fields of `Record` in encoding order
//! (docs/chain-format.md, section 1); `prev_hash` and `hash` follow. This list describes the
//! format, it does not drive the encoding (record.rs does): the tests fail if the two part.

/// A column of `custody.audit_log`; the discriminant is its position in `COLUMNS` (and in
/// the table as created).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Column {
    Seq,
    EventTime,
    LoggedAt,
    DatabaseName,
    SessionUserName,
    CurrentUserName,
    ClientAddr,
    ApplicationName,
    BackendPid,
    NestingLevel,
    Xid,
    Class,
    Command,
    Objects,
    Statement,
    StatementSha256,
    Rows,
    Outcome,
    Sqlstate,
    Message,
    Decision,
    PrevHash,
    Hash,
}

/// The SQL types the log's columns have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SqlType {
    Int8,
    Int4,
    Text,
    Bytea,
    Jsonb,
    Inet,
    TimestampTz,
}

impl SqlType {
    /// The type's name as PostgreSQL's `format_type()` spells it (what `\d` shows).
    pub const fn name(self) -> &'static str {
        match self {
            SqlType::Int8 => "bigint",
            SqlType::Int4 => "integer",
            SqlType::Text => "text",
            SqlType::Bytea => "bytea",
            SqlType::Jsonb => "jsonb",
            SqlType::Inet => "inet",
            SqlType::TimestampTz => "timestamp with time zone",
        }
    }
}

/// One column: what the table has, and where its value lives in Rust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnDef {
    pub column: Column,
    /// The column's name in the table, and the key of its value in an export's record line.
    pub name: &'static str,
    pub sql_type: SqlType,
    /// False: the column is NOT NULL (and the `Record` field is not an `Option`).
    pub nullable: bool,
    /// The `Record` field holding the value (it has the column's name); None for prev_hash
    /// and hash, which are stored beside the record (`export::RecordLine`), not part of it.
    pub record_field: Option<&'static str>,
}

/// Number of columns.
pub const NCOLUMNS: usize = 23;

/// Number of columns that are `Record` fields (the first ones).
pub const RECORD_COLUMNS: usize = 21;

const fn col(column: Column, name: &'static str, sql_type: SqlType, nullable: bool) -> ColumnDef {
    let record_field = if (column as usize) < RECORD_COLUMNS { Some(name) } else { None };
    ColumnDef { column, name, sql_type, nullable, record_field }
}

/// The columns of `custody.audit_log`, in table order. sql/bootstrap.sql creates the table;
/// the tests here and in the extension fail if the two disagree.
pub const COLUMNS: [ColumnDef; NCOLUMNS] = {
    use Column as C;
    use SqlType::*;
    [
        col(C::Seq, "seq", Int8, false),
        col(C::EventTime, "event_time", TimestampTz, false),
        col(C::LoggedAt, "logged_at", TimestampTz, false),
        col(C::DatabaseName, "database_name", Text, false),
        col(C::SessionUserName, "session_user_name", Text, false),
        col(C::CurrentUserName, "current_user_name", Text, false),
        col(C::ClientAddr, "client_addr", Inet, true),
        col(C::ApplicationName, "application_name", Text, true),
        col(C::BackendPid, "backend_pid", Int4, false),
        col(C::NestingLevel, "nesting_level", Int4, false),
        col(C::Xid, "xid", Int8, true),
        col(C::Class, "class", Text, false),
        col(C::Command, "command", Text, false),
        col(C::Objects, "objects", Jsonb, false),
        col(C::Statement, "statement", Text, true),
        col(C::StatementSha256, "statement_sha256", Bytea, true),
        col(C::Rows, "rows", Int8, true),
        col(C::Outcome, "outcome", Text, false),
        col(C::Sqlstate, "sqlstate", Text, true),
        col(C::Message, "message", Text, true),
        col(C::Decision, "decision", Jsonb, true),
        col(C::PrevHash, "prev_hash", Bytea, false),
        col(C::Hash, "hash", Bytea, false),
    ]
};

// Each entry sits at its column's position, so `Column::def` is an index, checked when
// this crate compiles.
const _: () = {
    let mut i = 0;
    while i < NCOLUMNS {
        assert!(COLUMNS[i].column as usize == i, "COLUMNS is out of Column order");
        i += 1;
    }
};

impl Column {
    /// Every column, in table order.
    pub const ALL: [Column; NCOLUMNS] = {
        let mut all = [Column::Seq; NCOLUMNS];
        let mut i = 0;
        while i < NCOLUMNS {
            all[i] = COLUMNS[i].column;
            i += 1;
        }
        all
    };

    /// Position in `COLUMNS` (0-based), which is the column's position in the table as
    /// pg_custody creates it.
    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn def(self) -> &'static ColumnDef {
        &COLUMNS[self as usize]
    }

    pub const fn name(self) -> &'static str {
        self.def().name
    }

    pub const fn sql_type(self) -> SqlType {
        self.def().sql_type
    }

    /// The column called `name`, if the log has one.
    pub fn by_name(name: &[u8]) -> Option<Column> {
        COLUMNS.iter().find(|c| c.name.as_bytes() == name).map(|c| c.column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{ExportLine, RecordLine};
    use crate::record::tests::{sample, sample_nulls};
    use crate::record::{Record, TAG_BYTEA, TAG_INT4, TAG_INT8, TAG_JSON, TAG_NULL, TAG_TEXT};
    use crate::record::RECORD_DOMAIN;

    /// The keys of a JSON object, in the order they were written.
    fn keys_in_order(json: &str) -> Vec<String> {
        struct Keys(Vec<String>);
        impl<'de> serde::Deserialize<'de> for Keys {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Keys;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a JSON object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                        let mut keys = Vec::new();
                        while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                            keys.push(k);
                        }
                        Ok(Keys(keys))
                    }
                }
                d.deserialize_map(V)
            }
        }
        serde_json::from_str::<Keys>(json).expect("a JSON object").0
    }

    /// A record with every field present (decision is omitted when NULL).
    fn full() -> Record {
        let mut r = sample(1);
        r.statement_sha256 = Some(vec![1; 32]);
        r.sqlstate = Some("42501".into());
        r.message = Some("m".into());
        r
    }

    #[test]
    fn columns_are_named_once_and_by_position() {
        for (i, c) in COLUMNS.iter().enumerate() {
            assert_eq!(Column::ALL[i], c.column);
            assert_eq!(c.column.index(), i);
            assert_eq!(Column::by_name(c.name.as_bytes()), Some(c.column));
            assert_eq!(c.record_field.is_some(), i < RECORD_COLUMNS, "{}", c.name);
        }
        assert_eq!(Column::by_name(b"no_such_column"), None);
    }

    #[test]
    fn record_columns_are_the_fields_of_record_in_order() {
        // A field added to or removed from Record fails to compile here first.
        let Record {
            seq: _, event_time: _, logged_at: _, database_name: _, session_user_name: _,
            current_user_name: _, client_addr: _, application_name: _, backend_pid: _,
            nesting_level: _, xid: _, class: _, command: _, objects: _, statement: _,
            statement_sha256: _, rows: _, outcome: _, sqlstate: _, message: _, decision: _,
        } = full();
        // Record's serde names are its field names (no renames), in declaration order.
        let fields = keys_in_order(&serde_json::to_string(&full()).unwrap());
        let record_fields: Vec<&str> = COLUMNS.iter().filter_map(|c| c.record_field).collect();
        assert_eq!(fields, record_fields);
    }

    #[test]
    fn export_record_lines_carry_the_columns_in_order() {
        let line = ExportLine::Record(RecordLine { record: full(), prev_hash: [0; 32], hash: [1; 32] });
        let mut want = vec!["type"];
        want.extend(COLUMNS.iter().map(|c| c.name));
        assert_eq!(keys_in_order(&line.to_json()), want);
    }

    /// The tag of each encoded field of `bytes` (a record's canonical encoding).
    fn field_tags(bytes: &[u8]) -> Vec<u8> {
        let mut rest = &bytes[RECORD_DOMAIN.len() + 1..];
        let mut tags = Vec::new();
        while let Some((&tag, after)) = rest.split_first() {
            let len = match tag {
                TAG_NULL => 0,
                TAG_INT8 => 8,
                TAG_INT4 => 4,
                TAG_TEXT | TAG_BYTEA | TAG_JSON => 4 + u32::from_be_bytes(after[..4].try_into().unwrap()) as usize,
                other => panic!("unknown tag {other:#04x}"),
            };
            tags.push(tag);
            rest = &after[len..];
        }
        tags
    }

    /// The encoding's tag for a value of a column of type `t` (docs/chain-format.md, 1).
    fn tag_of(t: SqlType) -> u8 {
        match t {
            SqlType::Int8 | SqlType::TimestampTz => TAG_INT8,
            SqlType::Int4 => TAG_INT4,
            SqlType::Text | SqlType::Inet => TAG_TEXT,
            SqlType::Bytea => TAG_BYTEA,
            SqlType::Jsonb => TAG_JSON,
        }
    }

    #[test]
    fn types_and_nullability_match_the_encoding() {
        let record_cols = &COLUMNS[..RECORD_COLUMNS];
        let want: Vec<u8> = record_cols.iter().map(|c| tag_of(c.sql_type)).collect();
        assert_eq!(field_tags(&full().canonical_bytes()), want);
        // sample_nulls has every Option field None: NULL exactly where a column is nullable.
        let nulls = field_tags(&sample_nulls().canonical_bytes());
        for (c, tag) in record_cols.iter().zip(nulls) {
            assert_eq!(tag == TAG_NULL, c.nullable, "{}", c.name);
        }
    }

    /// The extension's install script, parsed just enough to read custody.audit_log's
    /// columns (the in-server test in src/scan.rs checks the catalog itself).
    #[test]
    fn the_install_script_creates_these_columns() {
        let sql = include_str!("../../../sql/bootstrap.sql");
        let start = sql.find("CREATE TABLE custody.audit_log (").expect("CREATE TABLE custody.audit_log");
        let body = &sql[start..];
        let body = &body[body.find('\n').unwrap() + 1..body.find("\n);").expect("end of CREATE TABLE")];
        let got: Vec<(String, String, bool)> = body
            .lines()
            .map(|l| l.trim().trim_end_matches(','))
            .filter(|l| !l.is_empty())
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let typ = match words[1] {
                    "timestamptz" => "timestamp with time zone",
                    "int8" => "bigint",
                    "int4" | "int" => "integer",
                    t => t,
                };
                let not_null = l.contains("NOT NULL") || l.contains("PRIMARY KEY");
                (words[0].to_string(), typ.to_string(), !not_null)
            })
            .collect();
        let want: Vec<(String, String, bool)> =
            COLUMNS.iter().map(|c| (c.name.to_string(), c.sql_type.name().to_string(), c.nullable)).collect();
        assert_eq!(got, want);
    }
}
