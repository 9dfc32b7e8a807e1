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

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// Fuel for one render (MiniJinja instructions); generous for real emails.
const RENDER_FUEL: u64 = 500_000;
/// Largest rendered body we send.
const MAX_RENDERED_BYTES: usize = 1024 * 1024;

/// A located template error: `FILE:LINE:COL: message`.
pub type TemplateError = crate::diagnostic::Diagnostic;

/// A rendered email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

/// Where each part of a template came from, to locate errors.
#[derive(Clone, Debug)]
struct Source {
    path: PathBuf,
    /// File line of the first body line (after front matter).
    body_line: usize,
    /// File line of the `subject:` entry.
    subject_line: usize,
}

/// All templates of a directory, compiled.
pub struct Templates {
    env: Environment<'static>,
    /// name → (txt source, optional html source)
    sources: BTreeMap<String, (Source, Option<Source>)>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Front matter split from a body.
struct Parsed {
    subject: Option<(String, usize)>,
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
                let col = key.len() + 2;
                subject = Some((parse_scalar(value.trim(), path, line_no, col)?, line_no));
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

fn minijinja_error(
    e: &minijinja::Error,
    src: &Source,
    text: Option<&str>,
    in_subject: bool,
) -> TemplateError {
    let (line, col) = if in_subject {
        (src.subject_line, 10)
    } else {
        let line = e.line().map_or(src.body_line, |l| src.body_line + l - 1);
        let col = match (e.range(), text) {
            (Some(r), Some(t)) if r.start <= t.len() => {
                let before = &t[..r.start];
                before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1
            }
            _ => 1,
        };
        (line, col)
    };
    let message = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    err(&src.path, line, col, message)
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
                &name,
                txt,
                html.exists().then_some(html.as_path()),
            ) {
                Ok(entry) => {
                    sources.insert(name, entry);
                }
                Err(e) => errors.push(e),
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

    /// Renders `name` with `context` (a JSON object).
    pub fn render(&self, name: &str, context: &Value) -> Result<RenderedEmail, TemplateError> {
        let (txt, html) = self.sources.get(name).ok_or_else(|| {
            err(
                Path::new(&format!("templates/{name}.txt")),
                0,
                0,
                "template not found",
            )
        })?;
        let ctx = minijinja::Value::from(minijinja::value::Serde(context));
        let render = |key: String, src: &Source, subject: bool| -> Result<String, TemplateError> {
            let t = self
                .env
                .get_template(&key)
                .map_err(|e| minijinja_error(&e, src, None, subject))?;
            let out = t.render(ctx.clone()).map_err(|e| {
                let mut err = minijinja_error(&e, src, Some(t.source()), subject);
                if e.kind() == minijinja::ErrorKind::UndefinedError {
                    err.message.push_str(&available_names(context));
                }
                err
            })?;
            if out.len() > MAX_RENDERED_BYTES {
                return Err(err(
                    &src.path,
                    src.body_line,
                    1,
                    "rendered output is larger than 1 MiB",
                ));
            }
            Ok(out)
        };
        let subject = render(format!("{name}.subject"), txt, true)?;
        let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = render(format!("{name}.txt"), txt, false)?;
        let html = match html {
            Some(h) => Some(render(format!("{name}.html"), h, false)?),
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

fn load_one(
    env: &mut Environment<'static>,
    name: &str,
    txt: &Path,
    html: Option<&Path>,
) -> Result<(Source, Option<Source>), TemplateError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| err(p, 0, 0, format!("cannot read: {e}")))
    };
    let parsed = parse_front_matter(txt, &read(txt)?)?;
    let Some((subject, subject_line)) = parsed.subject else {
        return Err(err(
            txt,
            1,
            1,
            "missing front matter with a subject; start the file with `---`, `subject: …`, `---`",
        ));
    };
    let txt_src = Source {
        path: txt.to_owned(),
        body_line: parsed.body_line,
        subject_line,
    };
    env.add_template_owned(format!("{name}.subject"), subject)
        .map_err(|e| minijinja_error(&e, &txt_src, None, true))?;
    env.add_template_owned(format!("{name}.txt"), parsed.body.clone())
        .map_err(|e| minijinja_error(&e, &txt_src, Some(&parsed.body), false))?;
    let html_src = match html {
        Some(h) => {
            let p = parse_front_matter(h, &read(h)?)?;
            let src = Source {
                path: h.to_owned(),
                body_line: p.body_line,
                subject_line: 1,
            };
            env.add_template_owned(format!("{name}.html"), p.body.clone())
                .map_err(|e| minijinja_error(&e, &src, Some(&p.body), false))?;
            Some(src)
        }
        None => None,
    };
    Ok((txt_src, html_src))
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
        assert_eq!(e.line, 5, "{e}");
        assert!(e.to_string().contains("a.txt:5:"), "{e}");
        assert!(e.message.contains("undefined"), "{e}");
        assert!(e.message.contains("available: "), "{e}");
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
    fn a_template_that_loops_forever_runs_out_of_fuel() {
        let d = dir_with(&[(
            "loop.txt",
            "---\nsubject: x\n---\n{% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}\n",
        )]);
        let (t, errors) = Templates::load(d.path());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(t.render("loop", &json!({})).is_err());
    }
}
