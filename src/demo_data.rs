//! Deterministic (seeded) sample data for `engaged demo`, tests and benchmarks.
//!
//! [`write_sample_data`] writes `customers.csv` and `events.jsonl` into a
//! directory. Events are streamed customer by customer through a `BufWriter`,
//! so only one customer's events are ever held in memory; this keeps the
//! 100k-customer / 1M-event benchmark data set cheap to produce.
//!
//! Each customer gets a persona that shapes its event history so the shipped
//! rules have something to act on:
//!
//! * **thriving** (~40%): onboarding finished in the first week, logins up to
//!   now, many orders (a few "whales" with more than 50), recent promoters;
//! * **stalled** (~15%): signed up 8–30 days ago, onboarding step 1 (maybe 2)
//!   in the first two days, nothing in the last 7 days, never completed;
//! * **churning** (~15%): active in the past, last login 30–120 days ago;
//! * **detractor** (~10%): normal activity plus an NPS of 0–6 in the last 30 days;
//! * **new** (~20%): signed up in the last 3 days (a quarter of them in the
//!   last 24 hours), a login and maybe onboarding step 1.
//!
//! Every persona has a few fixed events; the remaining budget
//! (`customers × events_per_customer` minus the fixed events) is distributed
//! over the logins/orders/feature usage of thriving, churning and detractor
//! customers in proportion to a per-customer weight, so the total number of
//! events matches the requested average (unless the average is smaller than
//! the fixed events alone).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MINUTE: i64 = 60;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSpec {
    /// Number of customers.
    pub customers: usize,
    /// Average number of events per customer.
    pub events_per_customer: usize,
    /// Seed for the random number generator; the same spec gives the same bytes.
    pub seed: u64,
    /// Reference "now": every timestamp lies at or before it.
    pub now: DateTime<Utc>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleFiles {
    /// Path of the customers CSV (`dir/customers.csv`).
    pub customers_csv: PathBuf,
    /// Path of the events file, one Segment `track` message per line (`dir/events.jsonl`).
    pub events_jsonl: PathBuf,
    /// Number of customer rows written (excluding the header).
    pub customers: usize,
    /// Number of event lines written.
    pub events: usize,
}

/// Write `dir/customers.csv` and `dir/events.jsonl` for `spec`, creating `dir`
/// if needed. Output is a pure function of `spec`.
pub fn write_sample_data(spec: &SampleSpec, dir: &Path) -> io::Result<SampleFiles> {
    fs::create_dir_all(dir)?;
    let customers_csv = dir.join("customers.csv");
    let events_jsonl = dir.join("events.jsonl");

    let mut rng = StdRng::seed_from_u64(spec.seed);

    let csv_out = BufWriter::new(File::create(&customers_csv)?);
    let plans = plan_customers(spec, &mut rng, csv_out)?;

    let mut events_out = BufWriter::with_capacity(1 << 16, File::create(&events_jsonl)?);
    let events = write_events(spec, &plans, &mut rng, &mut events_out)?;
    events_out.flush()?;

    Ok(SampleFiles {
        customers_csv,
        events_jsonl,
        customers: plans.len(),
        events,
    })
}

// ---------------------------------------------------------------------------
// Built-in vocabularies
// ---------------------------------------------------------------------------

/// (display name, ASCII slug for the email address)
const FIRST_NAMES: &[(&str, &str)] = &[
    ("Ana", "ana"),
    ("Marko", "marko"),
    ("Luka", "luka"),
    ("Ivana", "ivana"),
    ("Zoë", "zoe"),
    ("Mátyás", "matyas"),
    ("José", "jose"),
    ("Søren", "soren"),
    ("Chloé", "chloe"),
    ("Mei", "mei"),
    ("Hiroshi", "hiroshi"),
    ("Priya", "priya"),
    ("Liam", "liam"),
    ("Olivia", "olivia"),
    ("Noah", "noah"),
    ("Emma", "emma"),
    ("Amara", "amara"),
    ("Kofi", "kofi"),
    ("Lucía", "lucia"),
    ("Sven", "sven"),
    ("Nina", "nina"),
    ("Tomás", "tomas"),
    ("Aiko", "aiko"),
    ("Omar", "omar"),
    ("Sarah", "sarah"),
    ("David", "david"),
];

