//! Property tests for what the hostile-input properties (`hostile.rs`,
//! section 7) do not reach: the CSV customer importer writing to a real
//! SQLite file, and the rule API's actions, `sum` and Timestamp functions,
//! each checked against an answer computed here (with chrono for calendar
//! arithmetic). Values reach rules as customer traits, so no generated value
//! can break a rule's source. Every property tallies its outcomes and
//! requires each branch to have occurred, so none holds vacuously.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{
    DateTime, Datelike, FixedOffset, NaiveDate, SecondsFormat, TimeDelta, TimeZone, Timelike, Utc,
};
use engaged::domain::{Customer, CustomerId, Email, EngagementModel, Event, parse_timestamp};
use engaged::engine::{Known, RuleError, RuleSet};
use engaged::facts::Facts;
use engaged::ingest::import_customers;
use engaged::plan::{ActionRequest, PlannedAction};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError};
use serde_json::{Map, Value, json};

use crate::helpers::NOW;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No proptest-regressions files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// How often each outcome occurred, so that no property holds only vacuously.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<&'static str, usize>>);

impl Tally {
    fn hit(&self, what: &'static str) {
        *self.0.lock().unwrap().entry(what).or_default() += 1;
    }

    /// Panics unless each outcome occurred at least the given number of times.
    fn require(self, minimums: &[(&'static str, usize)]) {
        let seen = self.0.into_inner().unwrap();
        for (what, min) in minimums {
            let got = seen.get(what).copied().unwrap_or(0);
            assert!(
                got >= *min,
                "{what} occurred {got} times, fewer than {min}: {seen:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. CSV customer import
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Id,
    Email,
    Name,
    CreatedAt,
    Timezone,
    Model,
    Owner,
    Trait(&'static str),
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::Email => "email",
            Self::Name => "name",
            Self::CreatedAt => "created_at",
            Self::Timezone => "timezone",
            Self::Model => "model",
            Self::Owner => "owner",
            Self::Trait(name) => name,
        }
    }
}

/// Extra columns; they become traits (none is a customer field).
const TRAIT_COLUMNS: [&str; 4] = ["plan", "seats", "vip", "notes"];
const TIMEZONES: [&str; 5] = [
    "Europe/Zagreb",
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Pacific/Chatham",
];
/// (as written, as stored)
const MODELS: [(&str, &str); 5] = [
    ("hybrid", "hybrid"),
    ("High-Touch", "high-touch"),
    ("low_touch", "low-touch"),
    ("low", "low-touch"),
    ("HIGH", "high-touch"),
];

/// A header row: `id` and `email`, any of the other customer columns and up
/// to three trait columns, in any order and letter case, some padded.
fn header() -> impl Strategy<Value = Vec<(Column, String)>> {
    use Column::*;
    (
        prop::sample::subsequence(vec![Name, CreatedAt, Timezone, Model, Owner], 0..=5),
        prop::sample::subsequence(TRAIT_COLUMNS.map(Trait).to_vec(), 0..=3),
    )
        .prop_flat_map(|(fields, traits)| {
            let columns: Vec<Column> = [Id, Email]
                .into_iter()
                .chain(fields)
                .chain(traits)
                .collect();
            let n = columns.len();
            (
                Just(columns).prop_shuffle(),
                prop::collection::vec((0u8..3, any::<bool>()), n),
            )
        })
        .prop_map(|(columns, styles)| {
            columns
                .into_iter()
                .zip(styles)
                .map(|(c, (case, pad))| {
                    let name = c.name();
                    let name = match case {
                        0 => name.to_owned(),
                        1 => name.to_ascii_uppercase(),
                        _ => name[..1].to_ascii_uppercase() + &name[1..],
                    };
                    (c, if pad { format!(" {name} ") } else { name })
                })
                .collect()
        })
}

/// A trait cell. `Any` is arbitrary text whose typing is not predicted here.
#[derive(Clone, Debug)]
enum TraitCell {
    Int(i64),
    Bool(bool),
    Words(String),
    Any(String),
}

impl TraitCell {
    fn text(&self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Bool(b) => b.to_string(),
            Self::Words(s) | Self::Any(s) => s.clone(),
        }
    }

    /// `None`: the cell is empty and leaves the trait as it was; `Some(None)`:
    /// the trait is set to a value not predicted here.
    fn stored(&self) -> Option<Option<Value>> {
        match self {
            Self::Int(i) => Some(Some(json!(i))),
            Self::Bool(b) => Some(Some(json!(b))),
            Self::Words(s) => Some(Some(json!(s.trim()))),
            Self::Any(s) if s.trim().is_empty() => None,
            Self::Any(_) => Some(None),
        }
    }
}

fn trait_cell() -> impl Strategy<Value = TraitCell> {
    prop_oneof![
        any::<i64>().prop_map(TraitCell::Int),
        any::<bool>().prop_map(TraitCell::Bool),
        // Never a number or a boolean: letters around a space, comma or quote.
        "[a-z]{1,6}[ ,\"]{1,3}[a-z]{1,6}".prop_map(TraitCell::Words),
        any::<String>().prop_map(TraitCell::Any),
    ]
}

/// A valid address: (as written, as stored with the domain lower-cased).
fn valid_email() -> impl Strategy<Value = (String, String)> {
    (
        "[a-zA-Z0-9._+-]{1,12}",
        "[a-zA-Z0-9]{1,10}(\\.[a-zA-Z]{2,6}){1,2}",
    )
        .prop_map(|(local, domain)| {
            (
                format!("{local}@{domain}"),
                format!("{local}@{}", domain.to_ascii_lowercase()),
            )
        })
}

fn invalid_email() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "not-an-email",
            "ana@",
            "@example.com",
            "ana@example",
            "ana@exa mple.com",
            "ana@@example.com",
            "ana@-example.com",
            "ana@example..com",
            "ana,ben@example.com",
            "ana@exam_ple.com",
            "\"ana\"@example.com",
            "ana@example.com;ben@example.com",
        ])
        .prop_map(str::to_owned),
        "[a-z.]{1,10}",
        "[a-z]{1,5}@[a-z]{1,5}",
    ]
}

/// A valid id: no control characters, not blank (stored trimmed).
fn valid_id() -> impl Strategy<Value = String> {
    "\\PC{1,16}".prop_filter("a blank id", |s| !s.trim().is_empty())
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z ,\"'\r\n]{0,16}",
        Just(String::new()),
        Just(" \"Ana\", \"Ben\"\r\n ".to_owned()),
    ]
}

