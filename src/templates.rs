//! Email templates: `templates/NAME.txt` (required) and `templates/NAME.html`
//! (optional, auto-escaped), each starting with front matter that holds the
//! subject, itself a template:
//!
//! ```text
//! ---
//! subject: Welcome aboard, {{ customer.name }}!
//! ---
//! Hi {{ customer.name }}, …
//! ```
//!
//! Undefined variables are errors when printed (MiniJinja's semi-strict mode:
//! `{% if x is defined %}` and `{% if x %}` still work). Rendering is fuelled,
//! so a template that loops forever fails instead of hanging delivery.
//! Unknown filters and tests are load errors, found in the compiled template
//! (MiniJinja alone would only notice on the night the line renders).
//!
//! Every error names the file's own line and column: the subject template
//! lives on its front-matter line, the body starts after the front matter.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::machinery::Instruction;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// Fuel for one render (MiniJinja instructions); generous for real emails.
const RENDER_FUEL: u64 = 500_000;
/// Largest rendered body we send.
const MAX_RENDERED_BYTES: usize = 1024 * 1024;

/// MiniJinja's built-in filters and tests (3.1), the names an unknown one is
/// compared with for a "did you mean". MiniJinja cannot list what an
/// environment has, so whether a name exists is asked of the environment
/// itself (`'x' is filter`); these lists only feed suggestions.
const BUILTIN_FILTERS: &[&str] = &[
    "abs",
    "attr",
    "batch",
    "bool",
    "capitalize",
    "chain",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "format",
    "groupby",
    "indent",
    "int",
    "items",
    "join",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "pprint",
    "reject",
    "rejectattr",
    "replace",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "slice",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "urlencode",
    "zip",
];
const BUILTIN_TESTS: &[&str] = &[
    "boolean",
    "defined",
    "divisibleby",
    "endingwith",
    "eq",
    "equalto",
    "escaped",
    "even",
    "false",
    "filter",
    "float",
    "ge",
    "greaterthan",
    "gt",
    "in",
    "int",
    "integer",
    "iterable",
    "le",
    "lessthan",
    "lower",
    "lt",
    "mapping",
    "ne",
    "none",
    "number",
    "odd",
    "safe",
    "sameas",
    "sequence",
    "startingwith",
    "string",
    "test",
    "true",
    "undefined",
    "upper",
];

/// A located template error: `FILE:LINE:COL: message`.
pub type TemplateError = crate::diagnostic::Diagnostic;

/// A template that failed to render: where, and the line it points into as
/// it was loaded, so the error can be shown with a caret long after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderError {
    pub diagnostic: TemplateError,
    source_line: Option<String>,
}

impl RenderError {
    /// `FILE:LINE:COL: message`, then the template line with a caret under
    /// the column (several lines; [`Display`](fmt::Display) is the first).
    pub fn pretty(&self) -> String {
        match &self.source_line {
            Some(line) => self.diagnostic.pretty_with_line(line),
            None => self.diagnostic.to_string(),
        }
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.diagnostic.fmt(f)
    }
}

impl std::error::Error for RenderError {}

/// A rendered email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

/// The part of a template file a MiniJinja template was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The `subject:` value in the front matter.
    Subject,
    /// Everything after the front matter.
    Body,
}

/// A template file as loaded, to locate errors in it.
#[derive(Clone, Debug)]
struct Source {
    path: PathBuf,
    /// The file's text (without a byte-order mark).
    text: String,
    /// File line of the first body line (after front matter).
    body_line: usize,
    /// File line and column of the subject template's first character.
    subject_line: usize,
    subject_col: usize,
}

impl Source {
    /// The file position of a 1-based line and column in one part.
    fn locate(&self, part: Part, line: usize, col: usize) -> (usize, usize) {
        match part {
            // The subject is one front-matter line; past quotes, its
            // characters are the file's (escapes in "…" aside).
            Part::Subject => (self.subject_line, self.subject_col + col.max(1) - 1),
            Part::Body => (self.body_line + line.max(1) - 1, col),
        }
    }

    fn line(&self, line: usize) -> Option<&str> {
        self.text.lines().nth(line.checked_sub(1)?)
    }

