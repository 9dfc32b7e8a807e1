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
//!
//! Lists are built eagerly and bounded (`MAX_LIST_ITEMS`): MiniJinja 3.1
//! joins lists with `+` and repeats them with `*` lazily and charges no fuel
//! for that, so a loop doubling a list forty times made 2^40 items out of
//! nothing, and at the 33rd nesting MiniJinja flattens them itself inside one
//! instruction, unfuelled: the render never ended and memory grew without
//! bound. Each render therefore runs a copy of the compiled template whose
//! `+` and `*` call [`guarded_add`] and [`guarded_mul`] (see [`guarded`]),
//! and the `chain` filter is replaced the same way.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::machinery::{Instruction, Instructions};
use minijinja::value::{Rest, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State, UndefinedBehavior};
use serde_json::Value;

/// Fuel for one render (MiniJinja instructions); generous for real emails.
const RENDER_FUEL: u64 = 500_000;
/// Largest rendered body we send.
const MAX_RENDERED_BYTES: usize = 1024 * 1024;
/// Longest list a template may build with `+`, `*` or `|chain`.
const MAX_LIST_ITEMS: usize = 10_000;
/// The functions `+` and `*` are rewritten to call (see [`guarded`]).
const GUARDED_ADD: &str = "__engaged_add";
const GUARDED_MUL: &str = "__engaged_mul";

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

/// Stack of a render thread. MiniJinja drops, prints and compares values
/// by recursion, a few frames per level, and a template can nest lists in a
/// loop (`{% set ns.l = [ns.l] %}`) as deep as its fuel allows (a level
/// costs at least about one and a half fuel: some 300,000 levels). Measured
/// for that worst case: about 40 MB of stack in a release build and 175 MB
/// in a debug build; an 8 MiB stack overflowed and aborted the process. The
/// memory is reserved, not used, until a template nests that deep.
const RENDER_STACK: usize = 256 << 20;

/// The threads renders run on (None if they could not be started; renders
/// then run on the caller's thread).
fn render_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .stack_size(RENDER_STACK)
            .thread_name(|i| format!("engaged-render-{i}"))
            .build()
            .inspect_err(|e| {
                tracing::warn!("could not start the render threads, rendering inline: {e}")
            })
            .ok()
    })
    .as_ref()
}

/// A copy of compiled instructions in which `+` and `*` call the guarded
/// operators. Each instruction is replaced one for one (`Add` pops two
/// values and pushes one, like a call with two arguments), so every jump
/// target and every location stays as it was.
fn guarded<'s>(original: &Instructions<'s>) -> Instructions<'s> {
    let mut copy = Instructions::new(original.name(), original.source());
    let mut idx = 0;
    while let Some(instruction) = original.get(idx) {
        let instruction = match instruction {
            Instruction::Add => Instruction::CallFunction(GUARDED_ADD, Some(2)),
            Instruction::Mul => Instruction::CallFunction(GUARDED_MUL, Some(2)),
            other => other.clone(),
        };
        match (original.get_span(idx), original.get_line(idx)) {
            (Some(span), _) => copy.add_with_span(instruction, span),
            (None, Some(line)) => {
                copy.add_with_line(instruction, u16::try_from(line).unwrap_or(u16::MAX))
            }
            (None, None) => copy.add(instruction),
        };
        idx += 1;
    }
    copy
}

fn is_list(v: &minijinja::Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

fn list_too_long() -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "a list would grow past {MAX_LIST_ITEMS} items (lists joined with `+`, repeated with `*` or chained); emails need far fewer"
        ),
    )
}

/// The items of `parts`, one after another, as one list of at most
/// `MAX_LIST_ITEMS` items.
fn bounded_list<'a>(
    parts: impl IntoIterator<Item = (&'a minijinja::Value, usize)>,
) -> Result<minijinja::Value, minijinja::Error> {
    let mut items = Vec::new();
    for (part, times) in parts {
        if part
            .len()
            .is_some_and(|n| n.saturating_mul(times) > MAX_LIST_ITEMS)
        {
            return Err(list_too_long());
        }
        for _ in 0..times {
            for item in part.try_iter()? {
                if items.len() == MAX_LIST_ITEMS {
                    return Err(list_too_long());
                }
                items.push(item);
            }
        }
    }
    Ok(minijinja::Value::from(items))
}