/// A signup time as written, and the instant it means.
fn created_at() -> impl Strategy<Value = (String, DateTime<Utc>)> {
    let lo = Utc.with_ymd_and_hms(1971, 1, 1, 0, 0, 0).unwrap();
    let hi = Utc.with_ymd_and_hms(2199, 12, 31, 0, 0, 0).unwrap();
    (
        lo.timestamp_millis()..hi.timestamp_millis(),
        0u8..4,
        -14 * 60..=14 * 60i32,
    )
        .prop_map(|(ms, format, offset_minutes)| {
            let t = DateTime::from_timestamp_millis(ms).unwrap();
            let whole = DateTime::from_timestamp(t.timestamp(), 0).unwrap();
            match format {
                0 => (whole.format("%Y-%m-%dT%H:%M:%SZ").to_string(), whole),
                1 => {
                    let zone = FixedOffset::east_opt(offset_minutes * 60).unwrap();
                    let text = t
                        .with_timezone(&zone)
                        .to_rfc3339_opts(SecondsFormat::AutoSi, false);
                    (text, t)
                }
                2 => (whole.format("%Y-%m-%d %H:%M:%S").to_string(), whole),
                _ => {
                    let day = t.date_naive();
                    (
                        day.format("%Y-%m-%d").to_string(),
                        day.and_hms_opt(0, 0, 0).unwrap().and_utc(),
                    )
                }
            }
        })
}

/// At most one thing wrong with a row (a defect in a column the file does
/// not have leaves the row valid).
#[derive(Clone, Debug)]
enum Defect {
    None,
    /// The row is kept, with a warning and no time zone.
    UnknownTimeZone(String),
    BadId(String),
    MissingEmail(String),
    BadEmail(String),
    BadTimestamp(String),
    BadModel(String),
    BadOwner(String),
    LongName(usize),
    NotUtf8(Index),
    TooManyFields(usize),
    TooFewFields(Index),
}

fn defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        10 => Just(Defect::None),
        3 => prop_oneof![
            "Mars/[A-Z][a-z]{2,8}".boxed(),
            Just("Europe/Atlantis".to_owned()).boxed(),
            Just("GMT+99".to_owned()).boxed(),
        ]
        .prop_map(Defect::UnknownTimeZone),
        1 => prop_oneof![
            Just(String::new()),
            Just("   ".to_owned()),
            "[a-z]{1,4}[\u{1}-\u{8}\u{7f}][a-z]{1,4}",
            "[a-z]{1,4}\r\n[a-z]{1,4}",
            "[a-z]{257,300}",
        ]
        .prop_map(Defect::BadId),
        1 => prop::sample::select(vec!["", "   ", "\t"])
            .prop_map(|s| Defect::MissingEmail(s.to_owned())),
        2 => invalid_email().prop_map(Defect::BadEmail),
        1 => prop_oneof![
            prop::sample::select(vec![
                "yesterday",
                "2026-13-01",
                "2026-02-30",
                "2025-02-29T10:00:00Z",
                "1969-12-31T23:59:59Z",
                "2201-01-01T00:00:00Z",
                "2026-06-15T25:00:00Z",
                "15/06/2026",
            ])
            .prop_map(str::to_owned),
            "[a-z]{1,10}",
        ]
        .prop_map(Defect::BadTimestamp),
        1 => prop_oneof![Just("medium-touch".to_owned()), "q[a-z]{0,8}"].prop_map(Defect::BadModel),
        1 => invalid_email().prop_map(Defect::BadOwner),
        1 => (501usize..700).prop_map(Defect::LongName),
        2 => any::<Index>().prop_map(Defect::NotUtf8),
        1 => (1usize..3).prop_map(Defect::TooManyFields),
        1 => any::<Index>().prop_map(Defect::TooFewFields),
    ]
}

#[derive(Clone, Debug)]
struct RowSpec {
    id: String,
    /// Use the id of an earlier row instead (the later row updates it).
    reuse: Option<Index>,
    email: (String, String),
    name: String,
    created_at: Option<(String, DateTime<Utc>)>,
    timezone: Option<&'static str>,
    model: Option<(&'static str, &'static str)>,
    owner: Option<(String, String)>,
    /// One per `TRAIT_COLUMNS` entry.
    traits: Vec<TraitCell>,
    defect: Defect,
    /// Quote every field (fields with `,` `"` CR or LF are always quoted).
    quote_all: bool,
    /// Surround every field's content with spaces.
    pad: bool,
    /// Empty lines before the row (not data rows).
    blank_lines_before: usize,
}

impl RowSpec {
    fn trait_cell(&self, column: &str) -> &TraitCell {
        &self.traits[TRAIT_COLUMNS.iter().position(|c| *c == column).unwrap()]
    }
}

fn row() -> impl Strategy<Value = RowSpec> {
    (
        (
            valid_id(),
            prop::option::weighted(0.3, any::<Index>()),
            valid_email(),
            name(),
        ),
        (
            prop::option::of(created_at()),
            prop::option::of(prop::sample::select(TIMEZONES.to_vec())),
            prop::option::of(prop::sample::select(MODELS.to_vec())),
            prop::option::of(valid_email()),
        ),
        (
            prop::collection::vec(trait_cell(), TRAIT_COLUMNS.len()),
            defect(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.2),
            prop_oneof![8 => Just(0usize), 1 => 1usize..3],
        ),
    )
        .prop_map(
            |(
                (id, reuse, email, name),
                (created_at, timezone, model, owner),
                (traits, defect, quote_all, pad, blank_lines_before),
            )| RowSpec {
                id,
                reuse,
                email,
                name,
                created_at,
                timezone,
                model,
                owner,
                traits,
                defect,
                quote_all,
                pad,
                blank_lines_before,
            },
        )
}

/// A customer as the store should hold it after the import.
#[derive(Clone, Debug, Default)]
struct Expected {
    email: String,
    name: Option<String>,
    created_at: Option<DateTime<Utc>>,
    timezone: Option<String>,
    model: Option<String>,
    owner: Option<String>,
    /// `None`: set, to a value not predicted here.
    traits: BTreeMap<String, Option<Value>>,
}

impl Expected {
    /// A later row for the same id: what it has replaces, what it leaves
    /// empty is kept (the importer's documented "re-importing updates").
    fn update(&mut self, later: Self) {
        self.email = later.email;
        self.name = later.name.or(self.name.take());
        self.created_at = later.created_at.or(self.created_at);
        self.timezone = later.timezone.or(self.timezone.take());
        self.model = later.model.or(self.model.take());
        self.owner = later.owner.or(self.owner.take());
        self.traits.extend(later.traits);
    }
}

#[derive(Debug)]
enum Outcome {
    Kept {
        customer: Expected,
        warned: bool,
    },
    /// Rejected with a message containing this.
    Rejected(String),
}

/// One data row of a generated file: its line, stored id, and fate.
#[derive(Debug)]
struct DataRow {
    line: u64,
    id: String,
    outcome: Outcome,
    multi_line: bool,
    /// A line inside one of its quoted fields might read as a row of its
    /// own, which the importer takes for a stray quote (see `hostile_input.rs`).
    row_like: bool,
}

/// Physical line breaks, as the importer counts them: LF, CRLF or a lone CR.
fn line_breaks(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
        .count() as u64
}

