//! One suite for every storage backend (STYLE: "Every storage backend passes
//! the same suite"). Each check is an `async fn(Arc<dyn Store>)`; the
//! `conformance!` macro instantiates it as `sqlite::NAME` (a fresh SQLite
//! file) and `postgres::NAME` (a fresh PostgreSQL database, which must be
//! reachable: these tests fail, never skip, without it). A change to the
//! `Store` trait extends this file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use engaged::domain::{CustomerId, CustomerPatch, Email, EngagementModel, Event};
use engaged::plan::OutboxKind;
use engaged::store::{
    AttemptResult, Decision, EventInsert, FiringRecord, NewAction, NewEscalation, Partition,
    PartitionDone, PlanCommit, RuleCommitCounts, RuleErrorRecord, RunSpec, Store, Upsert,
};
use serde_json::{Value, json};

use crate::helpers::PgDb;

/// A store on a fresh database, and what keeps that database alive.
pub struct Backend {
    pub store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<PgDb>,
}

impl Backend {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("engaged.db").display());
        Self {
            store: engaged::store::open(&url).await.unwrap(),
            _dir: Some(dir),
            _pg: None,
        }
    }

    pub async fn postgres() -> Self {
        let pg = PgDb::create().await;
        Self {
            store: engaged::store::open(&pg.url).await.unwrap(),
            _dir: None,
            _pg: Some(pg),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let backend = super::Backend::sqlite().await;
                    super::$name(backend.store.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let backend = super::Backend::postgres().await;
                    super::$name(backend.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    customers_are_inserted_then_patched_field_by_field,
    repeated_message_ids_are_ignored_and_events_read_back_in_order,
    customers_page_by_id_in_byte_order_and_histories_group_per_customer,
    committing_a_plan_counts_planned_and_deduplicated_and_records_repeats,
    held_emails_wait_for_approval_or_rejection,
    repeated_decisions_are_one_row_with_a_count,
    one_escalation_is_open_per_customer_and_rule_and_a_resolved_one_stays_closed,
    escalations_are_reminded_acknowledged_and_recovered,
    the_frequency_cap_counts_emails_at_their_cap_time,
    claims_lease_rows_and_only_the_current_claim_records_outcomes,
    the_planner_lock_has_one_holder_until_its_lease_ends,
    suppressions_ignore_case,
    firings_are_recorded_once_and_run_one_at_a_time_per_schedule,
    the_leases_of_a_dead_process_are_released_all_at_once,
    a_run_planned_in_partitions_stages_its_emails_until_its_guard_decision,
    a_partition_whose_holder_stopped_is_taken_over_and_committed_once,
    a_run_over_what_changed_covers_only_the_customers_changed_since,
    settings_keep_their_first_value,
    large_batches_span_several_statements,
    concurrent_claimers_never_get_the_same_action,
    concurrent_commits_plan_each_key_once,
    concurrent_imports_insert_each_customer_and_event_once,
);

// --- helpers ---

fn t0() -> DateTime<Utc> {
    engaged::domain::parse_timestamp("2026-06-15T02:00:00Z").unwrap()
}

fn cid(s: &str) -> CustomerId {
    CustomerId::parse(s).unwrap()
}

fn addr(s: &str) -> Email {
    Email::parse(s).unwrap()
}

fn map(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object: {v}"),
    }
}

fn email(customer: &str, rule: &str, key: &str) -> NewAction {
    NewAction {
        customer_id: cid(customer),
        rule: rule.into(),
        kind: OutboxKind::Email,
        dedup_key: format!("{customer}\u{1f}{rule}\u{1f}{key}"),
        customer_email: Some(format!("{customer}@example.com")),
        customer_timezone: None,
        not_before: None,
        dropped: None,
        subject: format!("{rule}/{key}"),
        payload: json!({"template": rule, "to": format!("{customer}@example.com"), "key": key})
            .to_string(),
    }
}

fn tag(customer: &str, rule: &str, name: &str) -> NewAction {
    NewAction {
        kind: OutboxKind::Tag,
        dedup_key: format!("{customer}\u{1f}tag\u{1f}{name}"),
        subject: name.into(),
        payload: json!({"tag": name}).to_string(),
        ..email(customer, rule, name)
    }
}

fn webhook(customer: &str, rule: &str, name: &str) -> NewAction {
    NewAction {
        kind: OutboxKind::Webhook,
        dedup_key: format!("{customer}\u{1f}{rule}\u{1f}webhook\u{1f}{name}"),
        subject: name.into(),
        payload: json!({"webhook": name}).to_string(),
        ..email(customer, rule, name)
    }
}

fn escalation(customer: &str, rule: &str, reason: &str) -> NewEscalation {
    NewEscalation {
        customer_id: cid(customer),
        rule: rule.into(),
        reason: reason.into(),
        owner: "csm@acme.test".into(),
        notice: json!({"to": "csm@acme.test", "customer": customer, "reason": reason}),
    }
}

fn plan(now: DateTime<Utc>, actions: Vec<NewAction>) -> PlanCommit {
    PlanCommit {
        trigger: "test".into(),
        now,
        started_at: now,
        actions,
        summary: json!({"customers": 3}),
        ..Default::default()
    }
}

fn counts(planned: usize, deduplicated: usize) -> RuleCommitCounts {
    RuleCommitCounts {
        planned,
        deduplicated,
    }
}

fn event(id: &str, customer: &str, name: &str, at: DateTime<Utc>, props: Value) -> Event {
    Event {
        message_id: id.into(),
        customer_id: cid(customer),
        name: name.into(),
        properties: props,
        at,
    }
}

async fn action_by_key(
    store: &dyn Store,
    customer: &str,
    key: &str,
) -> engaged::store::ActionRecord {
    store
        .actions_for_customer(&cid(customer))
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.dedup_key == key)
        .unwrap_or_else(|| panic!("no action {key:?} for {customer}"))
}

// --- the checks ---

async fn customers_are_inserted_then_patched_field_by_field(store: Arc<dyn Store>) {
    let ana = CustomerPatch {
        id: cid("c1"),
        email: Some(addr("ana@example.com")),
        name: Some("Ana".into()),
        created_at: Some(t0()),
        timezone: Some("Europe/Zagreb".into()),
        model: Some(EngagementModel::HighTouch),
        owner: Some(addr("csm@acme.test")),
        traits: map(json!({"plan": "pro", "nested": {"a": 1, "b": 2}, "keep": true})),
    };
    let bare = CustomerPatch {
        id: cid("c2"),
        ..Default::default()
    };
    // c1 again in the same batch: later rows win, field by field; traits
    // merge (RFC 7396: a null removes the key, objects merge recursively).
    let ana_again = CustomerPatch {
        id: cid("c1"),
        name: Some("Ana Novak".into()),
        traits: map(json!({"plan": null, "nested": {"b": null, "c": 3}, "seats": 5})),
        ..Default::default()
    };
    let outcomes = store
        .upsert_customers(&[ana, bare, ana_again])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![Upsert::Inserted, Upsert::Inserted, Upsert::Updated]
    );
    assert_eq!(store.customer_count().await.unwrap(), 2);

    let c1 = store.customer(&cid("c1")).await.unwrap().unwrap();
    assert_eq!(
        c1.email.as_ref().map(Email::as_str),
        Some("ana@example.com")
    );
    assert_eq!(c1.name.as_deref(), Some("Ana Novak"));
    assert_eq!(c1.created_at, Some(t0()));
    assert_eq!(c1.timezone.as_deref(), Some("Europe/Zagreb"));
    assert_eq!(c1.model, EngagementModel::HighTouch, "no model given: kept");
    assert_eq!(c1.owner.as_ref().map(Email::as_str), Some("csm@acme.test"));
    assert_eq!(
        Value::Object(c1.traits),
        json!({"nested": {"a": 1, "c": 3}, "keep": true, "seats": 5})
    );

    let c2 = store.customer(&cid("c2")).await.unwrap().unwrap();
    assert_eq!(c2.email, None, "a new customer without an email has none");
    assert_eq!(c2.name, None);
    assert_eq!(c2.model, EngagementModel::LowTouch);
    assert!(c2.traits.is_empty());

    // A later import names a model (the default one, too) and an address.
    let outcomes = store
        .upsert_customers(&[
            CustomerPatch {
                id: cid("c1"),
                model: Some(EngagementModel::LowTouch),
                ..Default::default()
            },
            CustomerPatch {
                id: cid("c2"),
                email: Some(addr("bo@example.com")),
                model: Some(EngagementModel::Hybrid),
                ..Default::default()
            },
            CustomerPatch {
                id: cid("c3"),
                email: Some(addr("cy@example.com")),
                ..Default::default()
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![Upsert::Updated, Upsert::Updated, Upsert::Inserted]
    );
    let c1 = store.customer(&cid("c1")).await.unwrap().unwrap();
    assert_eq!(c1.model, EngagementModel::LowTouch);
    assert_eq!(c1.name.as_deref(), Some("Ana Novak"), "untouched");
    let c2 = store.customer(&cid("c2")).await.unwrap().unwrap();
    assert_eq!(c2.email.as_ref().map(Email::as_str), Some("bo@example.com"));
    assert_eq!(c2.model, EngagementModel::Hybrid);
    assert_eq!(store.customer_count().await.unwrap(), 3);
    assert_eq!(store.customer(&cid("nobody")).await.unwrap(), None);
    store.ping().await.unwrap();
}

async fn repeated_message_ids_are_ignored_and_events_read_back_in_order(store: Arc<dyn Store>) {
    let day = Duration::days(1);
    let props =
        json!({"amount": 12.5, "items": [1, 2], "note": "žnj \"q\"", "big": 9007199254740993u64});
    let e1 = event("m1", "c1", "login", t0() - day * 2, json!({}));
    let e2 = event("m2", "c1", "purchase", t0() - day, props.clone());
    let e3 = event("m3", "c2", "login", t0() - day * 3, json!({"via": "sso"}));
    let e4 = event("m4", "c1", "login", t0() + day, json!({}));
    // m1 twice in one batch, then m3 again in the next.
    let first = store
        .insert_events(&[e1.clone(), e2.clone(), e1.clone(), e3.clone()])
        .await
        .unwrap();
    assert_eq!(
        first,
        EventInsert {
            inserted: 3,
            duplicates: 1
        }
    );
    let second = store
        .insert_events(&[event("m3", "c2", "other", t0(), json!({})), e4.clone()])
        .await
        .unwrap();
    assert_eq!(
        second,
        EventInsert {
            inserted: 1,
            duplicates: 1
        }
    );

    let got = store
        .events_in_id_range(&cid("c1"), &cid("c2"), t0())
        .await
        .unwrap();
    assert_eq!(got, vec![e1.clone(), e2.clone(), e3.clone()]);
    assert_eq!(got[1].properties, props, "properties round-trip exactly");
    let got = store
        .events_in_id_range(&cid("c1"), &cid("c1"), t0() + day)
        .await
        .unwrap();
    assert_eq!(got, vec![e1, e2, e4]);
}

async fn customers_page_by_id_in_byte_order_and_histories_group_per_customer(
    store: Arc<dyn Store>,
) {
    // Byte order: upper case before lower case, a prefix before its extensions.
    let ids = ["b", "a-1", "B", "c", "a"];
    let patches: Vec<CustomerPatch> = ids
        .iter()
        .map(|id| CustomerPatch {
            id: cid(id),
            ..Default::default()
        })
        .collect();
    store.upsert_customers(&patches).await.unwrap();
    let page_ids = |page: Vec<engaged::domain::Customer>| {
        page.into_iter()
            .map(|c| c.id.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page_ids(store.customers_page(None, 2).await.unwrap()),
        ["B", "a"]
    );
    assert_eq!(
        page_ids(store.customers_page(Some(&cid("a")), 2).await.unwrap()),
        ["a-1", "b"]
    );
    assert_eq!(
        page_ids(store.customers_page(Some(&cid("b")), 2).await.unwrap()),
        ["c"]
    );
    assert!(
        store
            .customers_page(Some(&cid("c")), 2)
            .await
            .unwrap()
            .is_empty()
    );

    let h = Duration::hours(1);
    let props = json!({"n": 1, "nested": {"deep": [true, null, "x"]}, "big": 12345678901234567i64});
    store
        .insert_events(&[
            event("e1", "B", "click", t0() - h, props.clone()),
            event("e2", "B", "login", t0() - h * 2, json!({})),
            event("e3", "a-1", "login", t0() - h * 3, json!({"via": "sso"})),
            event("e4", "a-1", "later", t0() + h, json!({})),
            event("e5", "b", "login", t0() - h, json!({})),
            // Same time as e1: insertion order breaks the tie.
            event("e6", "B", "view", t0() - h, json!({})),
        ])
        .await
        .unwrap();
    let histories = store
        .histories_in_id_range(&cid("B"), &cid("a-1"), t0())
        .await
        .unwrap();
    assert_eq!(
        histories,
        vec![
            (
                cid("B"),
                vec![
                    ("login".to_owned(), t0() - h * 2, json!({})),
                    ("click".to_owned(), t0() - h, props),
                    ("view".to_owned(), t0() - h, json!({})),
                ]
            ),
            (
                cid("a-1"),
                vec![("login".to_owned(), t0() - h * 3, json!({"via": "sso"}))]
            ),
        ],
        "customers without events are absent; events after `until` are left out"
    );
}

async fn committing_a_plan_counts_planned_and_deduplicated_and_records_repeats(
    store: Arc<dyn Store>,
) {
    let mut dropped = email("c2", "news", "n1");
    dropped.dropped = Some("frequency cap".into());
    let mut later = email("c3", "tips", "t1");
    later.not_before = Some(t0() + Duration::hours(5));
    let mut earlier = email("c3", "tips", "t0");
    earlier.not_before = Some(t0() - Duration::hours(1));
    let mut p = plan(
        t0(),
        vec![
            email("c1", "welcome", "welcome"),
            email("c2", "welcome", "welcome"),
            email("c1", "welcome", "welcome"), // the same key twice in one plan
            tag("c1", "level", "engaged"),
            tag("c1", "other", "engaged"), // another rule, the same tag key
            webhook("c1", "crm", "signup"),
            dropped,
            later,
            earlier,
        ],
    );
    p.errors = vec![
        RuleErrorRecord {
            rule: "broken".into(),
            customer_id: cid("c2"),
            message: "second".into(),
        },
        RuleErrorRecord {
            rule: "broken".into(),
            customer_id: cid("c1"),
            message: "first".into(),
        },
    ];
    let run1 = store.commit_plan(p).await.unwrap();
    assert_eq!(
        run1.per_rule,
        BTreeMap::from([
            ("welcome".to_owned(), counts(2, 1)),
            ("level".to_owned(), counts(1, 0)),
            ("other".to_owned(), counts(0, 1)),
            ("crm".to_owned(), counts(1, 0)),
            ("news".to_owned(), counts(1, 0)),
            ("tips".to_owned(), counts(2, 0)),
        ])
    );
    assert!(run1.held.is_empty());

    let actions = store.actions_for_run(run1.run_id).await.unwrap();
    let summary: Vec<(&str, &str, &str, &str)> = actions
        .iter()
        .map(|a| {
            (
                a.customer_id.as_str(),
                a.rule.as_str(),
                a.kind.as_str(),
                a.status.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("c1", "welcome", "email", "pending"),
            ("c2", "welcome", "email", "pending"),
            ("c1", "level", "tag", "done"),
            ("c1", "crm", "webhook", "pending"),
            ("c2", "news", "email", "dropped"),
            ("c3", "tips", "email", "pending"),
            ("c3", "tips", "email", "pending"),
        ],
        "in plan order"
    );
    assert!(actions.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(actions[0].payload["template"], "welcome");
    assert_eq!(actions[0].attempts, 0);
    assert_eq!(actions[0].created_at, t0());
    assert_eq!(actions[0].next_attempt_at, t0());
    assert_eq!(actions[0].finished_at, None);
    assert_eq!(
        actions[2].finished_at,
        Some(t0()),
        "a tag is applied at once"
    );
    assert_eq!(actions[4].finished_at, Some(t0()));
    assert_eq!(actions[4].last_error.as_deref(), Some("frequency cap"));
    assert_eq!(actions[5].next_attempt_at, t0() + Duration::hours(5));
    assert_eq!(
        actions[6].next_attempt_at,
        t0(),
        "a window already open: now"
    );
    assert_eq!(
        store
            .tags_in_id_range(&cid("c1"), &cid("c3"))
            .await
            .unwrap(),
        vec![(cid("c1"), "engaged".to_owned())]
    );
    let welcome_c1 = "c1\u{1f}welcome\u{1f}welcome".to_owned();
    assert_eq!(
        store
            .existing_dedup_keys(&[welcome_c1.clone(), "nope".into()])
            .await
            .unwrap(),
        HashSet::from([welcome_c1.clone()])
    );
    let errors = store.run_errors(run1.run_id).await.unwrap();
    assert_eq!(
        errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>(),
        ["second", "first"],
        "in the order recorded"
    );

    // The next night wants c1's welcome again: deduplicated, and recorded
    // on the original action.
    let night2 = t0() + Duration::days(1);
    let run2 = store
        .commit_plan(plan(
            night2,
            vec![
                email("c1", "welcome", "welcome"),
                email("c4", "welcome", "welcome"),
                tag("c1", "level", "engaged"),
            ],
        ))
        .await
        .unwrap();
    assert!(run2.run_id > run1.run_id);
    assert_eq!(
        run2.per_rule,
        BTreeMap::from([
            ("welcome".to_owned(), counts(1, 1)),
            ("level".to_owned(), counts(0, 1)),
        ])
    );
    let level = &store.actions_for_run(run1.run_id).await.unwrap()[2];
    assert_eq!(
        (level.kind.as_str(), level.repeats, level.repeated_run),
        ("tag", 0, None),
        "a tag's repeats are counted in the run, not written to it"
    );
    let original = action_by_key(&*store, "c1", &welcome_c1).await;
    assert_eq!(original.run_id, run1.run_id);
    assert_eq!(original.repeats, 1);
    assert_eq!(original.repeated_run, Some(run2.run_id));
    assert_eq!(original.repeated_at, Some(night2));
    assert_eq!(
        store.actions_for_run(run2.run_id).await.unwrap().len(),
        1,
        "only c4's welcome is new"
    );

    let runs = store.runs(10).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        [run2.run_id, run1.run_id]
    );
    assert_eq!(runs[1].trigger, "test");
    assert_eq!(runs[1].now, t0());
    assert_eq!(runs[1].started_at, t0());
    assert_eq!(runs[1].status, "planned");
    assert_eq!(runs[1].summary, json!({"customers": 3}));
    assert_eq!(runs[1].finished_at, None);
    store
        .finish_run(run1.run_id, "done", &json!({"sent": 4}))
        .await
        .unwrap();
    let runs = store.runs(1).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, run2.run_id);
    let run = store
        .runs(10)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == run1.run_id)
        .unwrap();
    assert_eq!(run.status, "done");
    assert_eq!(run.summary, json!({"sent": 4}));
    assert!(run.finished_at.is_some());
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.pending, counts.sending, counts.sent),
        (6, 0, 0),
        "{counts:?}"
    );
}

