//! Importing customers (CSV) and events (Segment JSON lines).
//!
//! Files are streamed: a blocking reader thread parses lines into batches and
//! hands them through a bounded channel to the store, one transaction per
//! batch, so a million events never sit in memory at once. A bad row is
//! reported with its line number and the good rows around it are kept.
//!
//! `text` checks the encoding and splits physical lines (LF, CRLF, CR);
//! `records` reads CSV records from them and decides what quotes that span
//! lines mean; [`segment`] parses Segment messages.

mod records;
pub mod segment;
mod text;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::domain::{CustomerId, CustomerPatch, Event};
use crate::store::{Store, StoreError, Upsert};
use records::Records;
use segment::{Message, patch_from_traits};
use text::Lines;

/// Rows per store transaction.
const BATCH: usize = 5_000;
/// Longest accepted JSON line / CSV field.
const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Problems kept in the report (the counts stay exact beyond it).
const MAX_REPORTED: usize = 1_000;

/// A problem with one line of an input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    pub line: u64,
    pub message: String,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub file: PathBuf,
    pub imported: u64,
    pub updated: u64,
    pub duplicate: u64,
    pub ignored: u64,
    pub rejected: u64,
    pub errors: Vec<LineProblem>,
    pub warnings: Vec<LineProblem>,
}

impl ImportReport {
    fn reject(&mut self, line: u64, message: String) {
        self.rejected += 1;
        if self.errors.len() < MAX_REPORTED {
            self.errors.push(LineProblem { line, message });
        }
    }