fn write_field(out: &mut Vec<u8>, field: &[u8], quote: bool) {
    if quote
        || field
            .iter()
            .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
    {
        out.push(b'"');
        for &b in field {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(field);
    }
}

/// Writes the CSV file and says what should become of each data row.
fn build_csv(
    header: &[(Column, String)],
    rows: &[RowSpec],
    crlf: bool,
    final_newline: bool,
) -> (Vec<u8>, Vec<DataRow>) {
    use Column::*;
    let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
    let mut out = header
        .iter()
        .map(|(_, h)| h.as_str())
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes();
    out.extend_from_slice(eol);
    let n = header.len();
    let has = |c: Column| header.iter().any(|(h, _)| *h == c);
    let mut ids: Vec<String> = Vec::new();
    let mut data = Vec::new();
    for (i, spec) in rows.iter().enumerate() {
        for _ in 0..spec.blank_lines_before {
            out.extend_from_slice(eol);
        }
        let line = 1 + line_breaks(&out);
        let id = match spec.reuse {
            Some(ix) if !ids.is_empty() => ids[ix.index(ids.len())].clone(),
            _ => spec.id.clone(),
        };
        ids.push(id.clone());
        let defect = match &spec.defect {
            Defect::UnknownTimeZone(_) if !has(Timezone) => &Defect::None,
            Defect::BadTimestamp(_) if !has(CreatedAt) => &Defect::None,
            Defect::BadModel(_) if !has(Model) => &Defect::None,
            Defect::BadOwner(_) if !has(Owner) => &Defect::None,
            Defect::LongName(_) if !has(Name) => &Defect::None,
            d => d,
        };
        let mut fields: Vec<Vec<u8>> = header
            .iter()
            .map(|(c, _)| {
                let text = match (c, defect) {
                    (Id, Defect::BadId(s)) => s.clone(),
                    (Id, _) => id.clone(),
                    (Email, Defect::MissingEmail(s) | Defect::BadEmail(s)) => s.clone(),
                    (Email, _) => spec.email.0.clone(),
                    (Name, Defect::LongName(k)) => "n".repeat(*k),
                    (Name, _) => spec.name.clone(),
                    (CreatedAt, Defect::BadTimestamp(s)) => s.clone(),
                    (CreatedAt, _) => spec
                        .created_at
                        .as_ref()
                        .map_or(String::new(), |(s, _)| s.clone()),
                    (Timezone, Defect::UnknownTimeZone(s)) => s.clone(),
                    (Timezone, _) => spec.timezone.unwrap_or_default().to_owned(),
                    (Model, Defect::BadModel(s)) => s.clone(),
                    (Model, _) => spec.model.map_or("", |m| m.0).to_owned(),
                    (Owner, Defect::BadOwner(s)) => s.clone(),
                    (Owner, _) => spec
                        .owner
                        .as_ref()
                        .map_or(String::new(), |(o, _)| o.clone()),
                    (Trait(t), _) => spec.trait_cell(t).text(),
                };
                if spec.pad {
                    format!(" {text} ").into_bytes()
                } else {
                    text.into_bytes()
                }
            })
            .collect();
        let normalized = |j: usize| header[j].1.trim().to_ascii_lowercase();
        let outcome = match defect {
            Defect::None | Defect::UnknownTimeZone(_) => {
                let mut c = Expected {
                    email: spec.email.1.clone(),
                    ..Default::default()
                };
                for (column, _) in header {
                    match column {
                        Name => {
                            c.name = Some(spec.name.trim().to_owned()).filter(|n| !n.is_empty())
                        }
                        CreatedAt => c.created_at = spec.created_at.as_ref().map(|(_, t)| *t),
                        Timezone if matches!(defect, Defect::None) => {
                            c.timezone = spec.timezone.map(str::to_owned)
                        }
                        Model => c.model = spec.model.map(|m| m.1.to_owned()),
                        Owner => c.owner = spec.owner.as_ref().map(|o| o.1.clone()),
                        Trait(t) => {
                            if let Some(v) = spec.trait_cell(t).stored() {
                                c.traits.insert((*t).to_owned(), v);
                            }
                        }
                        _ => {}
                    }
                }
                Outcome::Kept {
                    customer: c,
                    warned: matches!(defect, Defect::UnknownTimeZone(_)),
                }
            }
            Defect::BadId(_) => Outcome::Rejected("id: ".into()),
            Defect::MissingEmail(_) => Outcome::Rejected("email is required".into()),
            Defect::BadEmail(_) => Outcome::Rejected("email: invalid email address".into()),
            Defect::BadTimestamp(_) => Outcome::Rejected("created_at: invalid timestamp".into()),
            Defect::BadModel(_) => Outcome::Rejected("model: unknown engagement model".into()),
            Defect::BadOwner(_) => Outcome::Rejected("owner: invalid email address".into()),
            Defect::LongName(_) => Outcome::Rejected("name is longer than 500 characters".into()),
            Defect::NotUtf8(ix) => {
                let j = ix.index(n);
                fields[j].splice(0..0, [0xff, 0xfe]);
                Outcome::Rejected(format!("column {:?} is not valid UTF-8", normalized(j)))
            }
            Defect::TooManyFields(k) => {
                fields.extend((0..*k).map(|e| format!("extra{e}").into_bytes()));
                Outcome::Rejected(format!(
                    "expected {n} fields like the header row, found {}",
                    n + k
                ))
            }
            Defect::TooFewFields(ix) => {
                let keep = 1 + ix.index(n - 1);
                fields.truncate(keep);
                // A lone empty field would be a blank line, which is skipped.
                if fields[0].iter().all(u8::is_ascii_whitespace) {
                    fields[0] = b"x".to_vec();
                }
                Outcome::Rejected(format!(
                    "expected {n} fields like the header row, found {keep}"
                ))
            }
        };
        let start = out.len();
        for (j, field) in fields.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            write_field(&mut out, field, spec.quote_all);
        }
        let multi_line = line_breaks(&out[start..]) > 0;
        // Conservative: a row needs n - 1 separators.
        let row_like = fields.iter().any(|f| {
            f.split(|&b| b == b'\n' || b == b'\r')
                .skip(1)
                .any(|piece| piece.iter().filter(|&&b| b == b',').count() + 1 >= n)
        });
        if i + 1 < rows.len() || final_newline {
            out.extend_from_slice(eol);
        }
        data.push(DataRow {
            line,
            id: id.trim().to_owned(),
            outcome,
            multi_line,
            row_like,
        });
    }
    (out, data)
}

