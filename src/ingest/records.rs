//! CSV records read from physical lines, with the checks the `csv` crate
//! leaves out. csv-core does the CSV parsing (quotes, doubled quotes,
//! delimiters); this reader feeds it one physical line at a time, so it
//! knows the line each record and each quoted field starts on whatever the
//! line endings, and it decides what a quote that spans lines means:
//!
//! - A quoted field may contain line breaks (RFC 4180), and is kept.
//! - A quote that is never closed (or still open after [`MAX_RECORD_BYTES`])
//!   rejects its row, naming the line the quote opened on, and the lines
//!   after that line are read again as rows of their own.
//! - A quoted field that spans lines and holds a line that reads as a row
//!   of its own (the header's number of fields) is taken for a stray quote
//!   closed by another one further down: the row is rejected the same way
//!   and the lines it took in are read again, so no row disappears into
//!   another one's field.
//! - A record with the wrong number of fields is rejected; when it spans
//!   lines the message says to which line.

use std::collections::VecDeque;
use std::io::BufRead;

use csv::ByteRecord;

use super::text::{Line, Lines};

/// Longest record (all its lines together).
pub(crate) const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// How many bytes may be read a second time after rows were abandoned for
/// their quotes; past it the quoting is broken throughout and reading stops.
const REREAD_BUDGET: usize = 64 * MAX_RECORD_BYTES;

/// A bad record. [`RecordError::is_fatal`] ones end the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("expected {expected} fields like the header row, found {found}{}", runs_to(*.last_line))]
    FieldCount {
        expected: usize,
        found: usize,
        /// The last line, when a quoted field made the record span lines.
        last_line: Option<u64>,
    },
    #[error(
        "unterminated quote: the quote that opens {column} on this line is {}; the row is skipped and the lines after this one are read as rows of their own (a quote inside a field is written \"\"){}",
        if *.at_end { "never closed".to_owned() } else { format!("still open after {MAX_RECORD_BYTES} bytes") },
        began(*.row_start)
    )]
    Unclosed {
        column: String,
        /// The quote is open at the end of the file (else: past the limit).
        at_end: bool,
        /// Where the row began, when that is an earlier line.
        row_start: Option<u64>,
    },
    #[error(
        "stray quote: the quote that opens {column} on this line closes only on line {closed_on}, and line {row_like} inside it reads as a row of its own; the row is skipped and the lines after this one are read as rows of their own (a quote inside a field is written \"\"){}",
        began(*.row_start)
    )]
    StrayQuote {
        column: String,
        closed_on: u64,
        row_like: u64,
        row_start: Option<u64>,
    },
    #[error("the line is longer than {MAX_RECORD_BYTES} bytes")]
    LineTooLong,
    #[error(
        "the file's quoting is broken throughout (more than {} MiB read again after unterminated or stray quotes); the rest of the file is not read", REREAD_BUDGET >> 20
    )]
    QuotingBroken,
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
}

impl RecordError {
    /// Whether reading stops after this error.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(self, Self::QuotingBroken | Self::Read(_))
    }
}

fn runs_to(last_line: Option<u64>) -> String {
    last_line.map_or_else(String::new, |l| {
        format!(" (a quoted field makes the row run to line {l})")
    })
}

fn began(row_start: Option<u64>) -> String {
    row_start.map_or_else(String::new, |l| format!(" (the row began on line {l})"))
}

/// Reads CSV records (comma-separated, `"` quotes) from physical lines.
pub(crate) struct Records<R> {
    lines: Lines<R>,
    parser: csv_core::Reader,
    /// Lines of an abandoned row, read again before the file goes on.
    again: VecDeque<Line>,
    /// Header names, once the header row has been read; their number is
    /// the number of fields every row must have.
    columns: Option<Vec<String>>,
    out: Vec<u8>,
    out_len: usize,
    ends: Vec<usize>,
    ends_len: usize,
    reread: usize,
    stopped: bool,
}

/// One record's lines while it is being read.
#[derive(Default)]
struct Pending {
    lines: Vec<Line>,
    bytes: usize,
    /// (field index, line its quote opened on) for each quoted field that
    /// was still open at the end of a line.
    quotes: Vec<(usize, u64)>,
}

impl<R: BufRead> Records<R> {
    pub(crate) fn new(lines: Lines<R>) -> Self {
        Self {
            lines,
            parser: csv_core::Reader::new(),
            again: VecDeque::new(),
            columns: None,
            out: vec![0; 4096],
            out_len: 0,
            ends: vec![0; 64],
            ends_len: 0,
            reread: 0,
            stopped: false,
        }
    }

    /// Sets the header names (after reading the header row): from now on
    /// every record must have this many fields.
    pub(crate) fn set_columns(&mut self, columns: Vec<String>) {
        self.columns = Some(columns);
    }

