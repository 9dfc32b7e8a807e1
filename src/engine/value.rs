//! Values crossing between Rust and Rhai: the `Timestamp` type rules see for
//! `now` and event times, JSON ↔ Dynamic, and the `customer` map.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use rhai::{Dynamic, Engine, Map};
use serde_json::Value;

use crate::facts::{Facts, whole_days};

/// A point in time (UTC) as rules see it. Prints as RFC 3339; compares with
/// `<`, `==`…; has `.year .month .day .hour .minute .weekday .unix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn rfc3339(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

pub(super) fn register_timestamp(engine: &mut Engine) {
    engine
        .register_type_with_name::<Timestamp>("Timestamp")
        .register_fn("to_string", |t: &mut Timestamp| t.rfc3339())
        .register_fn("to_debug", |t: &mut Timestamp| t.rfc3339())
        .register_get("year", |t: &mut Timestamp| i64::from(t.0.year()))
        .register_get("month", |t: &mut Timestamp| i64::from(t.0.month()))
        .register_get("day", |t: &mut Timestamp| i64::from(t.0.day()))
        .register_get("hour", |t: &mut Timestamp| i64::from(t.0.hour()))
        .register_get("minute", |t: &mut Timestamp| i64::from(t.0.minute()))
        // ISO weekday: 1 = Monday … 7 = Sunday.
        .register_get("weekday", |t: &mut Timestamp| {
            i64::from(t.0.weekday().number_from_monday())
        })
        .register_get("unix", |t: &mut Timestamp| t.0.timestamp())
        .register_fn("days_between", |a: Timestamp, b: Timestamp| {
            whole_days(a.0, b.0)
        })
        // Whole calendar years from a to b: the anniversaries `add_years`
        // reaches (a 29 February signup's falls on 28 February).
        .register_fn("years_between", |a: Timestamp, b: Timestamp| {
            years_between(a.0, b.0)
        })
        // The same moment `n` calendar years later (or earlier for a
        // negative n); 29 February → 28 February.
        .register_fn(
            "add_years",
            |t: &mut Timestamp, n: i64| -> Result<Timestamp, Box<rhai::EvalAltResult>> {
                add_years(t.0, n).map(Timestamp).ok_or_else(|| {
                    format!("add_years({n}): n must be within -{MAX_YEARS}..={MAX_YEARS} and the result a valid date").into()
                })
            },
        )
        .register_fn("==", |a: Timestamp, b: Timestamp| a == b)
        .register_fn("!=", |a: Timestamp, b: Timestamp| a != b)
        .register_fn("<", |a: Timestamp, b: Timestamp| a < b)
        .register_fn("<=", |a: Timestamp, b: Timestamp| a <= b)
        .register_fn(">", |a: Timestamp, b: Timestamp| a > b)
        .register_fn(">=", |a: Timestamp, b: Timestamp| a >= b);
}

/// The most years `add_years` moves a Timestamp.
const MAX_YEARS: i64 = 1000;

/// `t` moved `n` calendar years (29 February → 28 February in other years).
pub(crate) fn add_years(t: DateTime<Utc>, n: i64) -> Option<DateTime<Utc>> {
    if !(-MAX_YEARS..=MAX_YEARS).contains(&n) {
        return None;
    }
    let months = chrono::Months::new(u32::try_from(n.unsigned_abs() * 12).ok()?);
    if n >= 0 {
        t.checked_add_months(months)
    } else {
        t.checked_sub_months(months)
    }
}

/// Whole calendar years from `a` to `b`: the largest k with
/// `add_years(a, k) <= b`, so it agrees with `add_years` on leap days; 0 when
/// `b` is before the first anniversary (or before `a`).
pub(crate) fn years_between(a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    let mut k = i64::from(b.year() - a.year()).clamp(0, MAX_YEARS);
    while k > 0 && add_years(a, k).is_none_or(|t| t > b) {
        k -= 1;
    }
    k
}

/// JSON → Rhai. Integers within i64 stay integers; other numbers (floats,
/// and integers beyond ±9.2e18, which Rhai cannot hold) become floats.
pub fn json_to_dynamic(v: &Value) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        Value::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect(),
        ),
    }
}

/// How a value breaks the nesting limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Arrays, maps or curried functions inside each other more than
    /// [`MAX_DEPTH`](super::MAX_DEPTH) levels deep.
    #[error(
        "arrays, maps or functions nested more than {} levels deep",
        super::MAX_DEPTH
    )]
    TooDeep,
    /// More than [`MAX_ITEMS`](super::MAX_ITEMS) items counted through every level.
    #[error(
        "more than {} items in all (array items, map entries and curried arguments, counted through every level)",
        super::MAX_ITEMS
    )]
    TooMany,
}

/// Whether `v` can hold other values (and so nest).
fn is_container(v: &Dynamic) -> bool {
    v.is_array() || v.is_map() || v.is_fnptr() || v.is_shared()
}

