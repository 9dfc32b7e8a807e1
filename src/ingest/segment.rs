//! Segment-spec messages (`identify`, `track`) → domain values. Pure; shared
//! by the JSON-lines importer and the HTTP API. Unknown fields are ignored,
//! as Segment does.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::domain::{
    CustomerId, CustomerPatch, Email, EngagementModel, Event, parse_timestamp, parse_timezone,
};
use crate::plan::short_hash;

/// Longest event name we accept.
const MAX_EVENT_NAME: usize = 200;

/// One parsed message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Identify {
        patch: CustomerPatch,
        warnings: Vec<String>,
    },
    Track(Event),
    /// A valid message of a type engaged does not use (`page`, `screen`, …).
    Ignored(String),
}

/// Parses one message. `received_at` stands in for a missing `timestamp`;
/// a missing `messageId` is derived from the message content, so importing
/// the same file twice still deduplicates.
pub fn parse_message(v: &Value, received_at: DateTime<Utc>) -> Result<Message, String> {
    let obj = v.as_object().ok_or("a message must be a JSON object")?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or("missing \"type\" (identify or track)")?;
    let kind = kind.to_ascii_lowercase();
    if !matches!(kind.as_str(), "identify" | "track") {
        return Ok(Message::Ignored(kind));
    }
    let user_id = match obj.get("userId") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("missing \"userId\" (anonymous-only messages are not used)".into()),
    };
    let customer_id = CustomerId::parse(&user_id).map_err(|e| format!("userId: {e}"))?;
    let at = match obj.get("timestamp") {
        Some(Value::String(s)) => parse_timestamp(s).map_err(|e| format!("timestamp: {e}"))?,
        None | Some(Value::Null) => received_at,
        Some(_) => return Err("timestamp must be an RFC 3339 string".into()),
    };
    match kind.as_str() {
        "track" => {
            let name = obj
                .get("event")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or("a track message needs an \"event\" name")?;
            if name.len() > MAX_EVENT_NAME || name.chars().any(char::is_control) {
                return Err(format!(
                    "event name must be 1 to {MAX_EVENT_NAME} characters without control characters"
                ));
            }
            let properties = match obj.get("properties") {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => return Err("\"properties\" must be an object".into()),
            };
            let message_id = message_id(obj, v)?;
            Ok(Message::Track(Event {
                message_id,
                customer_id,
                name: name.to_owned(),
                properties,
                at,
            }))
        }
        _ => {
            let traits = match obj.get("traits") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(t)) => t.clone(),
                Some(_) => return Err("\"traits\" must be an object".into()),
            };
            let (patch, warnings) = patch_from_traits(customer_id, traits)?;
            Ok(Message::Identify { patch, warnings })
        }
    }
}

fn message_id(obj: &Map<String, Value>, whole: &Value) -> Result<String, String> {
    match obj.get("messageId") {
        Some(Value::String(s)) if !s.trim().is_empty() => {
            if s.len() > 256 {
                Err("messageId is longer than 256 characters".into())
            } else {
                Ok(s.clone())
            }
        }
        None | Some(Value::Null) => Ok(format!("auto-{}", short_hash(&whole.to_string()))),
        Some(_) => Err("messageId must be a non-empty string".into()),
    }
}