const LAST_NAMES: &[(&str, &str)] = &[
    ("Horvat", "horvat"),
    ("Kovačić", "kovacic"),
    ("Babić", "babic"),
    ("Smith", "smith"),
    ("Johnson", "johnson"),
    ("Nguyen", "nguyen"),
    ("García", "garcia"),
    ("Müller", "muller"),
    ("Tanaka", "tanaka"),
    ("Novak", "novak"),
    ("O'Brien", "obrien"),
    ("Rossi", "rossi"),
    ("Dubois", "dubois"),
    ("Kim", "kim"),
    ("Silva", "silva"),
    ("Nowak", "nowak"),
    ("Jensen", "jensen"),
    ("Patel", "patel"),
    ("Brown", "brown"),
    ("Wilson", "wilson"),
    ("Szabó", "szabo"),
    ("Okafor", "okafor"),
];

const TIMEZONES: &[&str] = &[
    "Europe/Zagreb",
    "America/New_York",
    "Asia/Tokyo",
    "Europe/London",
    "America/Los_Angeles",
    "Australia/Sydney",
    "UTC",
];

const CSM_OWNERS: &[&str] = &["ana@acme.test", "marko@acme.test", "lea@acme.test"];

const COMPANY_PREFIXES: &[&str] = &[
    "Blue",
    "Northwind",
    "Bright",
    "Copper",
    "Adriatic",
    "Silver",
    "Quiet",
    "Rapid",
    "Maple",
    "Lumen",
    "Harbor",
    "Summit",
    "Velvet",
    "Orbit",
    "Cedar",
    "Kestrel",
];

const COMPANY_SUFFIXES: &[&str] = &[
    "Labs",
    "Logistics",
    "Analytics",
    "Studio",
    "Foods",
    "Robotics",
    "Health",
    "Systems",
    "Outfitters",
    "Media",
    "Works",
    "Bikes",
];

const COMPANY_FORMS: &[&str] = &["", "", " Inc.", " Ltd", " GmbH", " d.o.o."];

const FEATURES: &[&str] = &["reports", "integrations", "api", "automations"];

// ---------------------------------------------------------------------------
// Planning (pass 1): one small record per customer, CSV rows streamed out
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Persona {
    Thriving,
    Stalled,
    Churning,
    Detractor,
    New,
}

/// How a customer's share of the scalable event budget is split.
#[derive(Debug, Clone, Copy)]
struct Mix {
    orders: f64,
    features: f64,
    posts: f64,
}

const MIX_WHALE: Mix = Mix {
    orders: 0.75,
    features: 0.08,
    posts: 0.03,
};
const MIX_LOYAL: Mix = Mix {
    orders: 0.55,
    features: 0.10,
    posts: 0.03,
};
const MIX_REGULAR: Mix = Mix {
    orders: 0.30,
    features: 0.12,
    posts: 0.03,
};
const MIX_CHURNING: Mix = Mix {
    orders: 0.40,
    features: 0.08,
    posts: 0.01,
};
const MIX_DETRACTOR: Mix = Mix {
    orders: 0.25,
    features: 0.10,
    posts: 0.02,
};
const MIX_NONE: Mix = Mix {
    orders: 0.0,
    features: 0.0,
    posts: 0.0,
};

#[derive(Debug, Clone, Copy)]
struct Nps {
    score: u8,
    from: i64,
    to: i64,
}