    fn warn(&mut self, line: u64, message: String) {
        if self.warnings.len() < MAX_REPORTED {
            self.warnings.push(LineProblem { line, message });
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One batch from the reader thread.
#[derive(Default)]
struct Batch {
    customers: Vec<(u64, CustomerPatch)>,
    events: Vec<Event>,
    errors: Vec<(u64, String)>,
    warnings: Vec<(u64, String)>,
    ignored: u64,
}

impl Batch {
    /// An empty batch with room for a full batch of customers, so the
    /// reader does not regrow it row by row.
    fn of_customers() -> Self {
        Self {
            customers: Vec::with_capacity(BATCH),
            ..Self::default()
        }
    }

    fn len(&self) -> usize {
        self.customers.len() + self.events.len()
    }
}

/// Applies batches from the reader to the store and tallies the report.
async fn apply(
    store: &dyn Store,
    mut rx: mpsc::Receiver<Batch>,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    while let Some(batch) = rx.recv().await {
        for (line, message) in batch.errors {
            report.reject(line, message);
        }
        for (line, message) in batch.warnings {
            report.warn(line, message);
        }
        report.ignored += batch.ignored;
        if !batch.customers.is_empty() {
            let patches: Vec<CustomerPatch> = batch.customers.into_iter().map(|(_, p)| p).collect();
            for outcome in store.upsert_customers(&patches).await? {
                match outcome {
                    Upsert::Inserted => report.imported += 1,
                    Upsert::Updated => report.updated += 1,
                }
            }
        }
        if !batch.events.is_empty() {
            let counts = store.insert_events(&batch.events).await?;
            report.imported += counts.inserted as u64;
            report.duplicate += counts.duplicates as u64;
        }
    }
    Ok(())
}

/// Imports customers from a CSV file with a header row. Columns `id` and
/// `email` are required; `name, created_at, timezone, model, owner` map onto
/// the customer; any other column becomes a trait. Re-importing updates.
pub async fn import_customers(
    store: Arc<dyn Store>,
    path: &Path,
) -> Result<ImportReport, IngestError> {
    import_customers_with(store, path, None).await
}

/// [`import_customers`], advancing `progress` by the bytes read.
pub async fn import_customers_with(
    store: Arc<dyn Store>,
    path: &Path,
    progress: Option<ProgressBar>,
) -> Result<ImportReport, IngestError> {
    let (mut records, headers) = open_csv(path, progress)?;
    for required in ["id", "email"] {
        if !headers.iter().any(|h| h == required) {
            return Err(IngestError::BadFile {
                path: path.to_owned(),
                message: format!(
                    "the header row has no {required:?} column (found: {})",
                    headers.join(",")
                ),
            });
        }
    }

    let (tx, rx) = mpsc::channel::<Batch>(4);
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut batch = Batch::of_customers();
        let mut record = csv::ByteRecord::new();
        while let Some((line, result)) = next_record(&mut records, &mut record) {
            match result {
                Ok(()) => match customer_row(&headers, &record) {
                    Ok((patch, warnings)) => {
                        batch
                            .warnings
                            .extend(warnings.into_iter().map(|w| (line, w)));
                        batch.customers.push((line, patch));
                    }
                    Err(message) => batch.errors.push((line, message)),
                },
                Err((e, go_on)) => {
                    batch.errors.push((line, e));
                    if !go_on {
                        break;
                    }
                }
            }
            if batch.len() >= BATCH
                && tx
                    .blocking_send(std::mem::replace(&mut batch, Batch::of_customers()))
                    .is_err()
            {
                return;
            }
        }
        let _ = tx.blocking_send(batch);
    });
    let mut report = ImportReport {
        file: path.to_owned(),
        ..Default::default()
    };
    apply(&*store, rx, &mut report).await?;
    let _ = reader_task.await;
    Ok(report)
}

/// What imports read: the file, counted on a progress bar (hidden when the
/// CLI is not on a terminal).
type Input = BufReader<indicatif::ProgressBarIter<std::fs::File>>;
type CsvRecords = Records<Input>;
use indicatif::ProgressBar;

/// Opens a file for reading as text: refuses UTF-16/32 and other
/// non-text files with one error saying what they are, and skips a UTF-8
/// byte-order mark.
fn open_text(
    path: &Path,
    capacity: usize,
    progress: Option<ProgressBar>,
) -> Result<Input, IngestError> {
    let file = std::fs::File::open(path).map_err(|source| IngestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bar = progress.unwrap_or_else(ProgressBar::hidden);
    if let Ok(meta) = file.metadata() {
        bar.set_length(meta.len());
    }
    let mut reader = BufReader::with_capacity(capacity, bar.wrap_read(file));
    let head = reader.fill_buf().map_err(|source| IngestError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bom = text::check_encoding(head).map_err(|e| IngestError::BadFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    reader.consume(bom);
    Ok(reader)
}

/// Opens a CSV file and reads its header row (names trimmed, lower-cased).
fn open_csv(
    path: &Path,
    progress: Option<ProgressBar>,
) -> Result<(CsvRecords, Vec<String>), IngestError> {
    let reader = open_text(path, 64 * 1024, progress)?;
    let mut records = Records::new(Lines::new(reader, records::MAX_RECORD_BYTES));
    let bad = |message: String| IngestError::BadFile {
        path: path.to_owned(),
        message,
    };
    let headers = match records.next_record() {
        None => Vec::new(),
        Some((line, Err(e))) => {
            return Err(bad(format!("cannot read the header row (line {line}): {e}")));
        }
        Some((line, Ok(header))) => header
            .iter()
            .map(|h| match std::str::from_utf8(h) {
                Ok(h) => Ok(h.trim().to_ascii_lowercase()),
                Err(_) => Err(bad(format!(
                    "the header row (line {line}) is not valid UTF-8, so the file is in another \
                     encoding; convert it first, e.g. `iconv -f WINDOWS-1252 -t UTF-8 FILE > FILE.utf8` \
                     (or save it from the spreadsheet as \"CSV UTF-8\")"
                ))),
            })
            .collect::<Result<_, _>>()?,
    };
    records.set_columns(headers.clone());
    Ok((records, headers))
}

/// `engaged suppressions import FILE.csv`: an `email` column and an
/// optional `reason`. Counts: `imported` newly suppressed, `duplicate`
/// already suppressed, `rejected` bad rows (with their lines).
pub async fn import_suppressions(
    store: &dyn Store,
    path: &Path,
    now: chrono::DateTime<Utc>,
) -> Result<ImportReport, IngestError> {
    let (mut records, headers) = open_csv(path, None)?;
    let col = |name: &str| headers.iter().position(|h| h == name);
    let Some(email_col) = col("email") else {
        return Err(IngestError::BadFile {
            path: path.to_owned(),
            message: format!(
                "the header row has no \"email\" column (found: {})",
                headers.join(",")
            ),
        });
    };
    let reason_col = col("reason");
    let mut report = ImportReport {
        file: path.to_owned(),
        ..Default::default()
    };
    let mut record = csv::ByteRecord::new();
    while let Some((line, result)) = next_record(&mut records, &mut record) {
        if let Err((e, go_on)) = result {
            report.reject(line, e);
            if go_on {
                continue;
            }
            break;
        }
        let field =
            |c: usize| std::str::from_utf8(record.get(c).unwrap_or_default()).map(str::trim);
        let email = match field(email_col) {
            Ok(raw) => crate::domain::Email::parse(raw),
            Err(_) => {
                report.reject(line, "the email is not valid UTF-8".into());
                continue;
            }
        };
        let email = match email {
            Ok(e) => e,
            Err(e) => {
                report.reject(line, e.to_string());
                continue;
            }
        };
        let reason = reason_col
            .and_then(|c| field(c).ok())
            .filter(|r| !r.is_empty())
            .unwrap_or("imported");
        if store.suppress(email.as_str(), reason, now).await? {
            report.imported += 1;
        } else {
            report.duplicate += 1;
        }
    }
    Ok(report)
}

/// A bad CSV record: what is wrong, and whether reading can go on after it.
type RecordProblem = (String, bool);

/// Reads the next record and the line it starts on; `None` at the end.
fn next_record(
    records: &mut CsvRecords,
    record: &mut csv::ByteRecord,
) -> Option<(u64, Result<(), RecordProblem>)> {
    let (line, result) = records.next_record()?;
    Some((
        line,
        match result {
            Ok(r) => {
                *record = r;
                Ok(())
            }
            Err(e) => Err((e.to_string(), !e.is_fatal())),
        },
    ))
}

/// One CSV row → a customer patch (and warnings).
fn customer_row(
    headers: &[String],
    record: &csv::ByteRecord,
) -> Result<(CustomerPatch, Vec<String>), String> {
    let mut fields = Map::new();
    let mut id = None;
    for (h, raw) in headers.iter().zip(record.iter()) {
        if raw.len() > MAX_LINE_BYTES / 4 {
            return Err(format!(
                "column {h:?} is longer than {} bytes",
                MAX_LINE_BYTES / 4
            ));
        }
        let value = std::str::from_utf8(raw)
            .map_err(|_| format!("column {h:?} is not valid UTF-8"))?
            .trim();
        if h == "id" {
            id = Some(value.to_owned());
            continue;
        }
        if value.is_empty() || h.is_empty() {
            continue;
        }
        let known = matches!(
            h.as_str(),
            "email" | "name" | "created_at" | "timezone" | "model" | "owner"
        );
        fields.insert(
            h.clone(),
            if known {
                Value::String(value.to_owned())
            } else {
                typed_trait(value)
            },
        );
    }
    let id =
        CustomerId::parse(id.as_deref().unwrap_or_default()).map_err(|e| format!("id: {e}"))?;
    if !fields.contains_key("email") {
        return Err("email is required".into());
    }
    patch_from_traits(id, fields)
}

/// Trait values from CSV: numbers and booleans become typed, the rest stays text.
fn typed_trait(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        Value::from(i)
    } else if let Ok(f) = s.parse::<f64>()
        && f.is_finite()
    {
        Value::from(f)
    } else if s == "true" || s == "false" {
        Value::Bool(s == "true")
    } else {
        Value::String(s.to_owned())
    }
}

/// Imports Segment-spec messages, one JSON object per line. `track` messages
/// become events (a repeated `messageId` is ignored); `identify` messages
/// create or update customers. Events for customers not imported yet are kept.
pub async fn import_events(
    store: Arc<dyn Store>,
    path: &Path,
) -> Result<ImportReport, IngestError> {
    import_events_with(store, path, None).await
}

/// [`import_events`], advancing `progress` by the bytes read.
pub async fn import_events_with(
    store: Arc<dyn Store>,
    path: &Path,
    progress: Option<ProgressBar>,
) -> Result<ImportReport, IngestError> {
    let mut reader = open_text(path, 1 << 20, progress)?;
    let (tx, rx) = mpsc::channel::<Batch>(4);
    let received_at = Utc::now();
    let reader_task = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(4096);
        let mut batch = Batch::default();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            if text.len() > MAX_LINE_BYTES {
                batch.errors.push((
                    line_no,
                    format!("line is longer than {MAX_LINE_BYTES} bytes"),
                ));
            } else {
                match parse_line(text, received_at) {
                    Ok(Message::Track(e)) => batch.events.push(e),
                    Ok(Message::Identify { patch, warnings }) => {
                        batch
                            .warnings
                            .extend(warnings.into_iter().map(|w| (line_no, w)));
                        batch.customers.push((line_no, patch));
                    }
                    Ok(Message::Ignored(_)) => batch.ignored += 1,
                    Err(message) => batch.errors.push((line_no, message)),
                }
            }
            if batch.len() >= BATCH && tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                return Ok(());
            }
        }
        let _ = tx.blocking_send(batch);
        Ok(())
    });
    let mut report = ImportReport {
        file: path.to_owned(),
        ..Default::default()
    };
    apply(&*store, rx, &mut report).await?;
    match reader_task.await {
        Ok(Ok(())) => Ok(report),
        Ok(Err(source)) => Err(IngestError::Read {
            path: path.to_owned(),
            source,
        }),
        Err(e) => Err(IngestError::BadFile {
            path: path.to_owned(),
            message: format!("reader stopped: {e}"),
        }),
    }
}

fn parse_line(text: &[u8], received_at: chrono::DateTime<Utc>) -> Result<Message, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the line is not valid UTF-8".to_owned())?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    segment::parse_message(&v, received_at)
}