    /// The next record and the line it starts on (for an abandoned row: the
    /// line its quote opened on); `None` at the end of the file.
    pub(crate) fn next_record(&mut self) -> Option<(u64, Result<ByteRecord, RecordError>)> {
        if self.stopped {
            return None;
        }
        let mut pending = Pending::default();
        let record = loop {
            let line = match self.again.pop_front().map(Ok).or_else(|| self.read_line()) {
                Some(Ok(line)) => line,
                Some(Err(e)) => {
                    self.stopped = true;
                    let at = pending.lines.first().map_or(0, |l| l.number);
                    return Some((at, Err(e.into())));
                }
                None if pending.lines.is_empty() => return None,
                None => return Some(self.abandon(pending, true)),
            };
            if pending.lines.is_empty() {
                if line.too_long {
                    return Some((line.number, Err(RecordError::LineTooLong)));
                }
                if line.text.is_empty() {
                    continue; // a blank line is not a row
                }
            } else if line.too_long || pending.bytes + line.len() > MAX_RECORD_BYTES {
                // The line goes with the row's other lines and is read again.
                pending.lines.push(line);
                return Some(self.abandon(pending, false));
            }
            pending.bytes += line.len();
            let number = line.number;
            let done = self.feed(&line);
            pending.lines.push(line);
            if let Some(record) = done {
                break record;
            }
            // The record goes on: a quoted field is open at the line's end.
            let open = self.ends_len;
            if pending.quotes.last().map(|&(f, _)| f) != Some(open) {
                pending.quotes.push((open, number));
            }
        };
        let start = pending.lines[0].number;
        let last = pending.lines[pending.lines.len() - 1].number;
        let Some(expected) = self.columns.as_ref().map(Vec::len) else {
            return Some((start, Ok(record)));
        };
        if let Some((field, opened, row_like)) = row_inside(&record, &pending.quotes, expected) {
            let error = RecordError::StrayQuote {
                column: self.column(field),
                closed_on: opened + line_breaks(record.get(field).unwrap_or_default()),
                row_like,
                row_start: (start != opened).then_some(start),
            };
            return Some(self.read_again_after(pending.lines, opened, error));
        }
        if record.len() != expected {
            return Some((
                start,
                Err(RecordError::FieldCount {
                    expected,
                    found: record.len(),
                    last_line: (last != start).then_some(last),
                }),
            ));
        }
        Some((start, Ok(record)))
    }

    fn read_line(&mut self) -> Option<std::io::Result<Line>> {
        self.lines.next_line().transpose()
    }

    /// `field 3`, or `the "name" field` once the header is known.
    fn column(&self, field: usize) -> String {
        match self.columns.as_ref().and_then(|c| c.get(field)) {
            Some(name) => format!("the {name:?} field"),
            None => format!("field {}", field + 1),
        }
    }

    /// A row whose quote does not close (at the end of the file, or within
    /// the size limit): rejected at the line the quote opened on.
    fn abandon(
        &mut self,
        pending: Pending,
        at_end: bool,
    ) -> (u64, Result<ByteRecord, RecordError>) {
        let start = pending.lines[0].number;
        let (field, opened) = pending.quotes.last().copied().unwrap_or((0, start));
        let error = RecordError::Unclosed {
            column: self.column(field),
            at_end,
            row_start: (start != opened).then_some(start),
        };
        self.read_again_after(pending.lines, opened, error)
    }

    /// Rejects a row and queues its lines after `opened` to be read again.
    fn read_again_after(
        &mut self,
        lines: Vec<Line>,
        opened: u64,
        error: RecordError,
    ) -> (u64, Result<ByteRecord, RecordError>) {
        // The parser is inside a quoted field; start it afresh. (A reset
        // parser would also drop a UTF-8 byte-order mark at the start of
        // the next line, as at the start of a file; no real file has one.)
        self.parser.reset();
        self.out_len = 0;
        self.ends_len = 0;
        for line in lines.into_iter().rev().filter(|l| l.number > opened) {
            self.reread += line.len();
            self.again.push_front(line);
        }
        if self.reread > REREAD_BUDGET {
            self.stopped = true;
            return (opened, Err(RecordError::QuotingBroken));
        }
        (opened, Err(error))
    }

    /// Feeds one line to the parser; the record, if the line completed one.
    fn feed(&mut self, line: &Line) -> Option<ByteRecord> {
        // The last line of a file without a final line break is ended here
        // so that an unclosed quote on it shows (the break would only be
        // content inside that quote, and that row is rejected).
        let end: &[u8] = if line.end.is_empty() { b"\n" } else { line.end };
        let done = self.feed_bytes(&line.text);
        debug_assert!(done.is_none(), "a line's text holds no line break");
        self.feed_bytes(end)
    }