/// Imports generated CSV files (LF or CRLF line endings) into a fresh
/// SQLite file each and checks the report and the store.
///
/// Accounting, as `ImportReport` defines it for customers: each data row
/// (blank lines are not rows) is exactly one of imported (a new id),
/// updated (an id already in the store or earlier in the file; later rows
/// win) or rejected (one error naming its line). `duplicate` and `ignored`
/// are for events and stay 0.
fn check_customer_csv_import(crlf: bool, blank_lines: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = Tally::default();
    let file = (header(), prop::collection::vec(row(), 1..10), any::<bool>());
    proptest!(config(64), |((header, rows, final_newline) in file)| {
        let mut rows = rows;
        if !blank_lines {
            rows.iter_mut().for_each(|r| r.blank_lines_before = 0);
        }
        let (bytes, data) = build_csv(&header, &rows, crlf, final_newline);
        prop_assume!(!data.iter().any(|r| r.row_like), "a line in a field reads as a row");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("customers.csv");
        std::fs::write(&path, &bytes).unwrap();
        let csv = String::from_utf8_lossy(&bytes).into_owned();

        // What the store should hold, row by row.
        let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
        let (mut imported, mut updated) = (0u64, 0u64);
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        for row in &data {
            match &row.outcome {
                Outcome::Kept { customer, warned } => {
                    tally.hit("kept");
                    if row.multi_line {
                        tally.hit("kept with a line break in a field");
                    }
                    if *warned {
                        warnings.push(row.line);
                        tally.hit("kept with a warning");
                    }
                    match expected.get_mut(&row.id) {
                        Some(earlier) => {
                            updated += 1;
                            earlier.update(customer.clone());
                            tally.hit("updated");
                        }
                        None => {
                            imported += 1;
                            expected.insert(row.id.clone(), customer.clone());
                        }
                    }
                }
                Outcome::Rejected(why) => {
                    errors.push((row.line, why.clone()));
                    tally.hit(if why.contains("fields like the header") {
                        "rejected: field count"
                    } else if why.contains("UTF-8") {
                        "rejected: not UTF-8"
                    } else {
                        "rejected: a bad value"
                    });
                }
            }
        }
        if rows.iter().any(|r| r.blank_lines_before > 0) {
            tally.hit("file with blank lines");
        }

        let (report, stored, count) = runtime.block_on(async {
            let url = format!("sqlite://{}", dir.path().join("engaged.db").display());
            let store = engaged::store::open(&url).await.unwrap();
            let report = import_customers(Arc::clone(&store), &path).await;
            let mut stored = BTreeMap::new();
            for id in expected.keys() {
                let c = store.customer(&CustomerId::parse(id).unwrap()).await.unwrap();
                stored.insert(id.clone(), c);
            }
            (report, stored, store.customer_count().await.unwrap())
        });
        let report = match report {
            Ok(r) => r,
            Err(e) => return Err(TestCaseError::fail(format!("file-level error {e} for:\n{csv:?}"))),
        };

        let rows_in_file = data.len() as u64;
        prop_assert_eq!(
            report.imported + report.updated + report.rejected, rows_in_file,
            "{:?}\n{:?}", report, csv
        );
        prop_assert_eq!(
            (report.imported, report.updated, report.rejected, report.duplicate, report.ignored),
            (imported, updated, errors.len() as u64, 0, 0),
            "{:?}\n{:?}", report, csv
        );
        let got: Vec<u64> = report.errors.iter().map(|e| e.line).collect();
        let want: Vec<u64> = errors.iter().map(|e| e.0).collect();
        prop_assert_eq!(got, want, "error lines in {:?}\n{:?}", report, csv);
        for (problem, (line, why)) in report.errors.iter().zip(&errors) {
            prop_assert!(
                problem.message.contains(why.as_str()),
                "line {}: {:?} should contain {:?}\n{:?}", line, problem.message, why, csv
            );
        }
        let got: Vec<u64> = report.warnings.iter().map(|w| w.line).collect();
        prop_assert_eq!(got, warnings, "warning lines in {:?}\n{:?}", report, csv);
        for w in &report.warnings {
            prop_assert!(w.message.contains("unknown time zone"), "{:?}", w);
        }

        prop_assert_eq!(count, expected.len() as u64, "{:?}", csv);
        for (id, want) in &expected {
            let Some(c) = &stored[id] else {
                return Err(TestCaseError::fail(format!("{id:?} was not stored from:\n{csv:?}")));
            };
            prop_assert_eq!(c.id.as_str(), id.as_str());
            prop_assert_eq!(c.email.as_ref().map(Email::as_str), Some(want.email.as_str()), "{:?}", csv);
            prop_assert_eq!(&c.name, &want.name, "{:?}", csv);
            prop_assert_eq!(c.created_at, want.created_at, "{:?}", csv);
            prop_assert_eq!(&c.timezone, &want.timezone, "{:?}", csv);
            prop_assert_eq!(c.model.as_str(), want.model.as_deref().unwrap_or("low-touch"), "{:?}", csv);
            prop_assert_eq!(c.owner.as_ref().map(Email::as_str), want.owner.as_deref(), "{:?}", csv);
            let keys: Vec<&String> = c.traits.keys().collect();
            prop_assert_eq!(keys, want.traits.keys().collect::<Vec<_>>(), "{:?}", csv);
            for (k, v) in &want.traits {
                if let Some(v) = v {
                    prop_assert_eq!(&c.traits[k], v, "trait {} in {:?}", k, csv);
                }
            }
        }
    });
    tally.require(&[
        ("kept", 100),
        ("kept with a line break in a field", 10),
        ("kept with a warning", 4),
        ("updated", 8),
        ("rejected: a bad value", 40),
        ("rejected: field count", 10),
        ("rejected: not UTF-8", 8),
        ("file with blank lines", if blank_lines { 5 } else { 0 }),
    ]);
}

#[test]
fn importing_any_customer_csv_accounts_for_every_row_and_stores_the_valid_ones_as_written() {
    check_customer_csv_import(false, false);
}

#[test]
fn a_customer_csv_with_crlf_line_endings_reports_the_right_line_numbers() {
    // The csv crate records a row's position before it reads the LF of the
    // previous CRLF (BurntSushi/rust-csv#395), so the importer counts
    // physical lines itself. The smallest case that once failed:
    // "id,email\r\nc1,nope" reported line 1 for "c1,nope", on line 2.
    check_customer_csv_import(true, false);
}

#[test]
fn a_customer_csv_with_blank_lines_reports_the_right_line_numbers() {
    // Same cause: the csv crate records a row's position before skipping
    // the blank lines in front of it (BurntSushi/rust-csv#208). The smallest
    // case that once failed: "id,email\n\n\nc1,nope\n" reported line 2 for line 4.
    check_customer_csv_import(false, true);
}

// ---------------------------------------------------------------------------
// 2. The rule API: actions, sum, Timestamps
// ---------------------------------------------------------------------------

fn now() -> DateTime<Utc> {
    parse_timestamp(NOW).unwrap()
}

/// Evaluates every rule for a customer with these traits and signup time.
fn evaluate(
    rules: &RuleSet,
    traits: Value,
    created_at: Option<DateTime<Utc>>,
    events: Vec<Event>,
    now: DateTime<Utc>,
) -> Vec<Result<Vec<PlannedAction>, RuleError>> {
    let Value::Object(traits) = traits else {
        panic!("traits are a map: {traits}")
    };
    let customer = Customer {
        id: CustomerId::parse("c1").unwrap(),
        email: Some(Email::parse("ana@example.com").unwrap()),
        name: Some("Ana".into()),
        created_at,
        timezone: None,
        model: EngagementModel::Hybrid,
        owner: None,
        traits,
    };
    rules.evaluate_all(&Arc::new(Facts::new(customer, events, vec![], now)))
}

/// The payload of the one webhook a rule planned.
fn webhook_payload(result: &Result<Vec<PlannedAction>, RuleError>) -> Result<Value, TestCaseError> {
    match result {
        Ok(actions) => match actions.as_slice() {
            [
                PlannedAction {
                    kind: ActionRequest::Webhook { payload, .. },
                    ..
                },
            ] => Ok(payload.clone()),
            other => Err(TestCaseError::fail(format!(
                "expected one webhook, got {other:?}"
            ))),
        },
        Err(e) => Err(TestCaseError::fail(format!("the rule failed: {e}"))),
    }
}