    /// An error at a template position (1-based line, and column if known;
    /// else the line's first non-blank character).
    fn error(&self, part: Part, line: usize, col: Option<usize>, message: String) -> TemplateError {
        let (line, col) = match (col, part) {
            (Some(col), _) => self.locate(part, line, col),
            (None, Part::Subject) => self.locate(part, line, 1),
            (None, Part::Body) => {
                let (line, _) = self.locate(part, line, 1);
                let blank = |l: &str| l.chars().take_while(|c| c.is_whitespace()).count();
                (line, self.line(line).map_or(1, |l| blank(l) + 1))
            }
        };
        err(&self.path, line, col, message)
    }

    fn render_error(&self, diagnostic: TemplateError) -> RenderError {
        let source_line = self.line(diagnostic.line).map(str::to_owned);
        RenderError {
            diagnostic,
            source_line,
        }
    }
}

/// The sources of one template name.
#[derive(Clone, Debug)]
struct Entry {
    txt: Arc<Source>,
    html: Option<Arc<Source>>,
}

/// All templates of a directory, compiled.
pub struct Templates {
    env: Environment<'static>,
    sources: BTreeMap<String, Entry>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The subject entry of the front matter.
struct Subject {
    template: String,
    line: usize,
    /// Column of the template's first character (past an opening quote).
    col: usize,
}

/// Front matter split from a body.
struct Parsed {
    /// The text without a byte-order mark.
    text: String,
    subject: Option<Subject>,
    body: String,
    body_line: usize,
}

fn err(path: &Path, line: usize, col: usize, message: impl Into<String>) -> TemplateError {
    TemplateError {
        path: path.to_owned(),
        line,
        col,
        message: message.into(),
    }
}

/// Splits `---` front matter from the body. Supported keys: `subject`
/// (plain, 'single-quoted' or "double-quoted" scalar).
fn parse_front_matter(path: &Path, text: &str) -> Result<Parsed, TemplateError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or("");
    if first.trim_end() != "---" {
        return Ok(Parsed {
            text: text.to_owned(),
            subject: None,
            body: text.to_owned(),
            body_line: 1,
        });
    }
    let mut subject = None;
    let mut line_no = 1;
    let mut closed = false;
    for line in lines.by_ref() {
        line_no += 1;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.trim_end() == "---" {
            closed = true;
            break;
        }
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        let Some((key, value)) = l.split_once(':') else {
            return Err(err(
                path,
                line_no,
                1,
                "front matter lines look like `subject: …`",
            ));
        };
        match key.trim() {
            "subject" => {
                let leading = value.len() - value.trim_start().len();
                let value_col = key.chars().count() + 1 + value[..leading].chars().count() + 1;
                let value = value.trim();
                let col = value_col + usize::from(value.starts_with(['"', '\'']));
                subject = Some(Subject {
                    template: parse_scalar(value, path, line_no, value_col)?,
                    line: line_no,
                    col,
                });
            }
            other => {
                return Err(err(
                    path,
                    line_no,
                    1,
                    format!("unknown front matter key {other:?}; only `subject` is supported"),
                ));
            }
        }
    }
    if !closed {
        return Err(err(
            path,
            1,
            1,
            "front matter opened with `---` is never closed",
        ));
    }
    Ok(Parsed {
        text: text.to_owned(),
        subject,
        body: lines.collect(),
        body_line: line_no + 1,
    })
}

fn parse_scalar(v: &str, path: &Path, line: usize, col: usize) -> Result<String, TemplateError> {
    if let Some(inner) = v.strip_prefix('"') {
        serde_json::from_str::<String>(v)
            .or_else(|_| inner.strip_suffix('"').map(str::to_owned).ok_or(()))
            .map_err(|_| err(path, line, col, "unterminated double-quoted subject"))
    } else if let Some(inner) = v.strip_prefix('\'') {
        inner
            .strip_suffix('\'')
            .map(|s| s.replace("''", "'"))
            .ok_or_else(|| err(path, line, col, "unterminated single-quoted subject"))
    } else {
        Ok(v.to_owned())
    }
}

/// Locates a MiniJinja error (a syntax error at load, or a failure while
/// rendering) in the file; `template` is the part's template source, to turn
/// the error's byte range into a column.
fn minijinja_error(
    e: &minijinja::Error,
    src: &Source,
    part: Part,
    template: &str,
) -> TemplateError {
    let col = e
        .range()
        .and_then(|r| template.get(..r.start))
        .map(|before| before.chars().rev().take_while(|&c| c != '\n').count() + 1);
    let message = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    src.error(part, e.line().unwrap_or(1), col, message)
}