/// MiniJinja's own `a OP b`, for everything but lists.
fn plain_op(
    state: &State,
    op: &str,
    a: minijinja::Value,
    b: minijinja::Value,
) -> Result<minijinja::Value, minijinja::Error> {
    // Like MiniJinja's `+` in an auto-escaped template: a plain string
    // joined to a safe one is escaped.
    if op == "+"
        && a.kind() == ValueKind::String
        && b.kind() == ValueKind::String
        && a.is_safe() != b.is_safe()
        && matches!(state.auto_escape(), AutoEscape::Html)
    {
        let part = |v: &minijinja::Value| {
            let s = v.as_str().unwrap_or_default();
            if v.is_safe() {
                s.to_owned()
            } else {
                minijinja::HtmlEscape(s).to_string()
            }
        };
        return Ok(minijinja::Value::from_safe_string(
            part(&a) + part(&b).as_str(),
        ));
    }
    state
        .env()
        .compile_expression(&format!("a {op} b"))?
        .eval(minijinja::context! { a, b })
}

/// `a + b`: lists are joined eagerly, up to `MAX_LIST_ITEMS`.
fn guarded_add(
    state: &State,
    a: minijinja::Value,
    b: minijinja::Value,
) -> Result<minijinja::Value, minijinja::Error> {
    if is_list(&a) && is_list(&b) {
        bounded_list([(&a, 1), (&b, 1)])
    } else {
        plain_op(state, "+", a, b)
    }
}

/// `a * b`: a list repeated eagerly, up to `MAX_LIST_ITEMS`.
fn guarded_mul(
    state: &State,
    a: minijinja::Value,
    b: minijinja::Value,
) -> Result<minijinja::Value, minijinja::Error> {
    let (list, times) = match (is_list(&a), is_list(&b)) {
        (true, false) => (&a, &b),
        (false, true) => (&b, &a),
        _ => return plain_op(state, "*", a, b),
    };
    match times.as_usize() {
        Some(n) => bounded_list([(list, n)]),
        None => plain_op(state, "*", a, b),
    }
}

/// `|chain`: like MiniJinja's, but built eagerly and bounded (MiniJinja's
/// chains lazily, and a doubled chain of maps is searched exponentially).
fn chain(
    value: minijinja::Value,
    others: Rest<minijinja::Value>,
) -> Result<minijinja::Value, minijinja::Error> {
    let all: Vec<&minijinja::Value> = std::iter::once(&value).chain(others.iter()).collect();
    if all.iter().all(|v| v.kind() == ValueKind::Map) {
        // Later maps win, as in MiniJinja.
        let mut merged = BTreeMap::new();
        for map in all {
            for key in map.try_iter()? {
                if merged.len() == MAX_LIST_ITEMS && !merged.contains_key(&key) {
                    return Err(list_too_long());
                }
                let item = map.get_item(&key)?;
                merged.insert(key, item);
            }
        }
        Ok(minijinja::Value::from(merged))
    } else {
        bounded_list(all.into_iter().map(|v| (v, 1)))
    }
}