fn finite_f64() -> impl Strategy<Value = f64> {
    prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO
}

/// Map keys: `key` (meaningful to send_email and webhook) and anything else.
fn map_key() -> impl Strategy<Value = String> {
    prop_oneof![Just("key".to_owned()), "[a-z_]{1,8}", any::<String>()]
}

/// Any JSON a trait can hold. Integers are within i64: Rhai has no wider
/// integer (see `integers_beyond_i64_reach_a_webhook_payload_unchanged`).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        finite_f64().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(map_key(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string argument: a meaningful one, a near miss, an arbitrary one, a
/// blank one, one near tag's length limit, a multi-byte one; now and then
/// not a string.
fn string_arg(
    meaningful: &'static [&'static str],
    near_misses: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(meaningful).prop_map(|s| json!(s)),
        2 => prop::sample::select(near_misses).prop_map(|s| json!(s)),
        3 => any::<String>().prop_map(Value::String),
        1 => prop::sample::select(vec!["", " ", "\t\r\n", "\u{a0}\u{3000}"]).prop_map(|s| json!(s)),
        1 => "[ \t]{0,2}[a-z]{95,105}[ \t]{0,2}".prop_map(Value::String),
        1 => "[é€😀a]{20,60}".prop_map(Value::String),
        1 => prop_oneof![
            any::<i64>().prop_map(Value::from),
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            Just(json!(["welcome"])),
        ],
    ]
}

/// `send_email`'s vars: mostly a map, with or without a `key` of any type.
fn vars() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        "[a-z0-9-]{1,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        finite_f64().prop_map(|f| json!(f)),
        json_value(),
    ];
    prop_oneof![
        4 => (
            prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..4),
            prop::option::weighted(0.75, key),
        )
            .prop_map(|(m, key)| {
                let mut m: Map<String, Value> = m.into_iter().collect();
                if let Some(k) = key {
                    m.insert("key".into(), k);
                }
                Value::Object(m)
            }),
        1 => json_value(),
    ]
}

const TEMPLATES: [&str; 2] = ["welcome", "milestone"];
const WEBHOOKS: [&str; 2] = ["crm", "slack"];

fn action_rules() -> RuleSet {
    let set = |names: [&str; 2]| Some(Arc::new(names.map(str::to_owned).into_iter().collect()));
    RuleSet::from_sources(
        &[
            ("email", "send_email(customer.traits.template);"),
            (
                "email_vars",
                "send_email(customer.traits.template, customer.traits.vars);",
            ),
            ("escalate", "escalate(customer.traits.reason);"),
            ("tag", "tag(customer.traits.tag);"),
            (
                "webhook",
                "webhook(customer.traits.hook, customer.traits.payload);",
            ),
        ],
        Known {
            templates: set(TEMPLATES),
            webhooks: set(WEBHOOKS),
        },
    )
    .unwrap()
}

/// What one call should do: plan exactly this, or fail with a message
/// containing this; `None` where the outcome is not asserted here.
type Want = Option<Result<ActionRequest, String>>;

fn no_function(name: &str) -> Want {
    Some(Err(format!("no function {name}")))
}