async fn held_emails_wait_for_approval_or_rejection(store: Arc<dyn Store>) {
    let mut p = plan(
        t0(),
        vec![
            email("c1", "blast", "b"),
            email("c2", "blast", "b"),
            email("c3", "blast", "b"),
            email("c4", "calm", "c"),
        ],
    );
    p.hold = BTreeMap::from([
        ("blast".to_owned(), "3 new emails".to_owned()),
        ("idle".to_owned(), "nothing to hold".to_owned()),
    ]);
    let run = store.commit_plan(p).await.unwrap();
    assert_eq!(run.held, BTreeMap::from([("blast".to_owned(), 3)]));
    let record = &store.runs(1).await.unwrap()[0];
    assert_eq!(record.status, "held");
    assert_eq!(record.held, BTreeMap::from([("blast".to_owned(), 3)]));
    store
        .finish_run(run.run_id, "done", &json!({}))
        .await
        .unwrap();
    assert_eq!(
        store.runs(1).await.unwrap()[0].status,
        "held",
        "a held run stays held"
    );
    let statuses: Vec<(String, String, Option<String>)> = store
        .actions_for_run(run.run_id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.rule, a.status, a.last_error))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("blast".into(), "held".into(), Some("3 new emails".into())),
            ("blast".into(), "held".into(), Some("3 new emails".into())),
            ("blast".into(), "held".into(), Some("3 new emails".into())),
            ("calm".into(), "pending".into(), None),
        ]
    );
    // Held emails are not delivered, but count against the cap.
    let claimed = store
        .claim_due(t0(), t0() + Duration::minutes(5), 10)
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|i| i.rule.as_str()).collect::<Vec<_>>(),
        ["calm"]
    );
    assert_eq!(
        store.recent_email_counts(&[cid("c1")], t0()).await.unwrap(),
        HashMap::from([(cid("c1"), 1)])
    );

    let approved_at = t0() + Duration::hours(2);
    assert_eq!(
        store
            .decide_held(run.run_id, Some("calm"), true, approved_at)
            .await
            .unwrap(),
        0,
        "nothing of that rule is held"
    );
    assert_eq!(
        store
            .decide_held(run.run_id, Some("blast"), true, approved_at)
            .await
            .unwrap(),
        3
    );
    let a = action_by_key(&*store, "c1", "c1\u{1f}blast\u{1f}b").await;
    assert_eq!(a.status, "pending");
    assert_eq!(a.next_attempt_at, approved_at);
    // Released now, so it counts from now on.
    assert_eq!(
        store
            .recent_email_counts(&[cid("c1")], t0() + Duration::hours(1))
            .await
            .unwrap(),
        HashMap::from([(cid("c1"), 1)])
    );
    assert_eq!(store.runs(1).await.unwrap()[0].status, "approved");
    let decisions = store.decisions_for_customer(&cid("c1")).await.unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].run_id, run.run_id);
    assert_eq!(decisions[0].rule, "blast");
    assert_eq!(decisions[0].subject, "email blast");
    assert_eq!(decisions[0].decision, "approved");
    assert_eq!(
        decisions[0].reason,
        "released after the blast-radius guard held it"
    );
    assert_eq!(decisions[0].at, approved_at);
    assert_eq!(decisions[0].first_at, approved_at);
    assert_eq!(decisions[0].times, 1);

    // A second run is rejected whole.
    let mut p = plan(
        t0() + Duration::days(1),
        vec![email("c1", "blast", "b2"), email("c2", "blast", "b2")],
    );
    p.hold = BTreeMap::from([("blast".to_owned(), "again".to_owned())]);
    let run2 = store.commit_plan(p).await.unwrap();
    let rejected_at = t0() + Duration::days(1) + Duration::hours(1);
    assert_eq!(
        store
            .decide_held(run2.run_id, None, false, rejected_at)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .decide_held(run2.run_id, None, false, rejected_at)
            .await
            .unwrap(),
        0
    );
    let a = action_by_key(&*store, "c2", "c2\u{1f}blast\u{1f}b2").await;
    assert_eq!(a.status, "rejected");
    assert_eq!(a.finished_at, Some(rejected_at));
    assert_eq!(store.runs(1).await.unwrap()[0].status, "rejected");
    assert!(store.runs(1).await.unwrap()[0].held.is_empty());
    let decisions = store.decisions_for_customer(&cid("c2")).await.unwrap();
    assert_eq!(
        decisions
            .iter()
            .map(|d| d.decision.as_str())
            .collect::<Vec<_>>(),
        ["approved", "rejected"]
    );
    assert_eq!(
        store.recent_email_counts(&[cid("c2")], t0()).await.unwrap(),
        HashMap::from([(cid("c2"), 1)]),
        "a rejected email does not count"
    );
}