/// Filter or test: MiniJinja keeps them apart.
#[derive(Clone, Copy)]
enum Callable {
    Filter,
    Test,
}

impl Callable {
    fn word(self) -> &'static str {
        match self {
            Callable::Filter => "filter",
            Callable::Test => "test",
        }
    }
}

/// The filter and test names known to an environment, for suggestions.
struct Known {
    filters: Vec<String>,
    tests: Vec<String>,
}

impl Known {
    fn of(env: &Environment<'_>) -> Self {
        let names = |kind: Callable, builtin: &[&str]| {
            builtin
                .iter()
                .filter(|n| registered(env, kind, n))
                .map(|n| (*n).to_owned())
                .collect()
        };
        Self {
            filters: names(Callable::Filter, BUILTIN_FILTERS),
            tests: names(Callable::Test, BUILTIN_TESTS),
        }
    }
}

/// Whether `env` has the filter or test `name`, asked the way a template
/// asks (`'upper' is filter`), so filters engaged registers count too.
fn registered(env: &Environment<'_>, kind: Callable, name: &str) -> bool {
    let expr = match kind {
        Callable::Filter => "name is filter",
        Callable::Test => "name is test",
    };
    env.compile_expression(expr)
        .and_then(|e| e.eval(minijinja::context! { name }))
        .is_ok_and(|v| v.is_true())
}

/// Filters and tests a compiled template uses that `env` does not have,
/// located in the file. Walks the compiled instructions (the root and every
/// block), where each `|name` and `is name` is one instruction with a span.
fn unknown_filters_and_tests(
    env: &Environment<'static>,
    key: &str,
    src: &Source,
    part: Part,
    known: &Known,
) -> Vec<TemplateError> {
    let Ok(template) = env.get_template(key) else {
        return Vec::new();
    };
    let compiled = minijinja::machinery::get_compiled_template(&template);
    let mut errors: Vec<TemplateError> = Vec::new();
    for instructions in std::iter::once(&compiled.instructions).chain(compiled.blocks.values()) {
        let mut idx = 0;
        while let Some(instruction) = instructions.get(idx) {
            let at = idx;
            idx += 1;
            let (kind, name) = match instruction {
                Instruction::ApplyFilter(name, ..) => (Callable::Filter, *name),
                Instruction::PerformTest(name, ..) => (Callable::Test, *name),
                _ => continue,
            };
            // MiniJinja looks names up without whitespace (`a . b`).
            let name: String = name.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            if registered(env, kind, &name) {
                continue;
            }
            let (line, col) = match instructions.get_span(at) {
                Some(span) => (
                    usize::from(span.start_line),
                    Some(usize::from(span.start_col) + 1),
                ),
                // No span when the expression spans lines: MiniJinja knows
                // the line it starts on; find the name from there.
                None => {
                    let line = instructions.get_line(at).unwrap_or(1);
                    match find_use(template.source(), line, &name) {
                        Some((line, col)) => (line, Some(col)),
                        None => (line, None),
                    }
                }
            };
            let word = kind.word();
            let candidates = match kind {
                Callable::Filter => &known.filters,
                Callable::Test => &known.tests,
            };
            let message = match crate::engine::nearest(&name, candidates.iter()) {
                Some(n) => format!("unknown {word} {name:?}; did you mean {n:?}?"),
                None => format!(
                    "unknown {word} {name:?}; see https://docs.rs/minijinja/latest/minijinja/{word}s/"
                ),
            };
            let e = src.error(part, line, col, message);
            if !errors.contains(&e) {
                errors.push(e);
            }
        }
    }
    errors
}