/// Tags that bring in another template, which would render outside the
/// guarded copy (see [`guarded`]); an email is one file.
fn other_templates(
    env: &Environment<'static>,
    key: &str,
    src: &Source,
    part: Part,
) -> Vec<TemplateError> {
    let Ok(template) = env.get_template(key) else {
        return Vec::new();
    };
    let compiled = minijinja::machinery::get_compiled_template(&template);
    let mut errors: Vec<TemplateError> = Vec::new();
    for instructions in std::iter::once(&compiled.instructions).chain(compiled.blocks.values()) {
        let mut idx = 0;
        while let Some(instruction) = instructions.get(idx) {
            if matches!(
                instruction,
                Instruction::Include(..) | Instruction::LoadBlocks
            ) {
                let (line, col) = match instructions.get_span(idx) {
                    Some(span) => (
                        usize::from(span.start_line),
                        Some(usize::from(span.start_col) + 1),
                    ),
                    None => (instructions.get_line(idx).unwrap_or(1), None),
                };
                let e = src.error(
                    part,
                    line,
                    col,
                    "include, import and extends are not supported: an email template is one file"
                        .into(),
                );
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
            idx += 1;
        }
    }
    errors
}

impl Templates {
    /// Loads and compiles every template in `dir`. Templates with errors are
    /// left out and reported; the others are usable.
    pub fn load(dir: &Path) -> (Self, Vec<TemplateError>) {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function(GUARDED_ADD, guarded_add);
        env.add_function(GUARDED_MUL, guarded_mul);
        env.add_filter("chain", chain);
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

    /// Renders `name` with `context` (a JSON object), on a render thread
    /// (see [`render_pool`]).
    pub fn render(&self, name: &str, context: &Value) -> Result<RenderedEmail, RenderError> {
        match render_pool() {
            Some(pool) => pool.install(|| self.render_here(name, context)),
            None => self.render_here(name, context),
        }
    }

    fn render_here(&self, name: &str, context: &Value) -> Result<RenderedEmail, RenderError> {
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
            let compiled = minijinja::machinery::get_compiled_template(&t);
            let instructions = guarded(&compiled.instructions);
            let blocks: BTreeMap<&str, Instructions<'_>> = compiled
                .blocks
                .iter()
                .map(|(name, block)| (*name, guarded(block)))
                .collect();
            let mut out = String::with_capacity(compiled.buffer_size_hint);
            minijinja::machinery::eval(
                &self.env,
                &instructions,
                ctx.clone(),
                &blocks,
                &mut minijinja::machinery::make_string_output(&mut out),
                compiled.initial_auto_escape.clone(),
            )
            .map_err(|e| {
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
        .flat_map(|(key, _, src, part)| {
            let mut errors = unknown_filters_and_tests(env, key, src, *part, known);
            errors.extend(other_templates(env, key, src, *part));
            errors
        })
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

    #[test]
    fn a_list_doubled_forty_times_fails_at_the_plus_with_its_line() {
        let d = dir_with(&[(
            "d.txt",
            "---\nsubject: x\n---\nHello\n{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}\n",
        )]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        let e = t.render("d", &json!({})).unwrap_err().to_string();
        assert!(e.contains("d.txt:5:"), "{e}");
        assert!(
            e.contains(&format!("a list would grow past {MAX_LIST_ITEMS} items")),
            "{e}"
        );
    }

    #[test]
    fn repeating_or_chaining_lists_past_the_limit_fails_too() {
        let d = dir_with(&[
            (
                "m.txt",
                "---\nsubject: x\n---\n{{ ([1] * 1000000000000)|length }}\n",
            ),
            (
                "c.txt",
                "---\nsubject: x\n---\n{% set ns = namespace(m={'a': 1}, l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l|chain(ns.l) %}{% endfor %}\n",
            ),
        ]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        for name in ["m", "c"] {
            let e = t.render(name, &json!({})).unwrap_err().to_string();
            assert!(e.contains(&format!("{name}.txt:4:")), "{e}");
            assert!(e.contains("a list would grow past"), "{e}");
        }
    }

    #[test]
    fn plus_and_times_keep_their_meaning_for_numbers_strings_and_small_lists() {
        let d = dir_with(&[
            (
                "ops.txt",
                "---\nsubject: x\n---\n{{ 1 + 2 }} {{ 2 * 3 }} {{ 1.5 + 1 }} {{ 'a' + 'b' }} {{ '-' * 3 }} {{ [1] + [2] }} {{ [0] * 3 }} {{ ([1]|chain([2], [3]))|length }} {{ n + 1 }}\n",
            ),
            ("ops.html", "<p>{{ ('<b>'|safe) + name }}</p>\n"),
        ]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        let r = t.render("ops", &json!({"n": 41, "name": "<Ana>"})).unwrap();
        assert_eq!(r.text, "3 6 2.5 ab --- [1, 2] [0, 0, 0] 3 42\n");
        // A plain string joined to a safe one is escaped, as in MiniJinja.
        assert_eq!(r.html.unwrap(), "<p><b>&lt;Ana&gt;</p>\n");
    }

    #[test]
    fn lists_nested_as_deep_as_fuel_allows_do_not_overflow_the_stack() {
        // Each round wraps the list in 40 more; this runs out of fuel some
        // 300,000 levels deep, and the value is dropped on a render thread.
        let nest = format!("{}ns.l{}", "[".repeat(40), "]".repeat(40));
        let d = dir_with(&[(
            "n.txt",
            &format!(
                "---\nsubject: x\n---\n{{% set ns = namespace(l=1) %}}{{% for i in range(10000) %}}{{% set ns.l = {nest} %}}{{% endfor %}}\n"
            ),
        )]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        // On a thread with a small stack, as tokio's are.
        let e = std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn_scoped(s, || t.render("n", &json!({})))
                .unwrap()
                .join()
                .unwrap()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("fuel"), "{e}");
    }

    #[test]
    fn include_import_and_extends_are_load_errors() {
        let d = dir_with(&[
            ("a.txt", "---\nsubject: x\n---\nHi\n"),
            ("b.txt", "---\nsubject: x\n---\nHi\n{% include 'a.txt' %}\n"),
            ("c.txt", "---\nsubject: x\n---\n{% extends 'a.txt' %}\n"),
            ("d.txt", "---\nsubject: x\n---\n{% import 'a.txt' as a %}\n"),
        ]);
        let (t, errors) = Templates::load(d.path());
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        for at in ["b.txt:5:4: ", "c.txt:4:", "d.txt:4:4: "] {
            assert!(
                shown.iter().any(|e| e.contains(at)
                    && e.contains("include, import and extends are not supported")),
                "{at} in {shown:?}"
            );
        }
        assert_eq!(t.names(), HashSet::from(["a".to_owned()]));
    }
}