/// The documented dedup key: `vars.key` when given, else the template name.
fn email_key(template: &str, vars: &Map<String, Value>) -> String {
    match vars.get("key") {
        None | Some(Value::Null) => template.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn want_email(template: &Value, vars: Option<&Value>) -> Want {
    let Value::String(template) = template else {
        return no_function("send_email");
    };
    let vars = match vars {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return no_function("send_email"),
    };
    if !TEMPLATES.contains(&template.as_str()) {
        return Some(Err(format!("send_email: no template named {template:?}")));
    }
    Some(Ok(ActionRequest::Email {
        template: template.clone(),
        key: email_key(template, &vars),
        vars,
    }))
}

fn want_escalate(reason: &Value) -> Want {
    let Value::String(reason) = reason else {
        return no_function("escalate");
    };
    let reason = reason.trim();
    Some(if reason.is_empty() {
        Err("escalate(reason) needs a non-empty reason".into())
    } else {
        Ok(ActionRequest::Escalate {
            reason: reason.to_owned(),
        })
    })
}

fn want_tag(name: &Value) -> Want {
    let Value::String(name) = name else {
        // Not asserted here: see
        // `tag_given_something_other_than_a_string_is_an_error`.
        return None;
    };
    let name = name.trim();
    let err = || Some(Err("tag(name) needs a name of 1 to 100 characters".into()));
    if name.is_empty() || name.chars().count() > 100 {
        err()
    } else if name.len() <= 100 {
        Some(Ok(ActionRequest::Tag {
            name: name.to_owned(),
        }))
    } else {
        // At most 100 characters but more than 100 bytes: see
        // `a_tag_of_at_most_100_characters_is_accepted_whatever_its_byte_length`.
        None
    }
}

fn want_webhook(name: &Value, payload: &Value) -> Want {
    let Value::String(name) = name else {
        return no_function("webhook");
    };
    if !WEBHOOKS.contains(&name.as_str()) {
        return Some(Err(format!("webhook: no [webhooks.{name}] in the config")));
    }
    Some(Ok(ActionRequest::Webhook {
        name: name.clone(),
        payload: payload.clone(),
    }))
}

/// Checks one rule's result against what was wanted; errors must name the
/// rule's file and line and must not be a caught panic.
fn check(
    rule: &'static str,
    got: &Result<Vec<PlannedAction>, RuleError>,
    want: &Want,
    tally: &Tally,
    ok_label: &'static str,
    err_label: &'static str,
) -> Result<(), TestCaseError> {
    if let Err(e) = got {
        prop_assert!(
            !e.message.contains("internal error"),
            "{} panicked: {}",
            rule,
            e
        );
    }
    let Some(want) = want else {
        return Ok(());
    };
    match (got, want) {
        (Ok(actions), Ok(action)) => {
            tally.hit(ok_label);
            prop_assert_eq!(actions.len(), 1, "{}: {:?}", rule, actions);
            prop_assert_eq!(&actions[0].rule, rule);
            prop_assert_eq!(&actions[0].kind, action, "{}", rule);
        }
        (Err(e), Err(why)) => {
            tally.hit(err_label);
            prop_assert!(
                e.message.contains(why.as_str()),
                "{}: {:?} should contain {:?}",
                rule,
                e.message,
                why
            );
            prop_assert_eq!(
                &e.path,
                &std::path::PathBuf::from(format!("rules/{rule}.rhai"))
            );
            prop_assert_eq!(e.line, 1, "{}", e);
        }
        (got, want) => prop_assert!(false, "{}: got {:?}, wanted {:?}", rule, got, want),
    }
    Ok(())
}

#[test]
fn the_action_functions_plan_exactly_what_they_are_given_or_fail_with_a_located_error() {
    let rules = action_rules();
    let tally = Tally::default();
    let traits = (
        (
            string_arg(&TEMPLATES, &[" welcome", "Welcome", "welcome.txt"]),
            vars(),
            string_arg(&["NPS detractor: scored 3"], &["  Onboarding stalled\n"]),
        ),
        (
            string_arg(&["vip", "level:initiation"], &[" first-order "]),
            string_arg(&WEBHOOKS, &["CRM", "crm ", "webhooks.crm"]),
            prop::option::weighted(0.9, json_value()),
        ),
    );
    proptest!(config(256), |(((template, vars, reason), (tag, hook, payload)) in traits)| {
        let mut t = json!({
            "template": template, "vars": vars, "reason": reason, "tag": tag, "hook": hook,
        });
        // A missing payload is () in the rule and null in the plan.
        if let Some(p) = &payload {
            t["payload"] = p.clone();
        }
        let results = evaluate(&rules, t, None, vec![], now());
        prop_assert_eq!(results.len(), 5);
        let payload = payload.unwrap_or(Value::Null);
        check("email", &results[0], &want_email(&template, None), &tally, "email planned", "email refused")?;
        check("email_vars", &results[1], &want_email(&template, Some(&vars)), &tally, "email with vars planned", "email with vars refused")?;
        if let (Some(Ok(_)), Value::Object(v)) = (want_email(&template, Some(&vars)), &vars) {
            tally.hit(match v.get("key") {
                None | Some(Value::Null) => "email keyed by its template",
                Some(Value::String(_)) => "email keyed by a string vars.key",
                Some(_) => "email keyed by another vars.key",
            });
        }
        check("escalate", &results[2], &want_escalate(&reason), &tally, "escalation planned", "escalation refused")?;
        let want = want_tag(&tag);
        if want.is_none() {
            tally.hit("tag outcome not asserted");
        }
        check("tag", &results[3], &want, &tally, "tag planned", "tag refused")?;
        check("webhook", &results[4], &want_webhook(&hook, &payload), &tally, "webhook planned", "webhook refused")?;
    });
    tally.require(&[
        ("email planned", 25),
        ("email refused", 25),
        ("email with vars planned", 25),
        ("email with vars refused", 25),
        ("email keyed by its template", 6),
        ("email keyed by a string vars.key", 3),
        ("email keyed by another vars.key", 6),
        ("escalation planned", 20),
        ("escalation refused", 20),
        ("tag planned", 20),
        ("tag refused", 10),
        ("webhook planned", 20),
        ("webhook refused", 20),
    ]);
}

#[test]
fn a_tag_of_at_most_100_characters_is_accepted_whatever_its_byte_length() {
    let rules = action_rules();
    proptest!(config(64), |(name in "[é€😀a]{1,100}")| {
        let results = evaluate(&rules, json!({"tag": name}), None, vec![], now());
        let want = Some(Ok(ActionRequest::Tag { name: name.clone() }));
        check("tag", &results[3], &want, &Tally::default(), "", "")?;
    });
}

#[test]
fn tag_given_something_other_than_a_string_is_an_error() {
    // Rhai's core package has `tag(value) -> int` (the Dynamic's tag), so
    // `tag(customer.traits.level)` with the trait missing, or `tag(42)`,
    // silently returns 0: no tag, no error. The string overload engaged
    // registers wins only for strings.
    let rules = action_rules();
    let not_a_string = prop_oneof![
        any::<i64>().prop_map(Value::from),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        finite_f64().prop_map(|f| json!(f)),
        Just(json!(["vip"])),
        Just(json!({"name": "vip"})),
    ];
    proptest!(config(64), |(tag in not_a_string)| {
        let results = evaluate(&rules, json!({"tag": tag}), None, vec![], now());
        let want = Some(Err("tag(name) needs a string name".to_owned()));
        check("tag", &results[3], &want, &Tally::default(), "", "")?;
    });
}

#[test]
// Documented in RULES.md: Rhai's int is i64, so larger integers arrive as
// the nearest float (and leave as one).
fn integers_beyond_i64_reach_rules_as_the_nearest_float() {
    let rules = action_rules();
    proptest!(config(64), |(n in (i64::MAX as u64 + 1)..=u64::MAX)| {
        let payload = json!({ "account": n });
        let results = evaluate(&rules, json!({"hook": "crm", "payload": payload}), None, vec![], now());
        let want = want_webhook(&json!("crm"), &json!({ "account": n as f64 }));
        check("webhook", &results[4], &want, &Tally::default(), "", "")?;
    });
}

/// A property value of an event, and what `sum` should make of it.
#[derive(Clone, Debug)]
enum Property {
    Int(i64),
    Big(u64),
    Float(f64),
    /// A number written as text ("12"): not a number, not summed.
    NumericText(String),
    Other(Value),
    Missing,
}

impl Property {
    fn counted(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::Big(u) => Some(*u as f64),
            Self::Float(f) => Some(*f),
            _ => None,
        }
    }

    fn json(&self) -> Option<Value> {
        match self {
            Self::Int(i) => Some(json!(i)),
            Self::Big(u) => Some(json!(u)),
            Self::Float(f) => Some(json!(f)),
            Self::NumericText(s) => Some(json!(s)),
            Self::Other(v) => Some(v.clone()),
            Self::Missing => None,
        }
    }
}

fn property() -> impl Strategy<Value = Property> {
    prop_oneof![
        3 => any::<i64>().prop_map(Property::Int),
        3 => (-1_000_000i64..1_000_000).prop_map(Property::Int),
        1 => any::<u64>().prop_map(Property::Big),
        3 => finite_f64()
            .prop_filter("the sum stays finite", |f| f.abs() < 1e300)
            .prop_map(Property::Float),
        1 => "-?[0-9]{1,4}(\\.[0-9]{1,2})?".prop_map(Property::NumericText),
        1 => prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<String>().prop_map(Value::String),
            Just(json!([1, 2])),
            Just(json!({"amount": 5})),
        ]
        .prop_map(Property::Other),
        1 => Just(Property::Missing),
    ]
}