/// Where `name` is used as a filter or test at or after `line` of `source`:
/// its first occurrence after `|`, `is`, `not` or `filter` (1-based line and
/// column).
fn find_use(source: &str, line: usize, name: &str) -> Option<(usize, usize)> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let ends_with_word = |text: &str, word: &str| {
        text.strip_suffix(word)
            .is_some_and(|rest| !rest.ends_with(ident))
    };
    let start: usize = source
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let mut from = start;
    while let Some(i) = source.get(from..)?.find(name) {
        let at = from + i;
        from = at + name.len();
        let before = source[..at].trim_end();
        let used = before.ends_with('|')
            || ["is", "not", "filter"]
                .iter()
                .any(|w| ends_with_word(before, w));
        if used && !source[from..].starts_with(ident) {
            let line = source[..at].matches('\n').count() + 1;
            let col = source[..at]
                .chars()
                .rev()
                .take_while(|&c| c != '\n')
                .count()
                + 1;
            return Some((line, col));
        }
    }
    None
}

impl Templates {
    /// Loads and compiles every template in `dir`. Templates with errors are
    /// left out and reported; the others are usable.
    pub fn load(dir: &Path) -> (Self, Vec<TemplateError>) {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(RENDER_FUEL));
        // Emails are line-oriented: keep the final newline, and let block
        // tags (`{% if %}` on a line of their own) leave no blank lines.
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        // After any filters and tests of our own are registered: existence
        // is asked of the environment, suggestions come from the built-ins.
        let known = Known::of(&env);
        let mut sources = BTreeMap::new();
        let mut errors = Vec::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) => {
                errors.push(err(
                    dir,
                    0,
                    0,
                    format!("cannot read the templates directory: {e}"),
                ));
                Vec::new()
            }
        };
        files.sort();
        let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned());
        for txt in files
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        {
            let Some(name) = stem(txt) else { continue };
            let html = txt.with_extension("html");
            match load_one(
                &mut env,
                &known,
                &name,
                txt,
                html.exists().then_some(html.as_path()),
            ) {
                Ok(entry) => {
                    sources.insert(name, entry);
                }
                Err(e) => errors.extend(e),
            }
        }
        for html in files
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "html"))
        {
            if !html.with_extension("txt").exists() {
                errors.push(err(
                    html,
                    1,
                    1,
                    "an .html template needs a .txt template of the same name (the plain-text part and the subject)",
                ));
            }
        }
        (Self { env, sources }, errors)
    }

    /// Template names (file stems).
    pub fn names(&self) -> HashSet<String> {
        self.sources.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }

    /// The file and part a MiniJinja template name (`NAME.subject`,
    /// `NAME.txt`, `NAME.html`) was made from.
    fn part_of(&self, key: &str) -> Option<(&Source, Part)> {
        let (name, suffix) = key.rsplit_once('.')?;
        let entry = self.sources.get(name)?;
        match suffix {
            "subject" => Some((&entry.txt, Part::Subject)),
            "txt" => Some((&entry.txt, Part::Body)),
            "html" => Some((entry.html.as_deref()?, Part::Body)),
            _ => None,
        }
    }

    /// Renders `name` with `context` (a JSON object).
    pub fn render(&self, name: &str, context: &Value) -> Result<RenderedEmail, RenderError> {
        let entry = self.sources.get(name).ok_or_else(|| RenderError {
            diagnostic: err(
                Path::new(&format!("templates/{name}.txt")),
                0,
                0,
                "template not found",
            ),
            source_line: None,
        })?;
        let ctx = minijinja::Value::from(minijinja::value::Serde(context));
        let render = |key: String, src: &Source, part: Part| -> Result<String, RenderError> {
            let t = self
                .env
                .get_template(&key)
                .map_err(|e| src.render_error(minijinja_error(&e, src, part, "")))?;
            let out = t.render(ctx.clone()).map_err(|e| {
                // An error raised inside another template (an include) is
                // located there.
                let elsewhere = e
                    .name()
                    .filter(|n| *n != key)
                    .and_then(|n| Some((self.part_of(n)?, self.env.get_template(n).ok()?)));
                let (src, part, source) = match &elsewhere {
                    Some(((src, part), other)) => (*src, *part, other.source()),
                    None => (src, part, t.source()),
                };
                let mut err = minijinja_error(&e, src, part, source);
                if e.kind() == minijinja::ErrorKind::UndefinedError {
                    err.message.push_str(&available_names(context));
                }
                src.render_error(err)
            })?;
            if out.len() > MAX_RENDERED_BYTES {
                return Err(src.render_error(src.error(
                    part,
                    1,
                    None,
                    "rendered output is larger than 1 MiB".into(),
                )));
            }
            Ok(out)
        };
        let subject = render(format!("{name}.subject"), &entry.txt, Part::Subject)?;
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = render(format!("{name}.txt"), &entry.txt, Part::Body)?;
        let html = match &entry.html {
            Some(h) => Some(render(format!("{name}.html"), h, Part::Body)?),
            None => None,
        };
        Ok(RenderedEmail {
            subject,
            text,
            html,
        })
    }
}

