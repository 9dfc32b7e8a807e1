//! Bytes → text lines, shared by the CSV and JSON-lines importers: the
//! encoding check made on a file's first bytes, and physical lines split at
//! LF, CRLF or a lone CR (old Mac exports), numbered from 1, so a reported
//! line is the line an editor shows whichever endings the file uses.

use std::io::{self, BufRead};

/// The UTF-8 byte-order mark, which some editors (Excel's "CSV UTF-8")
/// write at the start of a file.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// A file that is not UTF-8 text, recognised from its first bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotUtf8 {
    /// A UTF-16 or UTF-32 byte-order mark.
    #[error(
        "the file is {0} text (it starts with a {0} byte-order mark), not UTF-8; convert it first, e.g. `iconv -f {family} -t UTF-8 FILE > FILE.utf8`",
        family = family(.0)
    )]
    Bom(&'static str),
    /// No mark, but NUL bytes in the pattern ASCII text has in UTF-16/32.
    #[error(
        "the file looks like {0} text (NUL bytes between the letters), not UTF-8; convert it first, e.g. `iconv -f {0} -t UTF-8 FILE > FILE.utf8`"
    )]
    Nuls(&'static str),
}

/// `UTF-16LE` → `UTF-16`: iconv's name that reads the byte-order mark.
fn family(encoding: &str) -> &str {
    encoding
        .strip_suffix("LE")
        .or_else(|| encoding.strip_suffix("BE"))
        .unwrap_or(encoding)
}

/// Checks the first bytes of a file (a few KiB are plenty) and says how
/// many to skip: 3 for a UTF-8 byte-order mark, else 0.
pub(crate) fn check_encoding(head: &[u8]) -> Result<usize, NotUtf8> {
    // UTF-32LE's mark starts with UTF-16LE's, so it is tested first.
    for (bom, name) in [
        (&b"\x00\x00\xfe\xff"[..], "UTF-32BE"),
        (b"\xff\xfe\x00\x00", "UTF-32LE"),
        (b"\xfe\xff", "UTF-16BE"),
        (b"\xff\xfe", "UTF-16LE"),
    ] {
        if head.starts_with(bom) {
            return Err(NotUtf8::Bom(name));
        }
    }
    if head.starts_with(UTF8_BOM) {
        return Ok(UTF8_BOM.len());
    }
    // ASCII in UTF-16LE is "i\0d\0", in UTF-16BE "\0i\0d"; in UTF-32 three
    // bytes of four are NUL. UTF-8 text has no NUL bytes at all, so a
    // quarter of them is far past any stray one.
    let (mut even, mut odd) = (0usize, 0usize);
    for (i, &b) in head.iter().enumerate() {
        if b == 0 {
            if i % 2 == 0 {
                even += 1;
            } else {
                odd += 1;
            }
        }
    }
    if (even + odd) * 4 < head.len() || head.len() < 4 {
        return Ok(0);
    }
    let name = if (even + odd) * 2 > head.len() {
        if head[0] == 0 { "UTF-32BE" } else { "UTF-32LE" }
    } else if odd > even * 4 {
        "UTF-16LE"
    } else if even > odd * 4 {
        "UTF-16BE"
    } else {
        "UTF-16"
    };
    Err(NotUtf8::Nuls(name))
}

/// One physical line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Line {
    /// 1-based.
    pub(crate) number: u64,
    /// The bytes before the line break (empty when `too_long`).
    pub(crate) text: Vec<u8>,
    /// The line break as written: `\n`, `\r\n`, `\r`, or empty at the end
    /// of a file without a final break.
    pub(crate) end: &'static [u8],
    /// The line was longer than the limit; its bytes were skipped.
    pub(crate) too_long: bool,
}

impl Line {
    /// Bytes the line took in the file.
    pub(crate) fn len(&self) -> usize {
        self.text.len() + self.end.len()
    }
}

/// Splits a reader into physical lines at LF, CRLF or a lone CR.
pub(crate) struct Lines<R> {
    inner: R,
    number: u64,
    max: usize,
}

impl<R: BufRead> Lines<R> {
    /// Lines longer than `max` bytes come back empty with `too_long` set, so
    /// one huge line cannot fill the memory.
    pub(crate) fn new(inner: R, max: usize) -> Self {
        Self {
            inner,
            number: 0,
            max,
        }
    }