async fn repeated_decisions_are_one_row_with_a_count(store: Arc<dyn Store>) {
    let suppressed = Decision {
        customer_id: cid("c1"),
        rule: "news".into(),
        subject: "email news (key n1)".into(),
        decision: "suppressed".into(),
        reason: "unsubscribed".into(),
        dedup_key: "c1\u{1f}news\u{1f}n1".into(),
    };
    let mut p = plan(t0(), vec![]);
    p.decisions = vec![
        suppressed.clone(),
        Decision {
            reason: "bounced".into(),
            ..suppressed.clone()
        },
    ];
    let run1 = store.commit_plan(p).await.unwrap();
    let night2 = t0() + Duration::days(1);
    let mut p = plan(night2, vec![]);
    p.decisions = vec![
        suppressed.clone(),
        Decision {
            decision: "deferred".into(),
            reason: "frequency cap".into(),
            ..suppressed.clone()
        },
    ];
    let run2 = store.commit_plan(p).await.unwrap();
    assert!(run2.per_rule.is_empty(), "decisions are not actions");
    let got = store.decisions_for_customer(&cid("c1")).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].decision, "suppressed");
    assert_eq!(got[0].times, 3);
    assert_eq!(got[0].first_at, t0());
    assert_eq!(got[0].at, night2);
    assert_eq!(got[0].run_id, run2.run_id);
    assert_eq!(got[0].reason, "unsubscribed");
    assert_eq!(got[1].decision, "deferred");
    assert_eq!(got[1].times, 1);
    assert_eq!(got[1].first_at, night2);
    assert!(run1.run_id < run2.run_id);
    assert!(
        store
            .decisions_for_customer(&cid("c2"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn one_escalation_is_open_per_customer_and_rule_and_a_resolved_one_stays_closed(
    store: Arc<dyn Store>,
) {
    let mut p = plan(t0(), vec![]);
    p.escalations = vec![
        escalation("c1", "stall", "no login for 7 days"),
        escalation("c1", "stall", "no login for 7 days"),
        escalation("c2", "stall", "no login for 7 days"),
    ];
    let run1 = store.commit_plan(p).await.unwrap();
    assert_eq!(
        run1.per_rule,
        BTreeMap::from([("stall".to_owned(), counts(2, 1))])
    );
    let open = store.escalations(true).await.unwrap();
    assert_eq!(open.len(), 2);
    assert_eq!(
        (open[0].customer_id.as_str(), open[1].customer_id.as_str()),
        ("c1", "c2")
    );
    let e1 = open[0].clone();
    assert_eq!(e1.rule, "stall");
    assert_eq!(e1.reason, "no login for 7 days");
    assert_eq!(e1.owner, "csm@acme.test");
    assert_eq!(e1.status, "open");
    assert_eq!(e1.created_at, t0());
    assert_eq!(e1.notified_at, Some(t0()));
    assert_eq!(e1.notifications, 1);
    assert_eq!(
        (e1.resolved_at, e1.acknowledged_at, e1.recovered_at),
        (None, None, None)
    );
    // Each opened escalation enqueued one notice naming it.
    let notices = store.actions_for_run(run1.run_id).await.unwrap();
    assert_eq!(notices.len(), 2);
    assert_eq!(notices[0].kind, "escalation_notice");
    assert_eq!(notices[0].status, "pending");
    assert_eq!(notices[0].dedup_key, format!("escalation\u{1f}{}", e1.id));
    assert_eq!(notices[0].payload["escalation_id"], e1.id);
    assert_eq!(notices[0].payload["reason"], "no login for 7 days");
    assert_eq!(notices[1].payload["escalation_id"], open[1].id);
    assert_eq!(
        store
            .open_escalation_pairs(&[
                (cid("c1"), "stall".into()),
                (cid("c1"), "other".into()),
                (cid("c3"), "stall".into()),
            ])
            .await
            .unwrap(),
        HashSet::from([(cid("c1"), "stall".to_owned())])
    );

    let again = |reason: &'static str, days: i64| {
        let store = Arc::clone(&store);
        async move {
            let mut p = plan(t0() + Duration::days(days), vec![]);
            p.escalations = vec![escalation("c1", "stall", reason)];
            store.commit_plan(p).await.unwrap().per_rule["stall"].clone()
        }
    };
    assert_eq!(again("no login for 7 days", 1).await, counts(0, 1));
    // Acknowledged is still open.
    assert!(
        store
            .acknowledge_escalation(e1.id, t0() + Duration::days(1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .acknowledge_escalation(e1.id, t0() + Duration::days(1))
            .await
            .unwrap()
    );
    assert_eq!(again("no login for 14 days", 2).await, counts(0, 1));
    let acked = &store.escalations_for_customer(&cid("c1")).await.unwrap()[0];
    assert_eq!(acked.status, "acknowledged");
    assert_eq!(acked.acknowledged_at, Some(t0() + Duration::days(1)));
    assert_eq!(store.escalations(true).await.unwrap().len(), 2);

    // Resolved by a human: not reopened for the same reason, but for a new one.
    assert!(
        store
            .resolve_escalation(e1.id, t0() + Duration::days(3))
            .await
            .unwrap()
    );
    assert!(
        !store
            .resolve_escalation(e1.id, t0() + Duration::days(3))
            .await
            .unwrap()
    );
    assert!(!store.resolve_escalation(999_999, t0()).await.unwrap());
    assert_eq!(store.escalations(true).await.unwrap().len(), 1);
    assert_eq!(store.escalations(false).await.unwrap().len(), 2);
    assert!(
        store
            .open_escalation_pairs(&[(cid("c1"), "stall".into())])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .resolved_escalation_reasons(&[
                (cid("c1"), "stall".into()),
                (cid("c1"), "other".into()),
                (cid("c3"), "stall".into()),
            ])
            .await
            .unwrap(),
        HashSet::from([(
            cid("c1"),
            "stall".to_owned(),
            "no login for 7 days".to_owned()
        )])
    );
    assert_eq!(again("no login for 7 days", 4).await, counts(0, 1));
    assert_eq!(again("no purchase after trial", 5).await, counts(1, 0));
    let c1 = store.escalations_for_customer(&cid("c1")).await.unwrap();
    assert_eq!(
        c1.iter()
            .map(|e| (e.status.as_str(), e.reason.as_str()))
            .collect::<Vec<_>>(),
        [
            ("resolved", "no login for 7 days"),
            ("open", "no purchase after trial")
        ]
    );
    assert_eq!(c1[0].resolved_at, Some(t0() + Duration::days(3)));
    assert_eq!(c1[1].created_at, t0() + Duration::days(5));
}

async fn escalations_are_reminded_acknowledged_and_recovered(store: Arc<dyn Store>) {
    let mut p = plan(t0(), vec![]);
    p.escalations = vec![
        escalation("c1", "stall", "stuck"),
        escalation("c2", "stall", "stuck"),
    ];
    let run = store.commit_plan(p).await.unwrap();
    let all = store.escalations(false).await.unwrap();
    let (e1, e2) = (all[0].id, all[1].id);
    let ids = |v: Vec<engaged::store::EscalationRecord>| v.iter().map(|e| e.id).collect::<Vec<_>>();
    let day = Duration::days(1);

    assert!(
        store
            .escalations_to_renotify(t0())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        ids(store.escalations_to_renotify(t0() + day).await.unwrap()),
        [e1, e2]
    );
    assert!(
        store
            .renotify(e1, 1, "lead@acme.test", run.run_id, t0() + day)
            .await
            .unwrap()
    );
    assert!(
        !store
            .renotify(e1, 1, "lead@acme.test", run.run_id, t0() + day)
            .await
            .unwrap(),
        "reminder 1 is enqueued once"
    );
    let r = &store.escalations_for_customer(&cid("c1")).await.unwrap()[0];
    assert_eq!(r.notifications, 2);
    assert_eq!(r.notified_at, Some(t0() + day));
    let reminder = action_by_key(
        &*store,
        "c1",
        &format!("escalation\u{1f}{e1}\u{1f}reminder\u{1f}1"),
    )
    .await;
    assert_eq!(reminder.kind, "escalation_notice");
    assert_eq!(reminder.status, "pending");
    assert_eq!(reminder.next_attempt_at, t0() + day);
    assert_eq!(reminder.payload["reminder"], 1);
    assert_eq!(reminder.payload["owner"], "lead@acme.test");
    assert_eq!(reminder.payload["escalation_id"], e1);
    assert_eq!(reminder.payload["reason"], "stuck", "a copy of the notice");
    assert_eq!(
        ids(store.escalations_to_renotify(t0() + day).await.unwrap()),
        [e2]
    );

    // Acknowledged: no more reminders.
    assert!(store.acknowledge_escalation(e2, t0() + day).await.unwrap());
    assert!(
        !store
            .renotify(e2, 1, "lead@acme.test", run.run_id, t0() + day * 2)
            .await
            .unwrap()
    );
    assert_eq!(
        ids(store.escalations_to_renotify(t0() + day * 2).await.unwrap()),
        [e1]
    );

    // Recovered: no reminders while it lasts; the first time is kept.
    store
        .set_recovered(&[e1], true, t0() + day * 2)
        .await
        .unwrap();
    store
        .set_recovered(&[e1], true, t0() + day * 3)
        .await
        .unwrap();
    store.set_recovered(&[], true, t0()).await.unwrap();
    let r = &store.escalations_for_customer(&cid("c1")).await.unwrap()[0];
    assert_eq!(r.recovered_at, Some(t0() + day * 2));
    assert!(
        store
            .escalations_to_renotify(t0() + day * 5)
            .await
            .unwrap()
            .is_empty()
    );
    store
        .set_recovered(&[e1, e2], false, t0() + day * 4)
        .await
        .unwrap();
    let r = &store.escalations_for_customer(&cid("c1")).await.unwrap()[0];
    assert_eq!(r.recovered_at, None);
    assert_eq!(
        ids(store.escalations_to_renotify(t0() + day * 5).await.unwrap()),
        [e1]
    );

    assert_eq!(
        store
            .owner_escalation_counts(
                &["csm@acme.test".to_owned(), "x@acme.test".to_owned()],
                t0()
            )
            .await
            .unwrap(),
        HashMap::from([("csm@acme.test".to_owned(), 2)])
    );
    assert!(
        store
            .owner_escalation_counts(&["csm@acme.test".to_owned()], t0() + Duration::hours(1))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn the_frequency_cap_counts_emails_at_their_cap_time(store: Arc<dyn Store>) {
    let mut windowed = email("c1", "tips", "t2");
    windowed.not_before = Some(t0() + Duration::hours(3));
    let mut dropped = email("c1", "news", "n1");
    dropped.dropped = Some("frequency cap".into());
    let mut p = plan(
        t0(),
        vec![
            email("c1", "tips", "t1"),
            windowed,
            webhook("c1", "crm", "x"),
            dropped,
            email("c2", "tips", "t1"),
            tag("c2", "level", "fan"),
        ],
    );
    p.started_at = t0() + Duration::minutes(1); // the wall clock may run ahead
    store.commit_plan(p).await.unwrap();
    let all = [cid("c1"), cid("c2"), cid("c3")];
    let h = Duration::hours(1);
    assert_eq!(
        store.recent_email_counts(&all, t0()).await.unwrap(),
        HashMap::from([(cid("c1"), 2), (cid("c2"), 1)])
    );
    assert_eq!(
        store.recent_email_counts(&all, t0() + h).await.unwrap(),
        HashMap::from([(cid("c1"), 1)]),
        "the windowed email counts when its window opens"
    );
    assert!(
        store
            .recent_email_counts(&all, t0() + h * 4)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .recent_email_counts(&[], t0())
            .await
            .unwrap()
            .is_empty()
    );

    // Sending keeps counting; a failure stops counting.
    let claimed = store.claim_due(t0() + h, t0() + h * 2, 10).await.unwrap();
    assert_eq!(claimed.len(), 3, "{claimed:?}");
    let token = claimed[0].claim_token.clone();
    let results: Vec<(i64, AttemptResult)> = claimed
        .iter()
        .map(|i| {
            let r = if i.customer_id.as_str() == "c2" {
                AttemptResult::Failed {
                    error: "550 no such user".into(),
                }
            } else {
                AttemptResult::Sent {
                    detail: "250 ok".into(),
                }
            };
            (i.id, r)
        })
        .collect();
    store
        .record_attempts(&token, &results, t0() + h)
        .await
        .unwrap();
    assert_eq!(
        store.recent_email_counts(&all, t0()).await.unwrap(),
        HashMap::from([(cid("c1"), 2)])
    );
}

async fn claims_lease_rows_and_only_the_current_claim_records_outcomes(store: Arc<dyn Store>) {
    let mut later = email("c4", "tips", "t");
    later.not_before = Some(t0() + Duration::hours(1));
    store
        .commit_plan(plan(
            t0(),
            vec![
                email("c1", "w", "w"),
                email("c2", "w", "w"),
                email("c3", "w", "w"),
                later,
            ],
        ))
        .await
        .unwrap();
    let m = Duration::minutes;
    let ids = |v: &[engaged::store::OutboxItem]| {
        v.iter()
            .map(|i| i.customer_id.as_str().to_owned())
            .collect::<Vec<_>>()
    };

    let first = store.claim_due(t0(), t0() + m(5), 2).await.unwrap();
    assert_eq!(ids(&first), ["c1", "c2"]);
    assert!(first.iter().all(|i| i.attempts == 1));
    assert!(first.iter().all(|i| i.lease_until == t0() + m(5)));
    assert_eq!(first[0].claim_token, first[1].claim_token);
    assert_eq!(first[0].kind, OutboxKind::Email);
    assert_eq!(first[0].rule, "w");
    assert_eq!(first[0].dedup_key, "c1\u{1f}w\u{1f}w");
    assert_eq!(first[0].payload["to"], "c1@example.com");
    let second = store.claim_due(t0(), t0() + m(5), 10).await.unwrap();
    assert_eq!(ids(&second), ["c3"]);
    assert_ne!(second[0].claim_token, first[0].claim_token);
    assert!(
        store
            .claim_due(t0() + m(1), t0() + m(6), 10)
            .await
            .unwrap()
            .is_empty(),
        "leased rows are not claimed again while their lease lasts"
    );
    assert_eq!(store.outbox_counts().await.unwrap().sending, 3);
    assert_eq!(store.next_due_at().await.unwrap(), Some(t0() + m(5)));

    // The leases expire: another worker takes all three over.
    let taken = store
        .claim_due(t0() + m(6), t0() + m(11), 10)
        .await
        .unwrap();
    assert_eq!(ids(&taken), ["c1", "c2", "c3"]);
    assert!(taken.iter().all(|i| i.attempts == 2));
    let token = taken[0].claim_token.clone();
    // The first worker's late report changes nothing.
    store
        .record_attempts(
            &first[0].claim_token,
            &[(
                first[0].id,
                AttemptResult::Sent {
                    detail: "late".into(),
                },
            )],
            t0() + m(7),
        )
        .await
        .unwrap();
    let a = action_by_key(&*store, "c1", "c1\u{1f}w\u{1f}w").await;
    assert_eq!(a.status, "sending");
    assert_eq!(a.payload.get("delivery"), None);

    store
        .record_attempts(
            &token,
            &[
                (
                    taken[0].id,
                    AttemptResult::Sent {
                        detail: "250 2.0.0 queued".into(),
                    },
                ),
                (
                    taken[1].id,
                    AttemptResult::Retry {
                        error: "421 try later".into(),
                        retry_at: t0() + m(20),
                    },
                ),
                (taken[2].id, AttemptResult::Released),
                // A repeated id keeps its first outcome.
                (
                    taken[0].id,
                    AttemptResult::Failed {
                        error: "repeated".into(),
                    },
                ),
            ],
            t0() + m(8),
        )
        .await
        .unwrap();
    let a = action_by_key(&*store, "c1", "c1\u{1f}w\u{1f}w").await;
    assert_eq!(a.status, "sent");
    assert_eq!(a.finished_at, Some(t0() + m(8)));
    assert_eq!(a.last_error, None);
    assert_eq!(a.attempts, 2);
    assert_eq!(a.payload["delivery"], "250 2.0.0 queued");
    assert_eq!(a.payload["to"], "c1@example.com", "the payload is kept");
    let b = action_by_key(&*store, "c2", "c2\u{1f}w\u{1f}w").await;
    assert_eq!(b.status, "pending");
    assert_eq!(b.last_error.as_deref(), Some("421 try later"));
    assert_eq!(b.next_attempt_at, t0() + m(20));
    assert_eq!(b.attempts, 2);
    let c = action_by_key(&*store, "c3", "c3\u{1f}w\u{1f}w").await;
    assert_eq!(c.status, "pending");
    assert_eq!(c.attempts, 1, "a released claim does not count");
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.sending,
            counts.sent,
            counts.failed,
            counts.dead
        ),
        (3, 0, 1, 0, 0)
    );
    assert_eq!(store.next_due_at().await.unwrap(), Some(t0()));

    let h = Duration::hours(1);
    let third = store
        .claim_due(t0() + h, t0() + h + m(5), 10)
        .await
        .unwrap();
    assert_eq!(ids(&third), ["c2", "c3", "c4"], "returned in id order");
    let token = third[0].claim_token.clone();
    store
        .record_attempts(
            &token,
            &[
                (
                    third[1].id,
                    AttemptResult::Dead {
                        error: "gave up".into(),
                    },
                ),
                (
                    third[0].id,
                    AttemptResult::Failed {
                        error: "550 no".into(),
                    },
                ),
                (
                    third[2].id,
                    AttemptResult::Wait {
                        until: t0() + h * 8,
                        reason: "outside the send window".into(),
                    },
                ),
            ],
            t0() + h,
        )
        .await
        .unwrap();
    let d = action_by_key(&*store, "c4", "c4\u{1f}tips\u{1f}t").await;
    assert_eq!(d.status, "pending");
    assert_eq!(d.attempts, 0);
    assert_eq!(d.next_attempt_at, t0() + h * 8);
    assert_eq!(d.last_error.as_deref(), Some("outside the send window"));
    assert_eq!(store.next_due_at().await.unwrap(), Some(t0() + h * 8));
    let c = action_by_key(&*store, "c3", "c3\u{1f}w\u{1f}w").await;
    assert_eq!(
        (c.status.as_str(), c.last_error.as_deref()),
        ("dead", Some("gave up"))
    );
    assert_eq!(c.finished_at, Some(t0() + h));

    let last = store
        .claim_due(t0() + h * 8, t0() + h * 9, 10)
        .await
        .unwrap();
    assert_eq!(ids(&last), ["c4"]);
    store
        .record_attempts(
            &last[0].claim_token,
            &[(
                last[0].id,
                AttemptResult::Suppressed {
                    reason: "unsubscribed".into(),
                },
            )],
            t0() + h * 8,
        )
        .await
        .unwrap();
    let d = action_by_key(&*store, "c4", "c4\u{1f}tips\u{1f}t").await;
    assert_eq!(
        (d.status.as_str(), d.last_error.as_deref()),
        ("suppressed", Some("unsubscribed"))
    );
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.sending,
            counts.sent,
            counts.failed,
            counts.dead
        ),
        (0, 0, 1, 1, 1)
    );
    assert_eq!(store.next_due_at().await.unwrap(), None);
    store.record_attempts(&token, &[], t0()).await.unwrap();
}

async fn the_planner_lock_has_one_holder_until_its_lease_ends(store: Arc<dyn Store>) {
    let m = Duration::minutes;
    assert!(
        store
            .try_lock_planner("a", t0(), t0() + m(10))
            .await
            .unwrap()
    );
    assert!(
        store
            .try_lock_planner("a", t0() + m(1), t0() + m(11))
            .await
            .unwrap(),
        "the holder extends its lease"
    );
    assert!(
        !store
            .try_lock_planner("b", t0() + m(10), t0() + m(20))
            .await
            .unwrap()
    );
    assert!(
        store
            .try_lock_planner("b", t0() + m(12), t0() + m(22))
            .await
            .unwrap(),
        "a's lease ended"
    );
    store.unlock_planner("a").await.unwrap();
    assert!(
        !store
            .try_lock_planner("c", t0() + m(13), t0() + m(23))
            .await
            .unwrap(),
        "a's late release does not free b's lock"
    );
    assert!(
        !store.renew_planner("a", t0() + m(30)).await.unwrap(),
        "a's late renewal does not take b's lock"
    );
    assert!(store.renew_planner("b", t0() + m(30)).await.unwrap());
    assert!(
        !store
            .try_lock_planner("c", t0() + m(25), t0() + m(35))
            .await
            .unwrap(),
        "b renewed until minute 30"
    );
    store.unlock_planner("b").await.unwrap();
    assert!(
        !store.renew_planner("b", t0() + m(40)).await.unwrap(),
        "a renewal after the release does not take the lock back"
    );

    // Many at once: exactly one wins.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .try_lock_planner(&format!("racer{i}"), t0() + m(14), t0() + m(24))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn suppressions_ignore_case(store: Arc<dyn Store>) {
    let day = Duration::days(1);
    assert!(
        store
            .suppress("Ana@Example.COM", "unsubscribed", t0())
            .await
            .unwrap()
    );
    assert!(
        !store
            .suppress("ana@example.com", "bounced", t0() + day)
            .await
            .unwrap(),
        "already suppressed"
    );
    assert!(
        store
            .suppress("bo@example.com", "complained", t0() - day)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .suppression("ANA@example.com")
            .await
            .unwrap()
            .as_deref(),
        Some("unsubscribed")
    );
    assert_eq!(store.suppression("cy@example.com").await.unwrap(), None);
    let all = store.suppressions().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| (s.email.as_str(), s.reason.as_str(), s.created_at))
            .collect::<Vec<_>>(),
        [
            ("bo@example.com", "complained", t0() - day),
            ("ana@example.com", "unsubscribed", t0()),
        ],
        "oldest first, stored lower-cased"
    );
    assert_eq!(
        store
            .suppressions_among(&[
                "ANA@EXAMPLE.COM".into(),
                "cy@example.com".into(),
                "Bo@Example.com".into()
            ])
            .await
            .unwrap(),
        HashMap::from([
            ("ana@example.com".to_owned(), "unsubscribed".to_owned()),
            ("bo@example.com".to_owned(), "complained".to_owned()),
        ])
    );
    assert!(store.unsuppress("ana@EXAMPLE.com").await.unwrap());
    assert!(!store.unsuppress("ana@example.com").await.unwrap());
    assert_eq!(store.suppression("ana@example.com").await.unwrap(), None);
    assert_eq!(store.suppressions().await.unwrap().len(), 1);

    // Non-ASCII capitals fold too (SQLite's lower() alone folds ASCII only),
    // so the planner's and the deliverer's lookups find the address.
    assert!(
        store
            .suppress("Ünsub@Example.com", "unsubscribed", t0())
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .suppressions_among(&["ünsub@example.com".into()])
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .suppression("ÜNSUB@example.com")
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.unsuppress("ünsub@EXAMPLE.com").await.unwrap());
}