/// "; available: customer (id, email, …), unsubscribe_url, …" for an
/// undefined-variable error.
fn available_names(context: &Value) -> String {
    let Value::Object(top) = context else {
        return String::new();
    };
    let names: Vec<String> = top
        .iter()
        .map(|(k, v)| match v {
            Value::Object(inner) if !inner.is_empty() => {
                let keys: Vec<&str> = inner.keys().map(String::as_str).collect();
                format!("{k} ({})", keys.join(", "))
            }
            _ => k.clone(),
        })
        .collect();
    format!("; available: {}", names.join(", "))
}

/// Compiles one template's parts (`NAME.subject`, `NAME.txt`, optional
/// `NAME.html`) and checks their filters and tests; every error found.
fn load_one(
    env: &mut Environment<'static>,
    known: &Known,
    name: &str,
    txt: &Path,
    html: Option<&Path>,
) -> Result<Entry, Vec<TemplateError>> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| vec![err(p, 0, 0, format!("cannot read: {e}"))])
    };
    let parsed = parse_front_matter(txt, &read(txt)?).map_err(|e| vec![e])?;
    let Some(subject) = parsed.subject else {
        return Err(vec![err(
            txt,
            1,
            1,
            "missing front matter with a subject; start the file with `---`, `subject: …`, `---`",
        )]);
    };
    let txt_src = Arc::new(Source {
        path: txt.to_owned(),
        text: parsed.text,
        body_line: parsed.body_line,
        subject_line: subject.line,
        subject_col: subject.col,
    });
    let mut parts = vec![
        (
            format!("{name}.subject"),
            subject.template,
            Arc::clone(&txt_src),
            Part::Subject,
        ),
        (
            format!("{name}.txt"),
            parsed.body,
            Arc::clone(&txt_src),
            Part::Body,
        ),
    ];
    let html_src = match html {
        Some(h) => {
            let p = parse_front_matter(h, &read(h)?).map_err(|e| vec![e])?;
            let src = Arc::new(Source {
                path: h.to_owned(),
                text: p.text,
                body_line: p.body_line,
                subject_line: 1,
                subject_col: 1,
            });
            parts.push((format!("{name}.html"), p.body, Arc::clone(&src), Part::Body));
            Some(src)
        }
        None => None,
    };
    for (key, template, src, part) in &parts {
        env.add_template_owned(key.clone(), template.clone())
            .map_err(|e| vec![minijinja_error(&e, src, *part, template)])?;
    }
    let errors: Vec<TemplateError> = parts
        .iter()
        .flat_map(|(key, _, src, part)| unknown_filters_and_tests(env, key, src, *part, known))
        .collect();
    if errors.is_empty() {
        Ok(Entry {
            txt: txt_src,
            html: html_src,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(d.path().join(name), body).unwrap();
        }
        d
    }

    #[test]
    fn renders_subject_text_and_escaped_html() {
        let d = dir_with(&[
            (
                "hi.txt",
                "---\nsubject: \"Hi {{ customer.name }}!\"\n---\nHello {{ customer.name }}, {{ n }}\n",
            ),
            ("hi.html", "<p>Hello {{ customer.name }}</p>\n"),
        ]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        let r = t
            .render("hi", &json!({"customer": {"name": "<Ana>"}, "n": 3}))
            .unwrap();
        assert_eq!(r.subject, "Hi <Ana>!");
        assert_eq!(r.text, "Hello <Ana>, 3\n");
        assert_eq!(r.html.unwrap(), "<p>Hello &lt;Ana&gt;</p>\n");
    }

    #[test]
    fn an_undefined_variable_is_an_error_with_the_file_line() {
        let d = dir_with(&[("a.txt", "---\nsubject: x\n---\nline one\n{{ nope }}\n")]);
        let (t, _) = Templates::load(d.path());
        let e = t.render("a", &json!({})).unwrap_err();
        assert_eq!(e.diagnostic.line, 5, "{e}");
        assert!(e.to_string().contains("a.txt:5:"), "{e}");
        assert!(e.diagnostic.message.contains("undefined"), "{e}");
        assert!(e.diagnostic.message.contains("available: "), "{e}");
    }

    #[test]
    fn a_render_error_shows_the_template_line_with_a_caret_under_the_column() {
        let d = dir_with(&[(
            "a.txt",
            "---\nsubject: x\n---\nline one\nHi {{ customer.nickname }}!\n",
        )]);
        let (t, _) = Templates::load(d.path());
        let e = t
            .render("a", &json!({"customer": {"first_name": "Ana"}, "n": 1}))
            .unwrap_err();
        assert_eq!((e.diagnostic.line, e.diagnostic.col), (5, 7), "{e}");
        let shown = e.pretty();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 3, "{shown}");
        assert!(lines[0].contains("a.txt:5:7: undefined value"), "{shown}");
        assert!(
            lines[0].ends_with("; available: customer (first_name), n"),
            "the hint stays: {shown}"
        );
        assert_eq!(lines[1], " 5 | Hi {{ customer.nickname }}!");
        assert_eq!(lines[2], "   |       ^");
        // The line is the one that was loaded, even if the file changed since.
        std::fs::write(d.path().join("a.txt"), "changed\n").unwrap();
        assert_eq!(e.pretty(), shown);
    }

    #[test]
    fn an_error_in_the_subject_points_into_the_front_matter_line() {
        let d = dir_with(&[(
            "a.txt",
            "---\n# the subject:\nsubject: \"Hi {{ who }}\"\n---\nbody\n",
        )]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        let e = t.render("a", &json!({})).unwrap_err();
        let shown = e.pretty();
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].contains("a.txt:3:17: undefined value"), "{shown}");
        assert_eq!(lines[1], " 3 | subject: \"Hi {{ who }}\"");
        assert_eq!(lines[2], "   |                 ^");
    }

    #[test]
    fn a_template_that_runs_out_of_fuel_names_its_line() {
        let d = dir_with(&[(
            "loop.txt",
            "---\nsubject: x\n---\nstart\n  {% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}\n",
        )]);
        let (t, _) = Templates::load(d.path());
        let e = t.render("loop", &json!({})).unwrap_err();
        let shown = e.pretty();
        assert!(shown.contains("loop.txt:5:"), "{shown}");
        assert!(shown.contains("fuel"), "{shown}");
        assert!(
            shown.contains("\n 5 |   {% for i in range(100000) %}"),
            "{shown}"
        );
    }

    #[test]
    fn syntax_errors_and_missing_subjects_are_reported_at_load() {
        let d = dir_with(&[
            ("bad.txt", "---\nsubject: x\n---\n{% if %}\n"),
            ("nosubject.txt", "hello\n"),
            ("good.txt", "---\nsubject: 'It''s fine'\n---\nok\n"),
            ("orphan.html", "<p>x</p>"),
        ]);
        let (t, errors) = Templates::load(d.path());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        assert!(text.iter().any(|e| e.contains("bad.txt:4:")), "{text:?}");
        assert!(
            text.iter().any(|e| e.contains("nosubject.txt:1:1")),
            "{text:?}"
        );
        assert!(text.iter().any(|e| e.contains("orphan.html")), "{text:?}");
        assert_eq!(t.render("good", &json!({})).unwrap().subject, "It's fine");
    }

    #[test]
    fn unknown_filters_and_tests_are_load_errors_with_the_nearest_name() {
        let d = dir_with(&[
            (
                "a.txt",
                "---\nsubject: \"{{ customer.name | titel }}\"\n---\nHi {{ customer.name | uper }},\n{% if n is evn %}even{% endif %}\n{% filter lowr %}X{% endfilter %}\n{{ n | frobnicate }}\n",
            ),
            ("a.html", "<p>{{ n is not odd }} {{ n | abss }}</p>\n"),
            ("ok.txt", "---\nsubject: ok\n---\nfine\n"),
        ]);
        let (t, errors) = Templates::load(d.path());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let at = |suffix: &str| text.iter().any(|e| e.ends_with(suffix));
        assert!(
            at("a.txt:2:30: unknown filter \"titel\"; did you mean \"title\"?"),
            "{text:#?}"
        );
        assert!(
            at("a.txt:4:23: unknown filter \"uper\"; did you mean \"upper\"?"),
            "{text:#?}"
        );
        assert!(
            at("a.txt:5:12: unknown test \"evn\"; did you mean \"even\"?"),
            "{text:#?}"
        );
        assert!(
            at("a.txt:6:11: unknown filter \"lowr\"; did you mean \"lower\"?"),
            "{text:#?}"
        );
        assert!(
            at(
                "a.txt:7:8: unknown filter \"frobnicate\"; see https://docs.rs/minijinja/latest/minijinja/filters/"
            ),
            "{text:#?}"
        );
        assert!(
            at("a.html:1:30: unknown filter \"abss\"; did you mean \"abs\"?"),
            "{text:#?}"
        );
        assert_eq!(errors.len(), 6, "`is not odd` is fine: {text:#?}");
        // The caret form, as `engaged check` prints it.
        let uper = errors.iter().find(|e| e.message.contains("uper")).unwrap();
        let shown = uper.pretty();
        assert!(
            shown.ends_with(" 4 | Hi {{ customer.name | uper }},\n   |                       ^"),
            "{shown}"
        );
        // Like a syntax error, the template is left out; the others work.
        assert!(!t.contains("a"));
        assert!(t.contains("ok"));
    }

    #[test]
    fn real_filters_and_tests_and_look_alikes_in_strings_are_fine() {
        let d = dir_with(&[(
            "a.txt",
            "---\nsubject: \"{{ customer.name | default('x') | title }}\"\n---\n{{ xs | join(', ') | upper }} {{ '| uper' }} {{ \"is evn\" }}\n{% if n is even and n is not none and xs is sequence %}{{ n | abs }}/{{ xs | length }}{% endif %}\n{% for x in xs if x is string %}{{ x | e }}{% endfor %}\n{% set y | trim %} y {% endset %}{{ y | replace('y', 'z') }}\n{% if missing is not defined %}ok{% endif %}\n",
        )]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        let r = t
            .render(
                "a",
                &json!({"customer": {"name": "ana"}, "xs": ["a", "b"], "n": -2}),
            )
            .unwrap();
        assert_eq!(r.subject, "Ana");
        // (A block tag at the end of a line takes its newline: trim_blocks.)
        assert_eq!(r.text, "A, B | uper is evn\n2/2abz\nok");
    }

    #[test]
    fn a_filter_engaged_registers_is_known() {
        let mut env = Environment::new();
        env.add_filter("shout", |s: String| s.to_uppercase());
        env.add_template_owned("t", "{{ 'a' | shout }} {{ 'a' | shuot }}")
            .unwrap();
        let src = Source {
            path: "t.txt".into(),
            text: "{{ 'a' | shout }} {{ 'a' | shuot }}".into(),
            body_line: 1,
            subject_line: 1,
            subject_col: 1,
        };
        let errors = unknown_filters_and_tests(&env, "t", &src, Part::Body, &Known::of(&env));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].col, 28, "{errors:?}");
        assert!(errors[0].message.starts_with("unknown filter \"shuot\""));
    }

    #[test]
    fn the_builtin_names_for_suggestions_are_minijinjas() {
        // tojson and urlencode are behind MiniJinja features we leave off.
        let env = Environment::new();
        let known = Known::of(&env);
        let missing: Vec<&&str> = BUILTIN_FILTERS
            .iter()
            .filter(|n| !known.filters.iter().any(|k| k == *n))
            .collect();
        assert_eq!(missing, [&"tojson", &"urlencode"]);
        assert_eq!(known.tests.len(), BUILTIN_TESTS.len());
    }

    #[test]
    fn a_filter_on_a_continuation_line_is_found_there() {
        let d = dir_with(&[(
            "m.txt",
            "---\nsubject: x\n---\n{{ uper\n     | uper }}\n{% if x\n  is not evn %}{% endif %}\n",
        )]);
        let (_, errors) = Templates::load(d.path());
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text[0].ends_with("m.txt:5:8: unknown filter \"uper\"; did you mean \"upper\"?"),
            "{text:#?}"
        );
        assert!(
            text[1].ends_with("m.txt:7:10: unknown test \"evn\"; did you mean \"even\"?"),
            "{text:#?}"
        );
    }
}