/// Maps identify traits onto customer fields: `email`, `name`, `createdAt`
/// (or `created_at`), `timezone`, `model`, `owner`; other traits stay traits.
/// A bad email, model or owner rejects the message; a bad time zone is
/// dropped with a warning.
pub fn patch_from_traits(
    id: CustomerId,
    mut traits: Map<String, Value>,
) -> Result<(CustomerPatch, Vec<String>), String> {
    let mut warnings = Vec::new();
    // Returns the value and the key it was found under (for error messages).
    let mut take = |keys: &[&str]| -> Option<(String, &'static str)> {
        let mut found = None;
        for k in keys {
            if let Some(v) = traits.remove(*k) {
                let key: &'static str = match *k {
                    "createdAt" => "createdAt",
                    "created_at" => "created_at",
                    _ => "",
                };
                found = match v {
                    Value::String(s) if !s.trim().is_empty() => Some((s, key)),
                    Value::Null | Value::String(_) => found,
                    other => Some((other.to_string(), key)),
                };
            }
        }
        found
    };
    let email = take(&["email"])
        .map(|(e, _)| Email::parse(&e).map_err(|e| format!("email: {e}")))
        .transpose()?;
    let name = take(&["name"]).map(|(n, _)| n);
    let created_at = take(&["createdAt", "created_at"])
        .map(|(t, key)| parse_timestamp(&t).map_err(|e| format!("{key}: {e}")))
        .transpose()?;
    let timezone = match take(&["timezone"]) {
        Some((tz, _)) => match parse_timezone(&tz) {
            Ok(tz) => Some(tz.name().to_owned()),
            Err(e) => {
                warnings.push(format!("{e}; the customer is kept without a time zone"));
                None
            }
        },
        None => None,
    };
    let model = take(&["model"])
        .map(|(m, _)| EngagementModel::parse(&m).map_err(|e| format!("model: {e}")))
        .transpose()?;
    let owner = take(&["owner"])
        .map(|(o, _)| Email::parse(&o).map_err(|e| format!("owner: {e}")))
        .transpose()?;
    if let Some(n) = &name
        && n.chars().count() > 500
    {
        return Err("name is longer than 500 characters".into());
    }
    Ok((
        CustomerPatch {
            id,
            email,
            name: name.map(|n| n.trim().to_owned()),
            created_at,
            timezone,
            model,
            owner,
            traits,
        },
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_timestamp("2026-06-01T00:00:00Z").unwrap()
    }

    #[test]
    fn a_real_sdk_track_payload_parses() {
        let v = json!({
            "type": "track", "userId": "u1", "anonymousId": null, "event": "Order Completed",
            "properties": {"total": 9.5}, "context": {"library": {"name": "analytics-node"}},
            "integrations": {}, "timestamp": "2026-05-01T10:00:00.123+02:00",
            "sentAt": "2026-05-01T10:00:01.000Z", "messageId": "m1", "writeKey": "k"
        });
        let Message::Track(e) = parse_message(&v, now()).unwrap() else {
            panic!()
        };
        assert_eq!(e.name, "Order Completed");
        assert_eq!(e.at.to_rfc3339(), "2026-05-01T08:00:00.123+00:00");
        assert_eq!(e.message_id, "m1");
    }

    #[test]
    fn identify_maps_known_traits_and_keeps_the_rest() {
        let v = json!({"type": "identify", "userId": 42, "traits": {
            "email": "A@Example.com", "name": "Ana", "createdAt": "2026-01-01T00:00:00Z",
            "timezone": "Mars/Olympus", "model": "hybrid", "plan": "pro"}});
        let Message::Identify { patch, warnings } = parse_message(&v, now()).unwrap() else {
            panic!()
        };
        assert_eq!(patch.id.as_str(), "42");
        assert_eq!(patch.email.unwrap().as_str(), "A@example.com");
        assert_eq!(patch.model, Some(EngagementModel::Hybrid));
        assert_eq!(patch.timezone, None);
        assert_eq!(warnings.len(), 1);
        assert_eq!(patch.traits.get("plan"), Some(&json!("pro")));
    }

    #[test]
    fn malformed_messages_say_why() {
        for (v, why) in [
            (json!([1]), "object"),
            (json!({"userId": "u"}), "type"),
            (json!({"type": "track", "event": "x"}), "userId"),
            (json!({"type": "track", "userId": "u"}), "event"),
            (
                json!({"type": "track", "userId": "u", "event": "x", "timestamp": "soon"}),
                "timestamp",
            ),
            (
                json!({"type": "identify", "userId": "u", "traits": {"email": "nope"}}),
                "email",
            ),
        ] {
            let e = parse_message(&v, now()).unwrap_err();
            assert!(e.contains(why), "{e} should mention {why}");
        }
        assert_eq!(
            parse_message(&json!({"type": "page", "userId": "u"}), now()).unwrap(),
            Message::Ignored("page".into())
        );
    }
}