async fn firings_are_recorded_once_and_run_one_at_a_time_per_schedule(store: Arc<dyn Store>) {
    let day = Duration::days(1);
    let m = Duration::minutes;
    assert!(
        store
            .record_firing("nightly", t0(), "pending", None, t0())
            .await
            .unwrap()
    );
    assert!(
        !store
            .record_firing("nightly", t0(), "pending", None, t0() + m(1))
            .await
            .unwrap(),
        "once, even from another replica"
    );
    assert!(
        store
            .record_firing("nightly", t0() + day, "pending", None, t0() + day)
            .await
            .unwrap()
    );
    assert!(
        store
            .record_firing(
                "nightly",
                t0() - day,
                "skipped",
                Some("missed while down"),
                t0()
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.last_firing("nightly").await.unwrap(),
        Some(t0() + day)
    );
    assert_eq!(store.last_firing("hourly").await.unwrap(), None);

    let now = t0() + day;
    let firing = |schedule: &str, fire_at, holder: &str| engaged::store::Firing {
        schedule: schedule.into(),
        fire_at,
        holder: holder.into(),
    };
    let nightly0 = firing("nightly", t0(), "h1");
    assert_eq!(
        store.claim_firing(now, now + m(10), "h1").await.unwrap(),
        Some(nightly0.clone()),
        "the oldest pending firing"
    );
    assert_eq!(
        store.claim_firing(now, now + m(10), "h2").await.unwrap(),
        None,
        "the next nightly waits while one runs"
    );
    let hourly = firing("hourly", t0() + Duration::hours(1), "h2");
    assert!(
        store
            .record_firing("hourly", hourly.fire_at, "pending", None, now)
            .await
            .unwrap()
    );
    assert_eq!(
        store.claim_firing(now, now + m(10), "h2").await.unwrap(),
        Some(hourly.clone()),
        "another schedule is not held up"
    );
    assert!(
        !store
            .finish_firing(
                &firing("hourly", hourly.fire_at, "h1"),
                "done",
                None,
                None,
                now
            )
            .await
            .unwrap(),
        "only the holder finishes a firing"
    );
    assert!(
        store
            .finish_firing(&hourly, "skipped", None, Some("nothing to do"), now)
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_firing(&hourly, "failed", None, None, now)
            .await
            .unwrap(),
        "a finished firing stays finished"
    );
    // Renewed, the lease holds past its first end; then the claimant dies:
    // its lease ends and the firing is claimed again by another holder.
    assert!(store.renew_firing(&nightly0, now + m(15)).await.unwrap());
    assert_eq!(
        store
            .claim_firing(now + m(11), now + m(21), "h3")
            .await
            .unwrap(),
        None,
        "the renewed lease still holds"
    );
    let nightly0 = firing("nightly", t0(), "h3");
    assert_eq!(
        store
            .claim_firing(now + m(16), now + m(26), "h3")
            .await
            .unwrap(),
        Some(nightly0.clone())
    );
    assert!(
        !store
            .renew_firing(&firing("nightly", t0(), "h1"), now + m(40))
            .await
            .unwrap(),
        "the old holder cannot renew a lease it lost"
    );
    // Committing the run's plan marks its firing done in the same
    // transaction; finishing it afterwards changes nothing.
    let mut commit = plan(t0(), vec![]);
    commit.firing = Some(nightly0.clone());
    let run = store.commit_plan(commit).await.unwrap();
    assert!(
        !store
            .finish_firing(&nightly0, "pending", None, Some("3 sent"), now + m(17))
            .await
            .unwrap()
    );
    // A commit for a firing this holder lost is refused, with nothing stored.
    let mut stale = plan(t0(), vec![]);
    stale.firing = Some(firing("nightly", t0(), "h1"));
    assert!(matches!(
        store.commit_plan(stale).await,
        Err(engaged::store::StoreError::LeaseLost(_))
    ));
    assert_eq!(store.runs(10).await.unwrap().len(), 1, "no second run");
    assert_eq!(
        store
            .claim_firing(now + m(17), now + m(27), "h4")
            .await
            .unwrap(),
        Some(firing("nightly", t0() + day, "h4"))
    );
    let record = |fire_at, status: &str, run_id, note: Option<&str>| FiringRecord {
        schedule: "nightly".into(),
        fire_at,
        status: status.into(),
        run_id,
        note: note.map(str::to_owned),
    };
    assert_eq!(
        store.firings("nightly").await.unwrap(),
        vec![
            record(t0() - day, "skipped", None, Some("missed while down")),
            record(t0(), "done", Some(run.run_id), None),
            record(t0() + day, "running", None, None),
        ]
    );
    assert!(store.firings("weekly").await.unwrap().is_empty());
}

async fn settings_keep_their_first_value(store: Arc<dyn Store>) {
    assert_eq!(
        store.setting_or_init("signing", "first").await.unwrap(),
        "first"
    );
    assert_eq!(
        store.setting_or_init("signing", "second").await.unwrap(),
        "first"
    );
    assert_eq!(
        store.setting_or_init("other", "second").await.unwrap(),
        "second"
    );
    // Many first callers at once agree on one value.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .setting_or_init("raced", &format!("v{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut values = HashSet::new();
    for t in tasks {
        values.insert(t.await.unwrap());
    }
    assert_eq!(values.len(), 1, "{values:?}");
}

async fn large_batches_span_several_statements(store: Arc<dyn Store>) {
    const N: usize = 12_001;
    let mut patches: Vec<CustomerPatch> = (0..N)
        .map(|i| CustomerPatch {
            id: cid(&format!("c{i:05}")),
            email: Some(addr(&format!("c{i:05}@example.com"))),
            ..Default::default()
        })
        .collect();
    // The same customer at both ends of the batch; the repeat names no
    // model, so the one given first is kept.
    patches[0].model = Some(EngagementModel::Hybrid);
    patches.push(CustomerPatch {
        id: cid("c00000"),
        name: Some("First".into()),
        ..Default::default()
    });
    let outcomes = store.upsert_customers(&patches).await.unwrap();
    assert_eq!(
        outcomes.iter().filter(|o| **o == Upsert::Inserted).count(),
        N
    );
    assert_eq!(outcomes[N], Upsert::Updated);
    assert_eq!(store.customer_count().await.unwrap(), N as u64);
    let first = store.customer(&cid("c00000")).await.unwrap().unwrap();
    assert_eq!(first.name.as_deref(), Some("First"));
    assert_eq!(
        first.email.as_ref().map(Email::as_str),
        Some("c00000@example.com")
    );
    assert_eq!(first.model, EngagementModel::Hybrid);
    let other = store.customer(&cid("c00001")).await.unwrap().unwrap();
    assert_eq!(other.model, EngagementModel::LowTouch);

    let events: Vec<Event> = (0..N)
        .map(|i| {
            event(
                &format!("m{i}"),
                &format!("c{:05}", i % 100),
                "login",
                t0() - Duration::seconds(i as i64),
                json!({"i": i}),
            )
        })
        .collect();
    assert_eq!(
        store.insert_events(&events).await.unwrap(),
        EventInsert {
            inserted: N,
            duplicates: 0
        }
    );
    let histories = store
        .histories_in_id_range(&cid("c00000"), &cid("c99999"), t0())
        .await
        .unwrap();
    assert_eq!(histories.len(), 100);
    assert_eq!(histories.iter().map(|(_, h)| h.len()).sum::<usize>(), N);

    let actions: Vec<NewAction> = (0..N)
        .map(|i| email(&format!("c{i:05}"), "welcome", "w"))
        .collect();
    let keys: Vec<String> = actions.iter().map(|a| a.dedup_key.clone()).collect();
    let mut p = plan(t0(), actions.clone());
    p.decisions = (0..N)
        .map(|i| Decision {
            customer_id: cid(&format!("c{i:05}")),
            rule: "news".into(),
            subject: "email news".into(),
            decision: "deferred".into(),
            reason: "cap".into(),
            dedup_key: format!("c{i:05}\u{1f}news"),
        })
        .collect();
    p.escalations = (0..N)
        .map(|i| escalation(&format!("c{i:05}"), "stall", "stuck"))
        .collect();
    let run = store.commit_plan(p).await.unwrap();
    assert_eq!(run.per_rule["welcome"], counts(N, 0));
    assert_eq!(run.per_rule["stall"], counts(N, 0));
    assert_eq!(store.existing_dedup_keys(&keys).await.unwrap().len(), N);
    assert_eq!(store.escalations(true).await.unwrap().len(), N);
    let customers: Vec<CustomerId> = (0..N).map(|i| cid(&format!("c{i:05}"))).collect();
    let caps = store.recent_email_counts(&customers, t0()).await.unwrap();
    assert_eq!(caps.len(), N);
    assert!(caps.values().all(|n| *n == 1));
    let pairs: Vec<(CustomerId, String)> = customers
        .iter()
        .map(|c| (c.clone(), "stall".to_owned()))
        .collect();
    assert_eq!(store.open_escalation_pairs(&pairs).await.unwrap().len(), N);
    assert_eq!(store.outbox_counts().await.unwrap().pending, 2 * N as u64);

    let run2 = store.commit_plan(plan(t0(), actions)).await.unwrap();
    assert_eq!(run2.per_rule["welcome"], counts(0, N));

    let claimed = store
        .claim_due(t0(), t0() + Duration::minutes(5), 2 * N)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2 * N);
    let results: Vec<(i64, AttemptResult)> = claimed
        .iter()
        .map(|i| {
            (
                i.id,
                AttemptResult::Sent {
                    detail: "250 ok".into(),
                },
            )
        })
        .collect();
    store
        .record_attempts(&claimed[0].claim_token, &results, t0())
        .await
        .unwrap();
    assert_eq!(store.outbox_counts().await.unwrap().sent, 2 * N as u64);

    for i in (0..=200).step_by(2) {
        store
            .suppress(&format!("C{i:05}@example.com"), "bounced", t0())
            .await
            .unwrap();
    }
    let emails: Vec<String> = (0..N).map(|i| format!("c{i:05}@example.com")).collect();
    assert_eq!(store.suppressions_among(&emails).await.unwrap().len(), 101);
}