    fn feed_bytes(&mut self, mut input: &[u8]) -> Option<ByteRecord> {
        let mut record = None;
        while !input.is_empty() {
            if self.out_len == self.out.len() {
                self.out.resize(self.out.len() * 2, 0);
            }
            if self.ends_len == self.ends.len() {
                self.ends.resize(self.ends.len() * 2, 0);
            }
            let (result, nin, nout, nend) = self.parser.read_record(
                input,
                &mut self.out[self.out_len..],
                &mut self.ends[self.ends_len..],
            );
            input = &input[nin..];
            self.out_len += nout;
            self.ends_len += nend;
            match result {
                csv_core::ReadRecordResult::Record => {
                    // What may follow is the LF of a CRLF, which the parser
                    // skips without output.
                    let mut r = ByteRecord::with_capacity(self.out_len, self.ends_len);
                    let mut from = 0;
                    for &to in &self.ends[..self.ends_len] {
                        r.push_field(&self.out[from..to]);
                        from = to;
                    }
                    self.out_len = 0;
                    self.ends_len = 0;
                    record = Some(r);
                }
                csv_core::ReadRecordResult::End => break,
                _ => {}
            }
        }
        record
    }
}

/// Number of fields in one line read as a CSV row by itself.
fn field_count(line: &[u8]) -> usize {
    let mut parser = csv_core::Reader::new();
    let mut out = vec![0; line.len() + 1];
    let mut ends = vec![0; line.len() + 2];
    let mut fields = 0;
    let mut input: &[u8] = &[line, b"\n"].concat();
    while !input.is_empty() {
        let (result, nin, _, nend) = parser.read_record(input, &mut out, &mut ends);
        input = &input[nin..];
        fields += nend;
        if result == csv_core::ReadRecordResult::Record {
            break;
        }
    }
    fields
}