    /// The next line, or `None` at the end of the input.
    pub(crate) fn next_line(&mut self) -> io::Result<Option<Line>> {
        let mut text = Vec::new();
        let mut too_long = false;
        let mut read_any = false;
        let end: &'static [u8] = loop {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                if !read_any {
                    return Ok(None);
                }
                break b"";
            }
            read_any = true;
            let brk = buf.iter().position(|&b| b == b'\n' || b == b'\r');
            let take = brk.unwrap_or(buf.len());
            if !too_long {
                if text.len() + take > self.max {
                    too_long = true;
                    text = Vec::new();
                } else {
                    text.extend_from_slice(&buf[..take]);
                }
            }
            let Some(at) = brk else {
                self.inner.consume(take);
                continue;
            };
            let was_cr = buf[at] == b'\r';
            self.inner.consume(at + 1);
            if !was_cr {
                break b"\n";
            }
            // A CR may be the first half of a CRLF split across reads.
            let next = loop {
                match self.inner.fill_buf() {
                    Ok(b) => break b.first().copied(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if next == Some(b'\n') {
                self.inner.consume(1);
                break b"\r\n";
            }
            break b"\r";
        };
        self.number += 1;
        Ok(Some(Line {
            number: self.number,
            text,
            end,
            too_long,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(u64, String, &'static [u8], bool)> {
        // A one-byte buffer puts every CRLF across two reads.
        let mut lines = Lines::new(io::BufReader::with_capacity(1, input), max);
        let mut out = Vec::new();
        while let Some(l) = lines.next_line().unwrap() {
            out.push((
                l.number,
                String::from_utf8(l.text).unwrap(),
                l.end,
                l.too_long,
            ));
        }
        out
    }

    #[test]
    fn lf_crlf_and_lone_cr_each_end_one_line() {
        assert_eq!(
            lines(b"a\nb\r\nc\rd\r\r\ne", 100),
            vec![
                (1, "a".into(), &b"\n"[..], false),
                (2, "b".into(), &b"\r\n"[..], false),
                (3, "c".into(), &b"\r"[..], false),
                (4, "d".into(), &b"\r"[..], false),
                (5, "".into(), &b"\r\n"[..], false),
                (6, "e".into(), &b""[..], false),
            ]
        );
    }

    #[test]
    fn a_final_line_break_does_not_make_an_extra_line() {
        assert_eq!(lines(b"a\r", 100), vec![(1, "a".into(), &b"\r"[..], false)]);
        assert!(lines(b"", 100).is_empty());
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_and_counted() {
        assert_eq!(
            lines(b"ok\nxxxxxxxx\nok\n", 4),
            vec![
                (1, "ok".into(), &b"\n"[..], false),
                (2, "".into(), &b"\n"[..], true),
                (3, "ok".into(), &b"\n"[..], false),
            ]
        );
    }

    #[test]
    fn a_utf8_byte_order_mark_is_skipped() {
        assert_eq!(check_encoding(b"\xef\xbb\xbfid,email\n"), Ok(3));
        assert_eq!(check_encoding(b"id,email\n"), Ok(0));
        assert_eq!(check_encoding(b""), Ok(0));
    }

    #[test]
    fn utf16_and_utf32_are_named_with_or_without_a_byte_order_mark() {
        let le: Vec<u8> = "id,email\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let be: Vec<u8> = "id,email\n"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert_eq!(check_encoding(&le), Err(NotUtf8::Nuls("UTF-16LE")));
        assert_eq!(check_encoding(&be), Err(NotUtf8::Nuls("UTF-16BE")));
        let with_bom = [&b"\xff\xfe"[..], &le].concat();
        assert_eq!(check_encoding(&with_bom), Err(NotUtf8::Bom("UTF-16LE")));
        let with_bom = [&b"\xfe\xff"[..], &be].concat();
        assert_eq!(check_encoding(&with_bom), Err(NotUtf8::Bom("UTF-16BE")));
        let utf32: Vec<u8> = "id,email\n"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert_eq!(check_encoding(&utf32), Err(NotUtf8::Nuls("UTF-32LE")));
        let e = NotUtf8::Bom("UTF-16LE").to_string();
        assert!(
            e.contains("UTF-16LE") && e.contains("iconv -f UTF-16 -t UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn a_stray_nul_byte_is_left_to_the_row_that_has_it() {
        assert_eq!(check_encoding(b"id,email\nc1,a\0@example.com\n"), Ok(0));
    }
}