async fn concurrent_claimers_never_get_the_same_action(store: Arc<dyn Store>) {
    const N: usize = 300;
    let actions: Vec<NewAction> = (0..N)
        .map(|i| email(&format!("c{i:03}"), "welcome", "w"))
        .collect();
    store.commit_plan(plan(t0(), actions)).await.unwrap();
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store
                        .claim_due(t0(), t0() + Duration::minutes(10), 7)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    let results: Vec<(i64, AttemptResult)> = batch
                        .iter()
                        .map(|i| {
                            (
                                i.id,
                                AttemptResult::Sent {
                                    detail: "250 ok".into(),
                                },
                            )
                        })
                        .collect();
                    store
                        .record_attempts(&batch[0].claim_token, &results, t0())
                        .await
                        .unwrap();
                    mine.extend(batch.into_iter().map(|i| (i.id, i.attempts)));
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut busy = 0;
    for w in workers {
        let mine = w.await.unwrap();
        busy += usize::from(!mine.is_empty());
        all.extend(mine);
    }
    let distinct: HashSet<i64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(all.len(), N, "claimed {} times for {N} actions", all.len());
    assert_eq!(distinct.len(), N);
    assert!(all.iter().all(|(_, attempts)| *attempts == 1));
    assert!(busy >= 1);
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.sent, counts.pending, counts.sending),
        (N as u64, 0, 0)
    );
}