#[test]
fn sum_adds_the_numbers_a_property_holds_over_visible_events_and_ignores_everything_else() {
    // `sum(event, property)` counts JSON numbers only (integers, floats,
    // integers beyond i64): a number written as text, a boolean, null, an
    // array or an object is skipped, and so is an event without the
    // property. Events after `now` are invisible. The answer is a float.
    let rules = RuleSet::from_sources(
        &[(
            "sum",
            "let s = sum(customer.traits.event, customer.traits.property);\n\
             webhook(\"out\", #{ sum: s, kind: type_of(s) });",
        )],
        Known::default(),
    )
    .unwrap();
    let now = now();
    let tally = Tally::default();
    let event_name = prop_oneof![
        any::<String>(),
        Just("order_completed".to_owned()),
        Just("login".to_owned()),
        Just(String::new()),
    ];
    let property_name = prop_oneof![
        any::<String>(),
        Just("total".to_owned()),
        Just(String::new()),
        Just("key".to_owned()),
    ];
    // (which name: 0 = the one summed, else another; seconds from now; value)
    let events = prop::collection::vec(
        (
            0u8..4,
            prop_oneof![4 => -100_000_000i64..0, 1 => 0i64..1_000_000],
            property(),
        ),
        0..12,
    );
    proptest!(config(256), |(name in event_name, prop in property_name, specs in events)| {
        let others = ["login", "order_completed", "signup"];
        // Distinct times (whole seconds plus the index in milliseconds), so
        // the order in which the floats are added is the time order.
        let events: Vec<Event> = specs
            .iter()
            .enumerate()
            .map(|(i, (which, secs, value))| {
                let mut properties = Map::new();
                if let Some(v) = value.json() {
                    properties.insert(prop.clone(), v);
                }
                // A number under a near-miss key must not count.
                properties.insert(format!("{prop}_"), json!(1));
                Event {
                    message_id: format!("m{i}"),
                    customer_id: CustomerId::parse("c1").unwrap(),
                    name: if *which == 0 { name.clone() } else { others[*which as usize - 1].to_owned() },
                    properties: Value::Object(properties),
                    at: now + TimeDelta::milliseconds(secs * 1000 + i as i64),
                }
            })
            .collect();
        let mut matching: Vec<(DateTime<Utc>, &Property)> = events
            .iter()
            .zip(&specs)
            .filter(|(e, _)| e.name == name && e.at <= now)
            .map(|(e, (_, _, v))| (e.at, v))
            .collect();
        matching.sort_by_key(|(at, _)| *at);
        let counted: Vec<f64> = matching.iter().filter_map(|(_, v)| v.counted()).collect();
        let want: f64 = counted.iter().fold(0.0, |a, b| a + b);

        let traits = json!({"event": name, "property": prop});
        let results = evaluate(&rules, traits, None, events.clone(), now);
        let out = webhook_payload(&results[0])?;
        prop_assert_eq!(out["kind"].as_str(), Some("f64"), "{}", out);
        let got = out["sum"].as_f64();
        prop_assert_eq!(got, Some(want), "{:?} / {:?} over {:?}", name, prop, events);

        tally.hit(if counted.is_empty() { "nothing to sum" } else { "numbers summed" });
        if matching.iter().any(|(_, v)| matches!(v, Property::NumericText(_))) {
            tally.hit("a number as text skipped");
        }
        if events.iter().any(|e| e.name == name && e.at > now) {
            tally.hit("a future event skipped");
        }
        if !matching.is_empty() && counted.is_empty() {
            tally.hit("events without a number");
        }
    });
    tally.require(&[
        ("nothing to sum", 20),
        ("numbers summed", 50),
        ("a number as text skipped", 8),
        ("a future event skipped", 20),
        ("events without a number", 5),
    ]);
}

// --- Timestamps -------------------------------------------------------------

fn millis(y: i32, m: u32, d: u32) -> i64 {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
        .unwrap()
        .timestamp_millis()
}

/// An instant within the accepted years (1970..=2200), often on a calendar
/// edge: New Year, 28/29 February, 1 March, a second or millisecond before
/// midnight.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    let edge = (
        1970i32..=2200,
        prop::sample::select(vec![(1, 1), (12, 31), (2, 28), (2, 29), (3, 1)]),
        prop::sample::select(vec![0u32, 23]),
        prop::sample::select(vec![0u32, 59]),
        prop::sample::select(vec![0u32, 59]),
        prop::sample::select(vec![0u32, 999]),
    )
        .prop_filter_map("no such day", |(y, (m, d), h, mi, s, ms)| {
            Some(
                NaiveDate::from_ymd_opt(y, m, d)?
                    .and_hms_milli_opt(h, mi, s, ms)?
                    .and_utc(),
            )
        });
    prop_oneof![
        3 => (millis(1970, 1, 1)..millis(2201, 1, 1))
            .prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap()),
        2 => edge,
    ]
}

/// 29 February of a leap year, at any time of day.
fn leap_day() -> impl Strategy<Value = DateTime<Utc>> {
    let leap_years: Vec<i32> = (1970..=2196)
        .filter(|y| NaiveDate::from_ymd_opt(*y, 2, 29).is_some())
        .collect();
    (
        prop::sample::select(leap_years),
        0u32..24,
        0u32..60,
        0u32..1000,
    )
        .prop_map(|(y, h, m, ms)| {
            NaiveDate::from_ymd_opt(y, 2, 29)
                .unwrap()
                .and_hms_milli_opt(h, m, 0, ms)
                .unwrap()
                .and_utc()
        })
}

/// An instant, one in five on 29 February.
fn moment() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![4 => instant(), 1 => leap_day()]
}

fn is_leap_day(t: DateTime<Utc>) -> bool {
    (t.month(), t.day()) == (2, 29)
}

/// The same moment `n` calendar years after `t`, computed here from the
/// calendar date: 29 February becomes 28 February in a common year, as
/// RULES.md and `add_years` document.
fn years_later(t: DateTime<Utc>, n: i32) -> Option<DateTime<Utc>> {
    let year = t.year().checked_add(n)?;
    let date = NaiveDate::from_ymd_opt(year, t.month(), t.day())
        .or_else(|| NaiveDate::from_ymd_opt(year, t.month(), t.day() - 1))?;
    Some(date.and_time(t.time()).and_utc())
}

