//! A problem located in a user's file, printed the way editors and CI
//! annotations understand: `FILE:LINE:COL: message`.

use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is with the whole file.
    pub line: usize,
    /// 1-based; 0 when unknown.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

impl std::error::Error for Diagnostic {}

impl Diagnostic {
    /// Reads back the one-line form `FILE:LINE:COL: message` (as stored in
    /// run reports), so it can be shown with its source line.
    pub fn parse(text: &str) -> Option<Self> {
        let (location, message) = text.split_once(": ")?;
        let mut parts = location.rsplitn(3, ':');
        let col = parts.next()?.parse().ok()?;
        let line = parts.next()?.parse().ok()?;
        let path = PathBuf::from(parts.next()?);
        Some(Self {
            path,
            line,
            col,
            message: message.to_owned(),
        })
    }

    /// The one-line form, then the offending source line (read from the
    /// file) with a caret under the column, as compilers print it.
    pub fn pretty(&self) -> String {
        let source = (self.line > 0)
            .then(|| std::fs::read_to_string(&self.path).ok())
            .flatten();
        match source.as_deref().and_then(|t| t.lines().nth(self.line - 1)) {
            Some(line) => self.pretty_with_line(line),
            None => self.to_string(),
        }
    }

    /// Like [`pretty`](Self::pretty), with the source line given: for errors
    /// found after loading, shown from the text that was loaded (the file may
    /// have changed since).
    pub fn pretty_with_line(&self, source: &str) -> String {
        let source = source.trim_end_matches(['\r', '\n']);
        let number = self.line.to_string();
        let gutter = " ".repeat(number.len());
        let before: String = source
            .chars()
            .take(self.col.saturating_sub(1))
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        format!("{self}\n {number} | {source}\n {gutter} | {before}^")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_shows_the_line_and_a_caret_under_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.rhai");
        std::fs::write(&path, "let a = 1;\nlet n = cout(\"login\");\n").unwrap();
        let d = Diagnostic {
            path: path.clone(),
            line: 2,
            col: 9,
            message: "unknown function `cout`; did you mean `count`?".into(),
        };
        let shown = d.pretty();
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].ends_with(":2:9: unknown function `cout`; did you mean `count`?"));
        assert_eq!(lines[1], " 2 | let n = cout(\"login\");");
        assert_eq!(lines[2], "   |         ^");
        assert_eq!(Diagnostic::parse(&d.to_string()), Some(d));
        assert_eq!(Diagnostic::parse("no location here"), None);
    }
}