/// The pieces of a field's text between line breaks (CRLF, LF or CR).
fn pieces(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(at) => {
                let skip = if text[at..].starts_with(b"\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&text[at + skip..]);
                Some(&text[..at])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

fn line_breaks(text: &[u8]) -> u64 {
    pieces(text).count() as u64 - 1
}

/// The first line inside a multi-line quoted field that reads as a whole
/// row (`expected` fields): (field index, line the quote opened on, that line).
fn row_inside(
    record: &ByteRecord,
    quotes: &[(usize, u64)],
    expected: usize,
) -> Option<(usize, u64, u64)> {
    quotes.iter().find_map(|&(field, opened)| {
        let text = record.get(field)?;
        pieces(text)
            .enumerate()
            .skip(1)
            .find(|(_, piece)| field_count(piece) == expected)
            .map(|(k, _)| (field, opened, opened + k as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `csv` (header first) and returns each record as
    /// `(line, Ok(fields) | Err(message))`.
    fn read(csv: &[u8]) -> Vec<(u64, Result<Vec<String>, String>)> {
        // A tiny buffer puts line breaks across reads.
        let lines = Lines::new(std::io::BufReader::with_capacity(3, csv), 1 << 20);
        let mut records = Records::new(lines);
        let (_, header) = records.next_record().unwrap();
        let header: Vec<String> = header
            .unwrap()
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        records.set_columns(header);
        let mut out = Vec::new();
        while let Some((line, r)) = records.next_record() {
            out.push((
                line,
                r.map(|r| {
                    r.iter()
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                        .collect()
                })
                .map_err(|e| e.to_string()),
            ));
        }
        out
    }

    fn ok(line: u64, fields: &[&str]) -> (u64, Result<Vec<String>, String>) {
        (line, Ok(fields.iter().map(|f| f.to_string()).collect()))
    }

    fn err_at(got: &(u64, Result<Vec<String>, String>), line: u64, needle: &str) {
        assert_eq!(got.0, line, "{got:?}");
        let e = got.1.as_ref().expect_err("an error");
        assert!(e.contains(needle), "{e:?} should say {needle:?}");
    }

    #[test]
    fn lines_are_counted_the_same_for_lf_crlf_cr_and_mixed_endings() {
        for eol in ["\n", "\r\n", "\r"] {
            let csv = format!("id,name{eol}a,1{eol}{eol}b,2{eol}c,3");
            assert_eq!(
                read(csv.as_bytes()),
                vec![ok(2, &["a", "1"]), ok(4, &["b", "2"]), ok(5, &["c", "3"])],
                "{eol:?}"
            );
        }
        assert_eq!(
            read(b"id,name\ra,1\r\nb,2\nc,3\r"),
            vec![ok(2, &["a", "1"]), ok(3, &["b", "2"]), ok(4, &["c", "3"])]
        );
    }

    #[test]
    fn a_quoted_field_may_hold_line_breaks_of_any_kind() {
        let got = read(b"id,name,email\na,\"Ana\r\nNovak\",x@y\rb,\"B\rB\",z@w\n");
        assert_eq!(
            got,
            vec![
                ok(2, &["a", "Ana\r\nNovak", "x@y"]),
                ok(4, &["b", "B\rB", "z@w"])
            ]
        );
    }

    #[test]
    fn an_unclosed_quote_in_the_last_field_rejects_its_line_and_the_rest_is_read() {
        let got = read(b"id,email,name\nc1,a@x,\"Ana\nc2,b@x,Ben\nc3,c@x,Cem\n");
        assert_eq!(got.len(), 3, "{got:?}");
        err_at(&got[0], 2, "unterminated quote");
        err_at(&got[0], 2, "the \"name\" field");
        assert_eq!(got[1], ok(3, &["c2", "b@x", "Ben"]));
        assert_eq!(got[2], ok(4, &["c3", "c@x", "Cem"]));
    }

    #[test]
    fn an_unclosed_quote_in_a_middle_field_names_its_own_line() {
        let got = read(b"id,email,name\r\nc1,a@x,Ana\r\nc2,\"b@x,Ben\r\nc3,c@x,Cem");
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], ok(2, &["c1", "a@x", "Ana"]));
        err_at(
            &got[1],
            3,
            "the \"email\" field on this line is never closed",
        );
        assert_eq!(got[2], ok(4, &["c3", "c@x", "Cem"]));
    }

    #[test]
    fn a_stray_quote_closed_by_another_cannot_swallow_the_rows_between() {
        let got = read(b"id,email,name\nc1,a@x,\"Ana\nc2,b@x,Ben\nc3,c@x,Cem\"\nc4,d@x,Dia\n");
        assert_eq!(got.len(), 4, "{got:?}");
        err_at(&got[0], 2, "stray quote");
        err_at(&got[0], 2, "closes only on line 4, and line 3 inside it");
        assert_eq!(got[1], ok(3, &["c2", "b@x", "Ben"]));
        assert_eq!(got[2], ok(4, &["c3", "c@x", "Cem\""]));
        assert_eq!(got[3], ok(5, &["c4", "d@x", "Dia"]));

        // Closed by a properly quoted field further down.
        let got = read(b"id,email,name\nc1,\"a@x,Ana\nc2,b@x,\"Ben, Jr\"\nc3,c@x,Cem\n");
        err_at(&got[0], 2, "stray quote");
        assert_eq!(got[1], ok(3, &["c2", "b@x", "Ben, Jr"]));
        assert_eq!(got[2], ok(4, &["c3", "c@x", "Cem"]));
    }

    #[test]
    fn a_multi_line_field_with_the_wrong_field_count_says_where_the_row_ends() {
        let got = read(b"id,name\na,\"x\ny\",extra\nb,2\n");
        err_at(&got[0], 2, "expected 2 fields like the header row, found 3");
        err_at(&got[0], 2, "run to line 3");
        assert_eq!(got[1], ok(4, &["b", "2"]));
    }

    #[test]
    fn an_unclosed_quote_after_a_closed_multi_line_field_names_the_later_line() {
        let got = read(b"id,a,b\n1,\"x\ny\",\"open\n2,p,q\n");
        err_at(&got[0], 3, "the \"b\" field on this line is never closed");
        err_at(&got[0], 3, "the row began on line 2");
        assert_eq!(got[1], ok(4, &["2", "p", "q"]));
    }

    #[test]
    fn a_too_long_line_is_rejected_and_reading_goes_on() {
        let lines = Lines::new(&b"id,name\na,1\nb,xxxxxxxxxxxxxxxxxxxxxx\nc,3\n"[..], 16);
        let mut records = Records::new(lines);
        records.next_record().unwrap().1.unwrap();
        records.set_columns(vec!["id".into(), "name".into()]);
        assert_eq!(records.next_record().unwrap().0, 2);
        let (line, e) = records.next_record().unwrap();
        assert_eq!(line, 3);
        assert!(matches!(e, Err(RecordError::LineTooLong)));
        assert_eq!(records.next_record().unwrap().0, 4);
        assert!(records.next_record().is_none());
    }

    #[test]
    fn pieces_split_at_every_kind_of_line_break() {
        let got: Vec<&[u8]> = pieces(b"a\r\nb\nc\rd").collect();
        assert_eq!(got, vec![&b"a"[..], b"b", b"c", b"d"]);
        assert_eq!(field_count(b"a,\"b,c\",d"), 3);
        assert_eq!(field_count(b""), 0, "an empty line is no row");
    }
}