/// Whole 24-hour periods from `a` to `b`, rounded down (negative when `b` is earlier).
fn whole_days(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    let d = b - a;
    let n = d.num_days(); // rounded towards zero
    if d < TimeDelta::days(n) { n - 1 } else { n }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[test]
fn timestamp_fields_comparisons_and_days_between_agree_with_chrono() {
    let rules = RuleSet::from_sources(
        &[(
            "time",
            "let a = customer.created_at;\n\
             let b = now;\n\
             webhook(\"out\", #{\n\
                 text: `${a}`, year: a.year, month: a.month, day: a.day, hour: a.hour,\n\
                 minute: a.minute, weekday: a.weekday, unix: a.unix,\n\
                 lt: a < b, le: a <= b, gt: a > b, ge: a >= b, eq: a == b, ne: a != b,\n\
                 days: days_between(a, b), back: days_between(b, a)\n\
             });",
        )],
        Known::default(),
    )
    .unwrap();
    let tally = Tally::default();
    // b: anywhere, or near a (equal, a millisecond or a day away).
    let pair = moment().prop_flat_map(|a| {
        let near = prop::sample::select(vec![
            0i64,
            1,
            -1,
            86_400_000,
            -86_400_000,
            86_399_999,
            -86_400_001,
        ])
        .prop_map(move |d| a + TimeDelta::milliseconds(d));
        (Just(a), prop_oneof![instant(), near])
    });
    proptest!(config(256), |((a, b) in pair)| {
        let results = evaluate(&rules, json!({}), Some(a), vec![], b);
        let out = webhook_payload(&results[0])?;
        let want = json!({
            "text": rfc3339(a), "year": a.year(), "month": a.month(), "day": a.day(),
            "hour": a.hour(), "minute": a.minute(),
            "weekday": a.weekday().number_from_monday(), "unix": a.timestamp(),
            "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b, "ne": a != b,
            "days": whole_days(a, b), "back": whole_days(b, a),
        });
        prop_assert_eq!(&out, &want, "a = {:?}, b = {:?}", a, b);
        tally.hit(match a.cmp(&b) {
            std::cmp::Ordering::Less => "a before b",
            std::cmp::Ordering::Equal => "a equals b",
            std::cmp::Ordering::Greater => "a after b",
        });
        if a != b && whole_days(a, b).abs() <= 1 {
            tally.hit("within a day");
        }
        if is_leap_day(a) {
            tally.hit("a on 29 February");
        }
    });
    tally.require(&[
        ("a before b", 50),
        ("a after b", 50),
        ("a equals b", 5),
        ("within a day", 30),
        ("a on 29 February", 10),
    ]);
}

fn years_rules() -> RuleSet {
    RuleSet::from_sources(
        &[(
            "years",
            "let a = customer.created_at;\n\
             let later = a.add_years(customer.traits.n);\n\
             webhook(\"out\", #{\n\
                 between: years_between(a, now), text: `${later}`, unix: later.unix,\n\
                 same: later == now, after: later > now, round_trip: years_between(a, later)\n\
             });",
        )],
        Known::default(),
    )
    .unwrap()
}

#[test]
fn years_between_counts_the_anniversaries_add_years_reaches() {
    // years_between(a, b) is the largest k with a + k years <= b; 0 when b
    // is before a (it counts anniversaries passed, never negative; unlike
    // days_between). Signups on 29 February are in
    // `years_between_reaches_n_on_the_leap_day_anniversary_add_years_gives`.
    let rules = years_rules();
    let tally = Tally::default();
    let a = instant().prop_filter("not 29 February", |a| !is_leap_day(*a));
    let case = a.prop_flat_map(|a| {
        let anniversary = (
            -2i32..=240,
            prop::sample::select(vec![0i64, -1, 1, -1000, 86_400_000]),
        )
            .prop_filter_map("no such year", move |(k, d)| {
                Some(years_later(a, k)? + TimeDelta::milliseconds(d))
            });
        (Just(a), prop_oneof![instant(), anniversary])
    });
    proptest!(config(256), |((a, b) in case)| {
        let results = evaluate(&rules, json!({"n": 0}), Some(a), vec![], b);
        let out = webhook_payload(&results[0])?;
        let want = if b < a {
            0
        } else {
            let mut k = b.year() - a.year();
            while years_later(a, k).unwrap() > b {
                k -= 1;
            }
            k
        };
        prop_assert_eq!(out["between"].as_i64(), Some(i64::from(want)), "a = {:?}, b = {:?}", a, b);
        tally.hit(if b < a {
            "b before a"
        } else if years_later(a, want).unwrap() == b {
            "b on an anniversary"
        } else if years_later(a, want + 1).is_some_and(|n| n - b <= TimeDelta::seconds(1)) {
            "b just before an anniversary"
        } else {
            "b between anniversaries"
        });
        if b.month() == 2 && b.day() >= 28 {
            tally.hit("b at the end of February");
        }
    });
    tally.require(&[
        ("b before a", 20),
        ("b on an anniversary", 8),
        ("b just before an anniversary", 15),
        ("b between anniversaries", 50),
        ("b at the end of February", 8),
    ]);
}

#[test]
fn add_years_gives_the_same_moment_n_calendar_years_later() {
    // For n in 0..=1000 (what add_years handles; see
    // `add_years_beyond_0_to_1000_years_is_exact_or_an_error`), 29 February
    // going to 28 February. Evaluated at `now` = the expected moment and a
    // millisecond before it, which also checks the round trip
    // years_between(a, a.add_years(n)) == n for signups not on 29 February.
    let rules = years_rules();
    let tally = Tally::default();
    let n = prop_oneof![4 => 0i32..=10, 2 => 0i32..=1000, 1 => Just(0), 1 => Just(1000)];
    proptest!(config(256), |(a in moment(), n in n)| {
        let want = years_later(a, n).unwrap();
        for (now, at_now) in [(want, true), (want - TimeDelta::milliseconds(1), false)] {
            let results = evaluate(&rules, json!({"n": n}), Some(a), vec![], now);
            let out = webhook_payload(&results[0])?;
            prop_assert_eq!(&out["text"], &json!(rfc3339(want)), "{:?} + {}", a, n);
            prop_assert_eq!(out["unix"].as_i64(), Some(want.timestamp()), "{:?} + {}", a, n);
            prop_assert_eq!(out["same"].as_bool(), Some(at_now), "{:?} + {}", a, n);
            prop_assert_eq!(out["after"].as_bool(), Some(!at_now), "{:?} + {}", a, n);
            if !is_leap_day(a) {
                prop_assert_eq!(out["round_trip"].as_i64(), Some(i64::from(n)), "{:?} + {}", a, n);
                let before = if at_now { n } else { (n - 1).max(0) };
                prop_assert_eq!(out["between"].as_i64(), Some(i64::from(before)), "{:?} + {} at {:?}", a, n, now);
            }
        }
        if is_leap_day(a) {
            tally.hit(if want.day() == 28 { "29 February to 28 February" } else { "29 February to 29 February" });
        }
        tally.hit(if n == 0 { "n = 0" } else if n > 100 { "n > 100" } else { "n in 1..=100" });
        if a.month() == 12 && a.day() == 31 {
            tally.hit("a on 31 December");
        }
    });
    tally.require(&[
        ("29 February to 28 February", 8),
        ("29 February to 29 February", 5),
        ("n = 0", 10),
        ("n in 1..=100", 50),
        ("n > 100", 20),
        ("a on 31 December", 5),
    ]);
}

#[test]
fn years_between_reaches_n_on_the_leap_day_anniversary_add_years_gives() {
    // RULES.md: "`a.add_years(n)` the same moment n years later"; so
    // years_between(a, a.add_years(n)) must be n. For a = 2024-02-29 and
    // n = 1, add_years gives 2025-02-28 and years_between answers 0.
    let rules = years_rules();
    proptest!(config(64), |(a in leap_day(), n in 1i32..=8)| {
        let results = evaluate(&rules, json!({"n": n}), Some(a), vec![], now());
        let out = webhook_payload(&results[0])?;
        prop_assert_eq!(out["round_trip"].as_i64(), Some(i64::from(n)), "{:?}.add_years({}) = {}", a, n, out["text"]);
    });
}

#[test]
fn add_years_beyond_0_to_1000_years_is_exact_or_an_error() {
    let rules = years_rules();
    let n = prop_oneof![-1000i64..0, 1001i64..5000, Just(i64::MIN), Just(i64::MAX)];
    proptest!(config(64), |(a in instant(), n in n)| {
        let results = evaluate(&rules, json!({"n": n}), Some(a), vec![], now());
        let want = i32::try_from(n).ok().and_then(|n| years_later(a, n));
        match (&results[0], want) {
            (Err(e), _) => prop_assert!(!e.message.contains("internal error"), "{}", e),
            (Ok(_), Some(want)) => {
                let out = webhook_payload(&results[0])?;
                prop_assert_eq!(&out["text"], &json!(rfc3339(want)), "{:?}.add_years({})", a, n);
            }
            (Ok(actions), None) => prop_assert!(false, "{:?}.add_years({}) gave {:?}", a, n, actions),
        }
    });
}
