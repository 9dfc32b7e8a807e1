//! What rules ask for (`PlannedAction`) and how each request becomes an outbox
//! entry with a dedup key. Pure: no I/O, no clock.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{Customer, CustomerId, Email};

/// What one rule asked for one customer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedAction {
    pub rule: String,
    pub customer_id: CustomerId,
    #[serde(flatten)]
    pub kind: ActionRequest,
}

/// The four things a rule can do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionRequest {
    Email {
        template: String,
        /// Dedup key: `vars.key` when given, else the template name.
        key: String,
        vars: Map<String, Value>,
    },
    Escalate {
        reason: String,
    },
    Tag {
        name: String,
    },
    Webhook {
        name: String,
        payload: Value,
    },
}

impl ActionRequest {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Email { .. } => "email",
            Self::Escalate { .. } => "escalate",
            Self::Tag { .. } => "tag",
            Self::Webhook { .. } => "webhook",
        }
    }
}

/// Kinds of rows in the outbox (what delivery acts on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// Marketing email to the customer.
    Email,
    /// Operational email to the escalation's owner.
    EscalationNotice,
    Webhook,
    /// Applied when the plan is committed; nothing to deliver.
    Tag,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::EscalationNotice => "escalation_notice",
            Self::Webhook => "webhook",
            Self::Tag => "tag",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "email" => Self::Email,
            "escalation_notice" => Self::EscalationNotice,
            "webhook" => Self::Webhook,
            "tag" => Self::Tag,
            _ => return None,
        })
    }
}

/// Payload of a customer email: everything needed to render it later, so a
/// retry renders the same facts that triggered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmailPayload {
    pub template: String,
    pub key: String,
    pub vars: Map<String, Value>,
    pub customer: Customer,
}

/// Payload of an escalation notice to a human.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EscalationPayload {
    pub escalation_id: i64,
    pub rule: String,
    pub reason: String,
    pub owner: Email,
    pub customer: Customer,
    /// Key facts for the notice (signup age, recent activity…).
    pub facts: Map<String, Value>,
    /// 0 for the first notice; n for the n-th reminder.
    #[serde(default)]
    pub reminder: u32,
    /// Why it came to the default owner instead of the customer's owner.
    #[serde(default)]
    pub overflow: Option<String>,
}

/// Payload of a webhook call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WebhookPayload {
    pub name: String,
    pub rule: String,
    pub customer_id: CustomerId,
    pub payload: Value,
}

/// The dedup key of a planned action. Two actions with the same key are the
/// same action: the second is never delivered.
///
/// - email: once per (customer, rule, key), ever;
/// - tag: once per (customer, tag);
/// - webhook: once per (customer, rule, name, `payload.key` or the payload itself).
///
/// Escalations are deduplicated by the store (one *open* escalation per
/// customer and rule), so they have no key here.
pub fn dedup_key(action: &PlannedAction) -> Option<String> {
    let c = action.customer_id.as_str();
    let r = &action.rule;
    match &action.kind {
        ActionRequest::Email { key, .. } => Some(format!("email\u{1f}{c}\u{1f}{r}\u{1f}{key}")),
        ActionRequest::Tag { name } => Some(format!("tag\u{1f}{c}\u{1f}{name}")),
        ActionRequest::Webhook { name, payload } => {
            let discriminator = match payload.get("key") {
                Some(Value::String(k)) => k.clone(),
                Some(other) => other.to_string(),
                None => short_hash(&payload.to_string()),
            };
            Some(format!(
                "webhook\u{1f}{c}\u{1f}{r}\u{1f}{name}\u{1f}{discriminator}"
            ))
        }
        ActionRequest::Escalate { .. } => None,
    }
}

/// A short, stable, non-cryptographic digest (FNV-1a) for keys and ids.
pub fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action(kind: ActionRequest) -> PlannedAction {
        PlannedAction {
            rule: "r".into(),
            customer_id: CustomerId::parse("c1").unwrap(),
            kind,
        }
    }

    #[test]
    fn email_keys_differ_by_key_not_by_vars() {
        let a = action(ActionRequest::Email {
            template: "t".into(),
            key: "k".into(),
            vars: Map::new(),
        });
        let mut vars = Map::new();
        vars.insert("x".into(), json!(1));
        let b = action(ActionRequest::Email {
            template: "t".into(),
            key: "k".into(),
            vars,
        });
        let c = action(ActionRequest::Email {
            template: "t".into(),
            key: "k2".into(),
            vars: Map::new(),
        });
        assert_eq!(dedup_key(&a), dedup_key(&b));
        assert_ne!(dedup_key(&a), dedup_key(&c));
    }

    #[test]
    fn webhook_keys_use_payload_key_or_content() {
        let w = |p| {
            dedup_key(&action(ActionRequest::Webhook {
                name: "crm".into(),
                payload: p,
            }))
        };
        assert_eq!(
            w(json!({"key": "a", "n": 1})),
            w(json!({"key": "a", "n": 2}))
        );
        assert_ne!(w(json!({"n": 1})), w(json!({"n": 2})));
        assert_eq!(w(json!({"n": 1})), w(json!({"n": 1})));
    }
}