/// Everything pass 2 needs to generate one customer's events.
#[derive(Debug, Clone)]
struct Plan {
    number: usize,
    persona: Persona,
    /// Signup time (unix seconds).
    created: i64,
    /// End of the customer's activity window (unix seconds, ≤ now).
    end: i64,
    onboarding_steps: u8,
    onboarding_completed: bool,
    fixed_logins: u8,
    nps: Option<Nps>,
    mix: Mix,
    /// Relative share of the scalable event budget (0 = none).
    weight: f64,
}

impl Plan {
    fn fixed_events(&self) -> usize {
        usize::from(self.onboarding_steps)
            + usize::from(self.onboarding_completed)
            + usize::from(self.fixed_logins)
            + usize::from(self.nps.is_some())
    }
}

/// Uniform integer in `lo..=hi` (or `lo` if the range is empty).
fn between(rng: &mut StdRng, lo: i64, hi: i64) -> i64 {
    if hi <= lo {
        lo
    } else {
        rng.random_range(lo..=hi)
    }
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// Decide every customer's persona and shape, streaming the CSV rows to `out`.
fn plan_customers<W: Write>(spec: &SampleSpec, rng: &mut StdRng, out: W) -> io::Result<Vec<Plan>> {
    let now = spec.now.timestamp();
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record([
        "id",
        "email",
        "name",
        "created_at",
        "timezone",
        "model",
        "owner",
        "plan",
        "company",
    ])?;

    let mut plans = Vec::with_capacity(spec.customers);
    let mut thriving_seen = 0usize;
    let mut ts_buf = String::with_capacity(20);
    for number in 1..=spec.customers {
        let plan = plan_one(rng, number, now, &mut thriving_seen);

        let (first, first_slug) = *pick(rng, FIRST_NAMES);
        let (last, last_slug) = *pick(rng, LAST_NAMES);
        let id = customer_id(number);
        let email = format!("{first_slug}.{last_slug}.{number}@example.com");
        let name = format!("{first} {last}");
        ts_buf.clear();
        push_timestamp(&mut ts_buf, plan.created);
        let timezone = *pick(rng, TIMEZONES);

        let roll: f64 = rng.random();
        let (model, owner) = if roll < 0.60 {
            ("low-touch", "")
        } else if roll < 0.85 {
            let owner = if rng.random_bool(0.5) {
                *pick(rng, CSM_OWNERS)
            } else {
                ""
            };
            ("hybrid", owner)
        } else {
            ("high-touch", *pick(rng, CSM_OWNERS))
        };
        let p: f64 = rng.random();
        let tier = match model {
            "high-touch" if p < 0.70 => "enterprise",
            "high-touch" => "pro",
            "hybrid" if p < 0.15 => "starter",
            "hybrid" if p < 0.75 => "pro",
            "hybrid" => "enterprise",
            _ if p < 0.65 => "starter",
            _ => "pro",
        };
        let company = format!(
            "{} {}{}",
            pick(rng, COMPANY_PREFIXES),
            pick(rng, COMPANY_SUFFIXES),
            pick(rng, COMPANY_FORMS)
        );

        csv.write_record([
            id.as_str(),
            email.as_str(),
            name.as_str(),
            ts_buf.as_str(),
            timezone,
            model,
            owner,
            tier,
            company.as_str(),
        ])?;
        plans.push(plan);
    }
    csv.flush()?;
    Ok(plans)
}

fn plan_one(rng: &mut StdRng, number: usize, now: i64, thriving_seen: &mut usize) -> Plan {
    let roll: f64 = rng.random();
    let persona = if roll < 0.40 {
        Persona::Thriving
    } else if roll < 0.55 {
        Persona::Stalled
    } else if roll < 0.70 {
        Persona::Churning
    } else if roll < 0.80 {
        Persona::Detractor
    } else {
        Persona::New
    };

    let mut plan = Plan {
        number,
        persona,
        created: now,
        end: now,
        onboarding_steps: 0,
        onboarding_completed: false,
        fixed_logins: 0,
        nps: None,
        mix: MIX_NONE,
        weight: 0.0,
    };

    match persona {
        Persona::Thriving => {
            plan.created = now - between(rng, 15 * DAY, 400 * DAY);
            plan.onboarding_steps = 5;
            plan.onboarding_completed = true;
            plan.fixed_logins = 1; // a login in the last 48 hours
            let n: f64 = rng.random();
            plan.nps = if n < 0.6 {
                Some(Nps {
                    score: rng.random_range(9..=10),
                    from: now - 14 * DAY,
                    to: now,
                })
            } else if n < 0.8 {
                Some(Nps {
                    score: rng.random_range(7..=10),
                    from: plan.created,
                    to: now,
                })
            } else {
                None
            };
            // Every 20th thriving customer is a whale (so even small demos
            // have a few), about a quarter of the rest are loyal regulars.
            let whale = *thriving_seen % 20 == 7;
            *thriving_seen += 1;
            if whale {
                plan.mix = MIX_WHALE;
                plan.weight = rng.random_range(65.0..95.0);
            } else if rng.random_bool(0.25) {
                plan.mix = MIX_LOYAL;
                plan.weight = rng.random_range(10.0..20.0);
            } else {
                plan.mix = MIX_REGULAR;
                plan.weight = rng.random_range(1.0..3.0);
            }
        }
        Persona::Stalled => {
            plan.created = now - between(rng, 8 * DAY, 30 * DAY);
            // Everything happens in the first two days and at least 7 days ago.
            plan.end = (plan.created + 2 * DAY).min(now - 7 * DAY - HOUR);
            plan.onboarding_steps = if rng.random_bool(0.35) { 2 } else { 1 };
            plan.fixed_logins = rng.random_range(1..=3);
        }
        Persona::Churning => {
            plan.created = now - between(rng, 150 * DAY, 400 * DAY);
            plan.end = now - between(rng, 30 * DAY, 120 * DAY);
            set_onboarding(rng, &mut plan, 0.7);
            plan.fixed_logins = 1; // the last login, exactly at `end`
            if rng.random_bool(0.3) {
                plan.nps = Some(Nps {
                    score: rng.random_range(5..=10),
                    from: plan.created,
                    to: plan.end,
                });
            }
            plan.mix = MIX_CHURNING;
            plan.weight = rng.random_range(1.0..4.0);
        }
        Persona::Detractor => {
            plan.created = now - between(rng, 30 * DAY, 400 * DAY);
            set_onboarding(rng, &mut plan, 0.8);
            plan.fixed_logins = 1; // a login in the last 7 days
            plan.nps = Some(Nps {
                score: rng.random_range(0..=6),
                from: now - 30 * DAY,
                to: now,
            });
            plan.mix = MIX_DETRACTOR;
            plan.weight = rng.random_range(1.0..3.0);
        }
        Persona::New => {
            plan.created = if rng.random_bool(0.25) {
                now - between(rng, 0, DAY - MINUTE)
            } else {
                now - between(rng, DAY, 3 * DAY - MINUTE)
            };
            plan.onboarding_steps = u8::from(rng.random_bool(0.6));
            plan.fixed_logins = 1 + u8::from(rng.random_bool(0.3));
        }
    }
    plan
}

fn set_onboarding(rng: &mut StdRng, plan: &mut Plan, p_completed: f64) {
    if rng.random_bool(p_completed) {
        plan.onboarding_steps = 5;
        plan.onboarding_completed = true;
    } else {
        plan.onboarding_steps = rng.random_range(1..=4);
    }
}

fn customer_id(number: usize) -> String {
    format!("cus_{number:05}")
}

// ---------------------------------------------------------------------------
// Events (pass 2): generated and written one customer at a time
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Kind {
    Login,
    OnboardingStep(u8),
    OnboardingCompleted,
    Order(f64),
    Nps(u8),
    Feature(&'static str),
    CommunityPost,
}

fn write_events<W: Write>(
    spec: &SampleSpec,
    plans: &[Plan],
    rng: &mut StdRng,
    out: &mut W,
) -> io::Result<usize> {
    let now = spec.now.timestamp();
    let target = spec.customers.saturating_mul(spec.events_per_customer);
    let fixed: usize = plans.iter().map(Plan::fixed_events).sum();
    let budget = target.saturating_sub(fixed) as f64;
    let total_weight: f64 = plans.iter().map(|p| p.weight).sum();

    let mut events = Vec::new();
    let mut line = String::with_capacity(256);
    let mut written = 0usize;
    let mut cum_weight = 0.0f64;
    let mut allotted = 0usize;

    for plan in plans {
        // Cumulative rounding: the scalable counts sum to exactly `budget`.
        let scalable = if plan.weight > 0.0 && total_weight > 0.0 {
            cum_weight += plan.weight;
            let upto = (budget * (cum_weight / total_weight)).round() as usize;
            let n = upto.saturating_sub(allotted);
            allotted = allotted.max(upto);
            n
        } else {
            0
        };

        events.clear();
        customer_events(rng, plan, now, scalable, &mut events);
        // Stable sort keeps onboarding steps in order when timestamps tie.
        events.sort_by_key(|(ts, _)| *ts);

        let user = customer_id(plan.number);
        let mut order_number = 0u32;
        for &(ts, kind) in &events {
            written += 1;
            line.clear();
            line.push_str(r#"{"type":"track","userId":""#);
            line.push_str(&user);
            line.push_str(r#"","event":""#);
            match kind {
                Kind::Login => line.push_str(r#"login","properties":{}"#),
                Kind::OnboardingStep(step) => {
                    let _ = write!(line, r#"onboarding_step","properties":{{"step":{step}}}"#);
                }
                Kind::OnboardingCompleted => {
                    line.push_str(r#"onboarding_completed","properties":{}"#);
                }
                Kind::Order(total) => {
                    order_number += 1;
                    let _ = write!(
                        line,
                        r#"order_completed","properties":{{"total":{total:.2},"order_number":{order_number}}}"#
                    );
                }
                Kind::Nps(score) => {
                    let _ = write!(line, r#"nps_submitted","properties":{{"score":{score}}}"#);
                }
                Kind::Feature(feature) => {
                    let _ = write!(
                        line,
                        r#"feature_used","properties":{{"feature":"{feature}"}}"#
                    );
                }
                Kind::CommunityPost => line.push_str(r#"community_post","properties":{}"#),
            }
            line.push_str(r#","timestamp":""#);
            push_timestamp(&mut line, ts);
            let _ = writeln!(line, r#"","messageId":"evt-{}-{written}"}}"#, spec.seed);
            out.write_all(line.as_bytes())?;
        }
    }
    Ok(written)
}

/// Push one customer's events (unsorted) into `events`.
fn customer_events(
    rng: &mut StdRng,
    plan: &Plan,
    now: i64,
    scalable: usize,
    events: &mut Vec<(i64, Kind)>,
) {
    let created = plan.created;
    let end = plan.end;

    // Fixed logins, and where onboarding may happen.
    let mut onboarding_from = created;
    let mut onboarding_to = (created + 7 * DAY).min(end);
    match plan.persona {
        Persona::Thriving => {
            events.push((between(rng, (now - 2 * DAY).max(created), now), Kind::Login));
        }
        Persona::Detractor => {
            events.push((between(rng, (now - 7 * DAY).max(created), now), Kind::Login));
        }
        Persona::Churning => events.push((end, Kind::Login)),
        Persona::Stalled => {
            for _ in 0..plan.fixed_logins {
                events.push((between(rng, created, end), Kind::Login));
            }
        }
        Persona::New => {
            let first = between(rng, created, (created + HOUR).min(now));
            events.push((first, Kind::Login));
            for _ in 1..plan.fixed_logins {
                events.push((between(rng, created, now), Kind::Login));
            }
            onboarding_from = first;
            onboarding_to = (first + 2 * HOUR).min(now);
        }
    }

    // Onboarding: steps 1..=n (and completion) in increasing time order.
    let steps = usize::from(plan.onboarding_steps);
    let total = steps + usize::from(plan.onboarding_completed);
    if total > 0 {
        let mut times: Vec<i64> = (0..total)
            .map(|_| between(rng, onboarding_from, onboarding_to))
            .collect();
        times.sort_unstable();
        for (i, ts) in times.into_iter().enumerate() {
            let kind = if i < steps {
                Kind::OnboardingStep(i as u8 + 1)
            } else {
                Kind::OnboardingCompleted
            };
            events.push((ts, kind));
        }
    }

    if let Some(nps) = plan.nps {
        let ts = between(rng, nps.from.max(created), nps.to.min(end));
        events.push((ts, Kind::Nps(nps.score)));
    }

    // Scalable activity spread over the whole activity window.
    if scalable > 0 {
        let orders = ((scalable as f64) * plan.mix.orders).round() as usize;
        let features = ((scalable as f64) * plan.mix.features) as usize;
        let posts = ((scalable as f64) * plan.mix.posts) as usize;
        let orders = orders.min(scalable);
        let features = features.min(scalable - orders);
        let posts = posts.min(scalable - orders - features);
        let logins = scalable - orders - features - posts;
        for _ in 0..orders {
            let mut amount: f64 = rng.random_range(12.0..180.0);
            if rng.random_bool(0.1) {
                amount *= rng.random_range(2.0..5.0);
            }
            events.push((between(rng, created, end), Kind::Order(amount)));
        }
        for _ in 0..features {
            let feature = *pick(rng, FEATURES);
            events.push((between(rng, created, end), Kind::Feature(feature)));
        }
        for _ in 0..posts {
            events.push((between(rng, created, end), Kind::CommunityPost));
        }
        for _ in 0..logins {
            events.push((between(rng, created, end), Kind::Login));
        }
    }
}

/// Append `secs` (unix seconds) as `%Y-%m-%dT%H:%M:%SZ`.
fn push_timestamp(out: &mut String, secs: i64) {
    let dt = DateTime::from_timestamp(secs, 0).unwrap_or_default();
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::collections::{HashMap, HashSet};

    fn spec(customers: usize, events_per_customer: usize, seed: u64) -> SampleSpec {
        SampleSpec {
            customers,
            events_per_customer,
            seed,
            now: Utc.with_ymd_and_hms(2026, 3, 14, 9, 30, 15).unwrap(),
        }
    }

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    struct Customer {
        id: String,
        email: String,
        created: i64,
    }

    fn read_customers(path: &Path) -> Vec<Customer> {
        let mut reader = csv::Reader::from_path(path).unwrap();
        assert_eq!(
            reader.headers().unwrap(),
            vec![
                "id",
                "email",
                "name",
                "created_at",
                "timezone",
                "model",
                "owner",
                "plan",
                "company"
            ]
        );
        reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                Customer {
                    id: r[0].to_string(),
                    email: r[1].to_string(),
                    created: ts(&r[3]),
                }
            })
            .collect()
    }

    fn read_events(path: &Path) -> Vec<serde_json::Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn same_seed_gives_identical_files() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        let fa = write_sample_data(&spec(150, 10, 7), a.path()).unwrap();
        let fb = write_sample_data(&spec(150, 10, 7), b.path()).unwrap();
        let fc = write_sample_data(&spec(150, 10, 8), c.path()).unwrap();
        assert_eq!(
            fs::read(&fa.customers_csv).unwrap(),
            fs::read(&fb.customers_csv).unwrap()
        );
        assert_eq!(
            fs::read(&fa.events_jsonl).unwrap(),
            fs::read(&fb.events_jsonl).unwrap()
        );
        assert_ne!(
            fs::read(&fa.events_jsonl).unwrap(),
            fs::read(&fc.events_jsonl).unwrap()
        );
        assert_eq!((fa.customers, fa.events), (fb.customers, fb.events));
    }

    #[test]
    fn timestamps_lie_between_signup_and_now() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(300, 10, 42);
        let files = write_sample_data(&s, dir.path()).unwrap();
        let now = s.now.timestamp();
        let customers = read_customers(&files.customers_csv);
        assert_eq!(customers.len(), 300);
        let created: HashMap<&str, i64> = customers
            .iter()
            .map(|c| (c.id.as_str(), c.created))
            .collect();
        let mut signed_up_last_day = 0;
        for c in &customers {
            assert!(c.created <= now && c.created >= now - 400 * DAY, "{}", c.id);
            if c.created > now - DAY {
                signed_up_last_day += 1;
            }
        }
        assert!(signed_up_last_day > 0);
        let events = read_events(&files.events_jsonl);
        assert_eq!(events.len(), files.events);
        for e in &events {
            assert_eq!(e["type"], "track");
            let user = e["userId"].as_str().unwrap();
            let t = ts(e["timestamp"].as_str().unwrap());
            assert!(t <= now, "{e}");
            assert!(t >= created[user], "{e}");
        }
    }

    #[test]
    fn event_count_is_close_to_target() {
        for (customers, per) in [(200, 10), (1000, 10), (500, 25)] {
            let dir = tempfile::tempdir().unwrap();
            let files = write_sample_data(&spec(customers, per, 3), dir.path()).unwrap();
            let target = (customers * per) as f64;
            let got = files.events as f64;
            assert!(
                (got - target).abs() <= target * 0.10,
                "{customers}x{per}: {got}"
            );
            let lines = fs::read_to_string(&files.events_jsonl)
                .unwrap()
                .lines()
                .count();
            assert_eq!(lines, files.events);
        }
    }

    #[test]
    fn every_persona_appears_and_behaves() {
        let s = spec(300, 10, 11);
        let mut rng = StdRng::seed_from_u64(s.seed);
        let plans = plan_customers(&s, &mut rng, io::sink()).unwrap();
        let personas: HashSet<Persona> = plans.iter().map(|p| p.persona).collect();
        assert_eq!(personas.len(), 5, "{personas:?}");

        // The same shapes must be visible in the written data.
        let dir = tempfile::tempdir().unwrap();
        let files = write_sample_data(&s, dir.path()).unwrap();
        let now = s.now.timestamp();
        let customers = read_customers(&files.customers_csv);
        #[derive(Default)]
        struct Seen {
            last_login: i64,
            max_step: u64,
            completed: bool,
            orders: usize,
            recent_detractor: bool,
            recent_promoter: bool,
        }
        let mut seen: HashMap<String, Seen> = HashMap::new();
        for e in read_events(&files.events_jsonl) {
            let entry = seen
                .entry(e["userId"].as_str().unwrap().to_string())
                .or_default();
            let t = ts(e["timestamp"].as_str().unwrap());
            let props = &e["properties"];
            match e["event"].as_str().unwrap() {
                "login" => entry.last_login = entry.last_login.max(t),
                "onboarding_step" => {
                    let step = props["step"].as_u64().unwrap();
                    assert!((1..=5).contains(&step));
                    entry.max_step = entry.max_step.max(step);
                }
                "onboarding_completed" => entry.completed = true,
                "order_completed" => {
                    assert!(props["total"].as_f64().unwrap() > 0.0);
                    assert!(props["order_number"].as_u64().unwrap() >= 1);
                    entry.orders += 1;
                }
                "nps_submitted" => {
                    let score = props["score"].as_u64().unwrap();
                    assert!(score <= 10);
                    if score <= 6 && t >= now - 30 * DAY {
                        entry.recent_detractor = true;
                    }
                    if score >= 9 && t >= now - 14 * DAY {
                        entry.recent_promoter = true;
                    }
                }
                "feature_used" => {
                    assert!(FEATURES.contains(&props["feature"].as_str().unwrap()));
                }
                "community_post" => {}
                other => panic!("unexpected event {other}"),
            }
        }
        assert_eq!(seen.len(), customers.len(), "every customer has events");
        let by_id = |c: &Customer| &seen[&c.id];
        let thriving = customers.iter().filter(|c| {
            let s = by_id(c);
            s.completed && s.last_login >= now - 2 * DAY && s.orders > 10
        });
        assert!(thriving.count() >= 5);
        assert!(customers.iter().any(|c| by_id(c).orders > 50));
        assert!(customers.iter().any(|c| by_id(c).recent_promoter));
        let stalled = customers.iter().filter(|c| {
            let s = by_id(c);
            let age = now - c.created;
            (8 * DAY..=30 * DAY).contains(&age)
                && !s.completed
                && (1..=2).contains(&s.max_step)
                && s.last_login < now - 7 * DAY
        });
        assert!(stalled.count() >= 10);
        let churning = customers.iter().filter(|c| {
            let s = by_id(c);
            (now - 120 * DAY..=now - 30 * DAY).contains(&s.last_login) && s.orders > 0
        });
        assert!(churning.count() >= 10);
        assert!(
            customers
                .iter()
                .filter(|c| by_id(c).recent_detractor)
                .count()
                >= 5
        );
        let new = customers
            .iter()
            .filter(|c| c.created >= now - 3 * DAY && by_id(c).last_login > 0);
        assert!(new.count() >= 20);
    }

    #[test]
    fn csv_rows_have_ids_and_unique_ascii_emails() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_sample_data(&spec(300, 5, 5), dir.path()).unwrap();
        let customers = read_customers(&files.customers_csv);
        assert_eq!(customers.len(), files.customers);
        let mut emails = HashSet::new();
        for (i, c) in customers.iter().enumerate() {
            assert_eq!(c.id, format!("cus_{:05}", i + 1));
            assert!(!c.email.is_empty());
            assert!(
                c.email.is_ascii() && c.email == c.email.to_lowercase(),
                "{}",
                c.email
            );
            assert!(c.email.ends_with(&format!(".{}@example.com", i + 1)));
            assert!(emails.insert(c.email.clone()), "duplicate {}", c.email);
        }
        let mut reader = csv::Reader::from_path(&files.customers_csv).unwrap();
        for r in reader.records() {
            let r = r.unwrap();
            let (model, owner, plan) = (&r[5], &r[6], &r[7]);
            assert!(["low-touch", "hybrid", "high-touch"].contains(&model));
            assert!(["starter", "pro", "enterprise"].contains(&plan));
            assert!(TIMEZONES.contains(&&r[4]));
            assert!(!r[2].is_empty() && !r[8].is_empty());
            match model {
                "high-touch" => assert!(owner.ends_with("@acme.test")),
                "low-touch" => assert!(owner.is_empty()),
                _ => {}
            }
        }
    }

    #[test]
    fn message_ids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_sample_data(&spec(400, 10, 99), dir.path()).unwrap();
        let mut ids = HashSet::new();
        for e in read_events(&files.events_jsonl) {
            let id = e["messageId"].as_str().unwrap().to_string();
            assert!(id.starts_with("evt-99-"));
            assert!(ids.insert(id.clone()), "duplicate {id}");
        }
        assert_eq!(ids.len(), files.events);
    }

    #[test]
    fn empty_spec_writes_header_only() {
        let dir = tempfile::tempdir().unwrap();
        let files =
            write_sample_data(&spec(0, 10, 1), dir.path().join("nested").as_path()).unwrap();
        assert_eq!((files.customers, files.events), (0, 0));
        assert_eq!(fs::read_to_string(&files.events_jsonl).unwrap(), "");
        assert_eq!(read_customers(&files.customers_csv).len(), 0);
    }
}