async fn concurrent_commits_plan_each_key_once(store: Arc<dyn Store>) {
    const KEYS: usize = 200;
    const COMMITS: usize = 6;
    // Each commit names the same keys in a different order (which is what
    // makes concurrent upserts deadlock-prone), plus the same escalations.
    let tasks: Vec<_> = (0..COMMITS)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut actions: Vec<NewAction> = (0..KEYS)
                    .map(|i| email(&format!("c{i:03}"), "welcome", "w"))
                    .collect();
                actions.rotate_left(n * 37);
                if n % 2 == 1 {
                    actions.reverse();
                }
                let mut p = plan(t0(), actions);
                p.escalations = (0..20)
                    .map(|i| escalation(&format!("c{i:03}"), "stall", "stuck"))
                    .collect();
                store.commit_plan(p).await.unwrap()
            })
        })
        .collect();
    let mut planned = 0;
    let mut deduplicated = 0;
    let mut escalated = 0;
    for t in tasks {
        let outcome = t.await.unwrap();
        planned += outcome.per_rule["welcome"].planned;
        deduplicated += outcome.per_rule["welcome"].deduplicated;
        escalated += outcome.per_rule["stall"].planned;
    }
    assert_eq!(planned, KEYS);
    assert_eq!(deduplicated, KEYS * (COMMITS - 1));
    assert_eq!(escalated, 20, "one open escalation per customer and rule");
    assert_eq!(store.escalations(true).await.unwrap().len(), 20);
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(counts.pending, (KEYS + 20) as u64);
    let mut repeats = 0;
    for i in 0..KEYS {
        let a = action_by_key(
            &*store,
            &format!("c{i:03}"),
            &format!("c{i:03}\u{1f}welcome\u{1f}w"),
        )
        .await;
        repeats += a.repeats as usize;
    }
    assert_eq!(repeats, KEYS * (COMMITS - 1));
}

