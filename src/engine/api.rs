//! The functions rules call. Each reads the current evaluation context
//! (see `super::with_context`) and either answers a question about the
//! customer or records a planned action. No I/O happens here.

use std::collections::HashSet;

use rhai::{Dynamic, Engine, EvalAltResult, Map};

use super::value::{ShapeError, Timestamp, dynamic_to_json, json_to_dynamic};
use super::with_context;
use crate::plan::ActionRequest;

type Fallible<T> = Result<T, Box<EvalAltResult>>;

fn show(v: Option<i64>) -> String {
    v.map_or_else(|| "()".to_owned(), |n| n.to_string())
}

fn opt_int(v: Option<i64>) -> Dynamic {
    v.map_or(Dynamic::UNIT, Dynamic::from_int)
}

pub(super) fn register(engine: &mut Engine, known: super::Known) {
    let super::Known {
        templates,
        webhooks,
    } = known;
    engine.register_fn("days_since_signup", || {
        with_context(|c| {
            let v = c.facts.days_since_signup();
            c.read(|| format!("days_since_signup() = {}", show(v)));
            Ok(opt_int(v))
        })
    });
    engine.register_fn("count", |event: &str| {
        with_context(|c| {
            let v = c.facts.count(event);
            c.read(|| format!("count({event:?}) = {v}"));
            Ok(v)
        })
    });
    engine.register_fn("count", |event: &str, days: i64| {
        with_context(|c| {
            let v = c.facts.count_within(event, days);
            c.read(|| format!("count({event:?}, {days}) = {v}"));
            Ok(v)
        })
    });
    engine.register_fn("last", |event: &str| {
        with_context(|c| {
            let found = c.facts.last(event).cloned();
            c.read(|| match &found {
                Some(o) => format!(
                    "last({event:?}) = at {} with {}",
                    Timestamp(o.at).rfc3339(),
                    o.properties
                ),
                None => format!("last({event:?}) = ()"),
            });
            Ok(found.map_or(Dynamic::UNIT, |o| {
                let mut m = Map::new();
                m.insert("name".into(), Dynamic::from(event.to_owned()));
                m.insert("at".into(), Dynamic::from(Timestamp(o.at)));
                m.insert("properties".into(), json_to_dynamic(&o.properties));
                Dynamic::from_map(m)
            }))
        })
    });
    engine.register_fn("days_since", |event: &str| {
        with_context(|c| {
            let v = c.facts.days_since(event);
            c.read(|| format!("days_since({event:?}) = {}", show(v)));
            Ok(opt_int(v))
        })
    });
    engine.register_fn("sum", |event: &str, property: &str| {
        with_context(|c| {
            let v = c.facts.sum(event, property);
            c.read(|| format!("sum({event:?}, {property:?}) = {v}"));
            Ok(v)
        })
    });
    engine.register_fn("has_tag", |name: &str| {
        with_context(|c| {
            let v = c.facts.tags.iter().any(|t| t == name);
            c.read(|| format!("has_tag({name:?}) = {v}"));
            Ok(v)
        })
    });

    let known = templates.clone();
    engine.register_fn("send_email", move |template: &str| {
        send_email(known.as_deref(), template, Map::new())
    });
    let known = templates;
    engine.register_fn("send_email", move |template: &str, vars: Map| {
        send_email(known.as_deref(), template, vars)
    });
    engine.register_fn("escalate", |reason: &str| {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err("escalate(reason) needs a non-empty reason".into());
        }
        with_context(|c| {
            c.planned.push(ActionRequest::Escalate {
                reason: reason.to_owned(),
            });
            Ok(())
        })
    });
    // Rhai's core has `tag(value)` (a value's internal tag): a rule calling
    // tag() with a non-string (a missing trait, a number) would silently get
    // that instead of an error.
    engine.register_fn("tag", |name: Dynamic| -> Fallible<()> {
        Err(format!(
            "tag(name) needs a string name, got {} ({name})",
            name.type_name()
        )
        .into())
    });
    engine.register_fn("tag", |name: &str| {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err("tag(name) needs a name of 1 to 100 characters".into());
        }
        with_context(|c| {
            c.planned.push(ActionRequest::Tag {
                name: name.to_owned(),
            });
            Ok(())
        })
    });
    engine.register_fn("webhook", move |name: &str, payload: Dynamic| {
        if let Some(known) = &webhooks
            && !known.contains(name)
        {
            let mut names: Vec<&str> = known.iter().map(String::as_str).collect();
            names.sort_unstable();
            return Err(format!(
                "webhook: no [webhooks.{name}] in the config; configured: {}",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            )
            .into());
        }
        let payload = dynamic_to_json(&payload).map_err(|e| too_nested("webhook payload", e))?;
        with_context(|c| {
            c.planned.push(ActionRequest::Webhook {
                name: name.to_owned(),
                payload,
            });
            Ok(())
        })
    });
}

/// The error for a payload that cannot become JSON.
fn too_nested(what: &str, e: ShapeError) -> Box<EvalAltResult> {
    format!("{what}: {e}; send flat data").into()
}

fn send_email(known: Option<&HashSet<String>>, template: &str, vars: Map) -> Fallible<()> {
    if let Some(known) = known
        && !known.contains(template)
    {
        let mut names: Vec<&String> = known.iter().collect();
        names.sort();
        return Err(format!(
            "send_email: no template named {template:?} (templates/{template}.txt); known: {}",
            names
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into());
    }
    let vars =
        dynamic_to_json(&Dynamic::from_map(vars)).map_err(|e| too_nested("send_email vars", e))?;
    let vars = match vars {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let key = match vars.get("key") {
        None | Some(serde_json::Value::Null) => template.to_owned(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    with_context(|c| {
        c.planned.push(ActionRequest::Email {
            template: template.to_owned(),
            key,
            vars,
        });
        Ok(())
    })
}