/// Checks that `v` nests at most `MAX_DEPTH` levels and holds at most
/// `MAX_ITEMS` items in all; returns how many items it holds.
///
/// Rhai clones, drops, compares, prints and size-checks values by
/// recursion, one native stack frame (or several) per level, so a value
/// nested 10,000 deep overflows the stack and aborts the process. Every
/// variable access runs this check (see `build_engine`), so no value a rule
/// can reach grows past the limit by more than what one expression adds.
/// The walk itself recurses at most `MAX_DEPTH` levels.
pub(crate) fn check_shape(v: &Dynamic) -> Result<usize, ShapeError> {
    let mut items = 0;
    if is_container(v) {
        walk(v, super::MAX_DEPTH, &mut items)?;
    }
    Ok(items)
}

fn walk(v: &Dynamic, levels_left: usize, items: &mut usize) -> Result<(), ShapeError> {
    let Some(levels_left) = levels_left.checked_sub(1) else {
        return Err(ShapeError::TooDeep);
    };
    let mut visit = |child: &Dynamic| {
        *items += 1;
        if *items > super::MAX_ITEMS {
            return Err(ShapeError::TooMany);
        }
        if is_container(child) {
            walk(child, levels_left, items)?;
        }
        Ok(())
    };
    if let Ok(a) = v.as_array_ref() {
        a.iter().try_for_each(&mut visit)
    } else if let Ok(m) = v.as_map_ref() {
        m.values().try_for_each(&mut visit)
    } else if let Some(f) = v.read_lock::<rhai::FnPtr>() {
        // Curried arguments are copies held inside the function value.
        f.curry().iter().try_for_each(&mut visit)
    } else if v.is_shared() {
        // Rules cannot make shared values (closures may not capture, see
        // `compile`); should one appear, it counts as a level.
        match v.read_lock::<Dynamic>() {
            Some(inner) => visit(&inner),
            None => Ok(()),
        }
    } else {
        Ok(())
    }
}

/// Rhai → JSON. Timestamps become RFC 3339 strings; anything else unknown
/// becomes its printed form. Fails past `MAX_DEPTH` levels: the JSON is
/// stored and parsed again (serde_json stops at 128 levels), and every
/// consumer of it recurses.
pub fn dynamic_to_json(d: &Dynamic) -> Result<Value, ShapeError> {
    to_json(d, super::MAX_DEPTH)
}

fn to_json(d: &Dynamic, levels_left: usize) -> Result<Value, ShapeError> {
    let inner = |v: &Dynamic| match levels_left.checked_sub(1) {
        Some(left) => to_json(v, left),
        None => Err(ShapeError::TooDeep),
    };
    Ok(if d.is_unit() {
        Value::Null
    } else if let Ok(b) = d.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = d.as_int() {
        Value::from(i)
    } else if let Ok(f) = d.as_float() {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    } else if d.is_string() || d.is_char() {
        Value::String(d.to_string())
    } else if let Ok(a) = d.as_array_ref() {
        Value::Array(a.iter().map(inner).collect::<Result<_, _>>()?)
    } else if let Ok(m) = d.as_map_ref() {
        Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.to_string(), inner(v)?)))
                .collect::<Result<_, _>>()?,
        )
    } else if let Some(t) = d.read_lock::<Timestamp>() {
        Value::String(t.rfc3339())
    } else {
        Value::String(d.to_string())
    })
}

fn opt_string(s: Option<&str>) -> Dynamic {
    s.map_or(Dynamic::UNIT, |s| Dynamic::from(s.to_owned()))
}

/// The `customer` map rules see.
pub(super) fn customer_to_dynamic(facts: &Facts) -> Dynamic {
    let c = &facts.customer;
    let mut m = Map::new();
    m.insert("id".into(), Dynamic::from(c.id.to_string()));
    m.insert(
        "email".into(),
        opt_string(c.email.as_ref().map(|e| e.as_str())),
    );
    m.insert("name".into(), opt_string(c.name.as_deref()));
    m.insert(
        "created_at".into(),
        c.created_at
            .map_or(Dynamic::UNIT, |t| Dynamic::from(Timestamp(t))),
    );
    m.insert("timezone".into(), opt_string(c.timezone.as_deref()));
    m.insert("model".into(), Dynamic::from(c.model.as_str().to_owned()));
    m.insert(
        "owner".into(),
        opt_string(c.owner.as_ref().map(|e| e.as_str())),
    );
    m.insert(
        "traits".into(),
        json_to_dynamic(&Value::Object(c.traits.clone())),
    );
    m.insert(
        "tags".into(),
        Dynamic::from_array(
            facts
                .tags
                .iter()
                .map(|t| Dynamic::from(t.clone()))
                .collect(),
        ),
    );
    Dynamic::from_map(m)
}