async fn concurrent_imports_insert_each_customer_and_event_once(store: Arc<dyn Store>) {
    const N: usize = 300;
    const IMPORTS: usize = 4;
    // The same customers and events, in a different order per import (as
    // ingestion batches on several replicas would send them).
    let tasks: Vec<_> = (0..IMPORTS)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut patches: Vec<CustomerPatch> = (0..N)
                    .map(|i| CustomerPatch {
                        id: cid(&format!("c{i:03}")),
                        email: Some(addr(&format!("c{i:03}@example.com"))),
                        traits: map(json!({ format!("import{n}"): true })),
                        ..Default::default()
                    })
                    .collect();
                let mut events: Vec<Event> = (0..N)
                    .map(|i| {
                        event(
                            &format!("m{i}"),
                            &format!("c{i:03}"),
                            "login",
                            t0(),
                            json!({}),
                        )
                    })
                    .collect();
                patches.rotate_left(n * 71);
                events.rotate_left(n * 71);
                if n % 2 == 1 {
                    patches.reverse();
                    events.reverse();
                }
                let upserts = store.upsert_customers(&patches).await.unwrap();
                let inserted = store.insert_events(&events).await.unwrap();
                (
                    upserts.iter().filter(|u| **u == Upsert::Inserted).count(),
                    inserted,
                )
            })
        })
        .collect();
    let mut customers_inserted = 0;
    let mut events_inserted = 0;
    let mut duplicates = 0;
    for t in tasks {
        let (c, e) = t.await.unwrap();
        customers_inserted += c;
        events_inserted += e.inserted;
        duplicates += e.duplicates;
    }
    assert_eq!(customers_inserted, N, "each customer is new to one import");
    assert_eq!(events_inserted, N);
    assert_eq!(duplicates, N * (IMPORTS - 1));
    assert_eq!(store.customer_count().await.unwrap(), N as u64);
    // Every import's traits were merged in.
    let c = store.customer(&cid("c123")).await.unwrap().unwrap();
    assert_eq!(c.traits.len(), IMPORTS, "{:?}", c.traits);
    assert_eq!(
        store
            .events_in_id_range(&cid("c000"), &cid("c999"), t0())
            .await
            .unwrap()
            .len(),
        N
    );
}

async fn the_leases_of_a_dead_process_are_released_all_at_once(store: Arc<dyn Store>) {
    let m = Duration::minutes;
    let dead = "boot:ns:41:7";
    // The dead process ran a firing, held the planner lock and had claimed
    // an email; a live one holds another firing.
    for (schedule, fire_at) in [("nightly", t0()), ("hourly", t0())] {
        store
            .record_firing(schedule, fire_at, "pending", None, t0())
            .await
            .unwrap();
    }
    let theirs = store
        .claim_firing(t0(), t0() + m(10), &format!("{dead}/a"))
        .await
        .unwrap()
        .unwrap();
    let ours = store
        .claim_firing(t0(), t0() + m(10), "boot:ns:42:7/b")
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .try_lock_planner(&format!("{dead}/c"), t0(), t0() + m(10))
            .await
            .unwrap()
    );
    store
        .commit_plan(plan(t0(), vec![email("c1", "welcome", "welcome")]))
        .await
        .unwrap();
    let claimed = store.claim_due(t0(), t0() + m(10), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let mut holders = store.lease_holders().await.unwrap();
    holders.sort();
    assert!(holders.contains(&format!("{dead}/a")), "{holders:?}");
    assert!(holders.contains(&format!("{dead}/c")), "{holders:?}");
    assert!(
        holders.contains(&"boot:ns:42:7/b".to_owned()),
        "{holders:?}"
    );
    assert!(holders.contains(&claimed[0].claim_token), "{holders:?}");

    let released = store.release_holder(dead, t0() + m(1)).await.unwrap();
    assert_eq!(released.firings, 1);
    assert!(released.planner_lock);
    // The claim was taken by this test process, not the dead one.
    assert_eq!(released.actions, 0);
    let mine = engaged::liveness::process_of(&claimed[0].claim_token).to_owned();
    let released = store.release_holder(&mine, t0() + m(1)).await.unwrap();
    assert_eq!(released.actions, 1);
    assert_eq!(
        store
            .claim_due(t0() + m(1), t0() + m(11), 10)
            .await
            .unwrap()
            .len(),
        1,
        "the released email is due again at once, not when its lease ends"
    );
    // The dead process's firing can be claimed now; the live one's cannot.
    let again = store
        .claim_firing(t0() + m(1), t0() + m(11), "boot:ns:43:7/d")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.schedule.as_str(), again.fire_at),
        (theirs.schedule.as_str(), theirs.fire_at)
    );
    assert!(store.renew_firing(&ours, t0() + m(12)).await.unwrap());
    assert!(
        store
            .try_lock_planner("boot:ns:43:7/e", t0() + m(1), t0() + m(11))
            .await
            .unwrap(),
        "the planner lock is free"
    );
    assert!(
        store
            .firings(&theirs.schedule)
            .await
            .unwrap()
            .iter()
            .all(|f| f.status == "running")
    );
}

/// Customers `ids` in the store (ids only).
async fn some_customers(store: &dyn Store, ids: &[&str]) {
    let patches: Vec<CustomerPatch> = ids
        .iter()
        .map(|id| CustomerPatch {
            id: cid(id),
            ..Default::default()
        })
        .collect();
    store.upsert_customers(&patches).await.unwrap();
}

fn spec(changed_since: Option<DateTime<Utc>>) -> RunSpec {
    RunSpec {
        now: t0(),
        only_rules: None,
        changed_since,
        base_customers: 4,
    }
}

/// A partition's commit: `actions` for partition `p`, with `summary`.
fn partition_plan(p: &Partition, actions: Vec<NewAction>, summary: Value) -> PlanCommit {
    let mut commit = plan(t0(), actions);
    commit.partition = Some(PartitionDone {
        run_id: p.run_id,
        index: p.index,
        holder: p.holder.clone(),
        summary,
    });
    commit
}

async fn a_run_planned_in_partitions_stages_its_emails_until_its_guard_decision(
    store: Arc<dyn Store>,
) {
    let m = Duration::minutes;
    some_customers(&*store, &["c1", "c2", "c3", "c4"]).await;
    let (run, partitions) = store
        .begin_run("test", &spec(None), t0(), 2, None)
        .await
        .unwrap();
    assert_eq!(partitions, 2);
    let record = &store.runs(10).await.unwrap()[0];
    assert_eq!(record.status, "planning");
    assert_eq!((record.partitions_done, record.partitions), (0, 2));
    // Two partitions: c1..c2 (from the start of the id space) and c3 on.
    let first = store
        .claim_partition(Some(run), "h1/x", t0(), t0() + m(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.index, first.start.as_str()), (0, ""));
    assert_eq!(first.end.as_deref(), Some("c3"));
    assert_eq!(first.spec, spec(None));
    let ids: Vec<String> = store
        .partition_customers(&first)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(ids, ["c1", "c2"]);
    let mut commit = partition_plan(
        &first,
        vec![
            email("c1", "welcome", "welcome"),
            email("c1", "promo", "spring"),
            webhook("c1", "crm", "crm"),
            tag("c1", "level", "explorer"),
        ],
        json!({"customers": 2}),
    );
    commit.escalations = vec![escalation("c1", "stalled", "no login")];
    let out = store.commit_plan(commit).await.unwrap();
    assert_eq!(out.run_id, run);
    // While it plans, the run shows how far it got.
    let record = &store.runs(10).await.unwrap()[0];
    assert_eq!((record.partitions_done, record.partitions), (1, 2));
    assert!(store.runs_ready_to_finish().await.unwrap().is_empty());
    assert!(matches!(
        store.finish_plan(run, &BTreeMap::new(), &json!({})).await,
        Err(engaged::store::StoreError::LeaseLost(_))
    ));
    let second = store
        .claim_partition(None, "h2/y", t0(), t0() + m(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.run_id, second.index), (run, 1));
    assert_eq!(second.end, None);
    assert!(
        store
            .claim_partition(None, "h3/z", t0(), t0() + m(1))
            .await
            .unwrap()
            .is_none(),
        "both are claimed"
    );
    store
        .commit_plan(partition_plan(
            &second,
            vec![
                email("c3", "welcome", "welcome"),
                email("c3", "promo", "spring"),
            ],
            json!({"customers": 2}),
        ))
        .await
        .unwrap();
    let parts = store.run_partitions(run).await.unwrap();
    assert!(parts.iter().all(|p| p.status == "done"));
    assert_eq!(parts[0].summary, Some(json!({"customers": 2})));
    assert_eq!(parts[1].holder.as_deref(), Some("h2/y"));
    assert_eq!(parts[0].counts.as_ref().unwrap()["welcome"], counts(1, 0));
    let ready = store.runs_ready_to_finish().await.unwrap();
    assert_eq!(ready.len(), 1);
    assert_eq!((ready[0].id, ready[0].spec.clone()), (run, spec(None)));

    // Staged emails are not delivered; the webhook and the notice are.
    let due = store.claim_due(t0(), t0() + m(10), 100).await.unwrap();
    let mut kinds: Vec<&str> = due.iter().map(|i| i.kind.as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["escalation_notice", "webhook"]);
    // They count against the frequency cap and are known to dedup.
    let recent = store
        .recent_email_counts(&[cid("c1"), cid("c3")], t0() - m(1))
        .await
        .unwrap();
    assert_eq!(recent.get(&cid("c1")), Some(&2));
    let keys = vec![email("c3", "promo", "spring").dedup_key];
    assert_eq!(store.existing_dedup_keys(&keys).await.unwrap().len(), 1);
    // Tags are applied at once.
    assert_eq!(
        store.tags_of(&[cid("c1"), cid("c2")]).await.unwrap().len(),
        1
    );

    // The guard holds `promo`; `welcome` is released.
    let hold = BTreeMap::from([("promo".to_owned(), "held by the guard".to_owned())]);
    let held = store
        .finish_plan(run, &hold, &json!({"customers": 4}))
        .await
        .unwrap();
    assert_eq!(held, BTreeMap::from([("promo".to_owned(), 2)]));
    let due = store.claim_due(t0(), t0() + m(10), 100).await.unwrap();
    let subjects: Vec<String> = due
        .iter()
        .map(|i| format!("{} {}", i.customer_id, i.rule))
        .collect();
    assert_eq!(subjects, ["c1 welcome", "c3 welcome"]);
    let record = &store.runs(10).await.unwrap()[0];
    assert_eq!(record.status, "held");
    assert_eq!(record.summary, json!({"customers": 4}), "the final summary");
    assert_eq!(record.held.get("promo"), Some(&2));
    // A finished run is not finished twice and takes no late commit.
    assert!(matches!(
        store.finish_plan(run, &BTreeMap::new(), &json!({})).await,
        Err(engaged::store::StoreError::LeaseLost(_))
    ));
    let late = partition_plan(&second, vec![email("c4", "welcome", "welcome")], json!({}));
    assert!(matches!(
        store.commit_plan(late).await,
        Err(engaged::store::StoreError::LeaseLost(_))
    ));
    // The open escalations of some customers.
    assert_eq!(
        store.open_escalations_of(&[cid("c1")]).await.unwrap().len(),
        1
    );
    assert!(
        store
            .open_escalations_of(&[cid("c2"), cid("c3")])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_partition_whose_holder_stopped_is_taken_over_and_committed_once(store: Arc<dyn Store>) {
    let s = Duration::seconds;
    some_customers(&*store, &["c1", "c2", "c3", "c4"]).await;
    let (run, _) = store
        .begin_run("test", &spec(None), t0(), 2, None)
        .await
        .unwrap();
    let slow = store
        .claim_partition(Some(run), "slow/a", t0(), t0() + s(15))
        .await
        .unwrap()
        .unwrap();
    // Renewed leases keep it the slow holder's.
    assert_eq!(
        store
            .renew_partitions("slow/a", t0() + s(30))
            .await
            .unwrap(),
        1
    );
    let other = store
        .claim_partition(Some(run), "fast/b", t0() + s(20), t0() + s(35))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.index, 1, "the renewed one is skipped");
    assert!(
        store
            .claim_partition(Some(run), "fast/b", t0() + s(20), t0() + s(35))
            .await
            .unwrap()
            .is_none()
    );
    // Its lease ends: the partition is taken over.
    let taken = store
        .claim_partition(Some(run), "fast/c", t0() + s(31), t0() + s(46))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.index, slow.index);
    // The slow holder's commit is refused and leaves nothing.
    assert!(matches!(
        store
            .commit_plan(partition_plan(
                &slow,
                vec![email("c1", "welcome", "welcome")],
                json!({})
            ))
            .await,
        Err(engaged::store::StoreError::LeaseLost(_))
    ));
    assert!(
        store
            .actions_for_customer(&cid("c1"))
            .await
            .unwrap()
            .is_empty()
    );
    let out = store
        .commit_plan(partition_plan(
            &taken,
            vec![email("c1", "welcome", "welcome")],
            json!({}),
        ))
        .await
        .unwrap();
    assert_eq!(out.per_rule["welcome"], counts(1, 0));
    let parts = store.run_partitions(run).await.unwrap();
    assert_eq!((parts[0].status.as_str(), parts[0].claims), ("done", 2));
    assert_eq!(parts[0].holder.as_deref(), Some("fast/c"));
    // A dead holder's claims are released at once (see `liveness`).
    assert!(
        store
            .lease_holders()
            .await
            .unwrap()
            .contains(&"fast/b".to_owned())
    );
    let released = store.release_holder("fast", t0() + s(32)).await.unwrap();
    assert_eq!(released.partitions, 1);
    let again = store
        .claim_partition(None, "next/d", t0() + s(32), t0() + s(47))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.run_id, again.index), (run, 1));
}

async fn a_run_over_what_changed_covers_only_the_customers_changed_since(store: Arc<dyn Store>) {
    some_customers(&*store, &["c1", "c2", "c3", "c4"]).await;
    // Every change before the last run began was seen by it.
    assert_eq!(
        store.changes_seen_by_last_run("schedule:x").await.unwrap(),
        None
    );
    let (first, _) = store
        .begin_run("schedule:x", &spec(None), Utc::now(), 100, None)
        .await
        .unwrap();
    let seen = store
        .changes_seen_by_last_run("schedule:x")
        .await
        .unwrap()
        .unwrap();
    assert!(seen <= Utc::now());
    assert_eq!(
        store.changes_seen_by_last_run("schedule:y").await.unwrap(),
        None
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // Since then: an event for c3, an update of c1, and an event of a
    // customer not known yet.
    let since = Utc::now();
    store
        .insert_events(&[
            event("m1", "c3", "login", t0(), json!({})),
            event("m2", "zz", "login", t0(), json!({})),
        ])
        .await
        .unwrap();
    some_customers(&*store, &["c1"]).await;
    let (run, partitions) = store
        .begin_run("schedule:x", &spec(Some(since)), Utc::now(), 1, None)
        .await
        .unwrap();
    assert!(run > first);
    assert_eq!(partitions, 3, "c1, c3 and zz changed");
    let mut seen_ids = Vec::new();
    while let Some(p) = store
        .claim_partition(Some(run), "h/a", t0(), t0() + Duration::minutes(1))
        .await
        .unwrap()
    {
        for c in store.partition_customers(&p).await.unwrap() {
            seen_ids.push(c.id.to_string());
        }
    }
    assert_eq!(seen_ids, ["c1", "c3"], "zz is not a customer yet");
    let histories = store
        .histories_of(&[cid("c3"), cid("c1")], t0())
        .await
        .unwrap();
    assert_eq!(histories.len(), 1);
    assert_eq!(histories[0].0, cid("c3"));
}
