//! Domain types, parsed once at the edge (import, HTTP, config) so the rest
//! of the code never handles a raw string where a customer id or an email
//! address is meant.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest customer id we accept; Segment user ids are usually far shorter.
const MAX_ID_LEN: usize = 256;

/// A customer's id as given by the importing system (Segment's `userId`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    /// Parses an id: non-empty, at most 256 bytes, no control characters.
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let id = raw.trim();
        if id.is_empty() {
            return Err(DomainError::EmptyId);
        }
        if id.len() > MAX_ID_LEN {
            return Err(DomainError::IdTooLong(id.len()));
        }
        if id.chars().any(char::is_control) {
            return Err(DomainError::ControlCharacter("id"));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<CustomerId> for String {
    fn from(id: CustomerId) -> Self {
        id.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A syntactically valid email address (`local@domain`), lower-cased domain,
/// with nothing in it that could inject a header or a second recipient.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let s = raw.trim();
        let invalid = || DomainError::InvalidEmail(raw.chars().take(80).collect());
        if s.len() > 254 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid());
        }
        if s.contains([',', ';', '<', '>', '"', '(', ')', '[', ']', '\\']) {
            return Err(invalid());
        }
        let (local, domain) = s.rsplit_once('@').ok_or_else(invalid)?;
        if local.is_empty() || local.len() > 64 || local.contains('@') {
            return Err(invalid());
        }
        // Validate the domain as it will be stored: lower-casing can change
        // characters (`İ` becomes `i` + a combining dot), and what we store
        // must parse again.
        let domain = domain.to_lowercase();
        let labels_ok = domain.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
        if !domain.contains('.') || !labels_ok {
            return Err(invalid());
        }
        Ok(Self(format!("{local}@{domain}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after `@`.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
    }
}

impl TryFrom<String> for Email {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Email> for String {
    fn from(e: Email) -> Self {
        e.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How much human touch a customer gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngagementModel {
    #[default]
    LowTouch,
    HighTouch,
    Hybrid,
}

impl EngagementModel {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        match raw.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "low-touch" | "low" | "lowtouch" => Ok(Self::LowTouch),
            "high-touch" | "high" | "hightouch" => Ok(Self::HighTouch),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(DomainError::InvalidModel(raw.chars().take(40).collect())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowTouch => "low-touch",
            Self::HighTouch => "high-touch",
            Self::Hybrid => "hybrid",
        }
    }
}

/// Validates an IANA time zone name.
pub fn parse_timezone(raw: &str) -> Result<chrono_tz::Tz, DomainError> {
    raw.trim()
        .parse::<chrono_tz::Tz>()
        .map_err(|_| DomainError::InvalidTimezone(raw.chars().take(60).collect()))
}

/// A customer as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    /// Absent for customers known only from `identify` calls without an email.
    pub email: Option<Email>,
    pub name: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
    pub model: EngagementModel,
    pub owner: Option<Email>,
    /// Everything else we know about the customer (CSV extra columns, Segment traits).
    pub traits: serde_json::Map<String, serde_json::Value>,
}

/// A partial update to a customer, as an import row or an `identify` call carries it.
/// `None` means "leave as is".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CustomerPatch {
    pub id: CustomerId,
    pub email: Option<Email>,
    pub name: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
    pub model: Option<EngagementModel>,
    pub owner: Option<Email>,
    pub traits: serde_json::Map<String, serde_json::Value>,
}

/// One tracked event (Segment `track`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub message_id: String,
    pub customer_id: CustomerId,
    pub name: String,
    pub properties: serde_json::Value,
    pub at: DateTime<Utc>,
}

/// Errors from parsing domain values at the edge.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DomainError {
    #[error("id is empty")]
    EmptyId,
    #[error("id is {0} bytes long; at most 256 are allowed")]
    IdTooLong(usize),
    #[error("{0} contains a control character")]
    ControlCharacter(&'static str),
    #[error("invalid email address {0:?}")]
    InvalidEmail(String),
    #[error("unknown engagement model {0:?}; use low-touch, high-touch or hybrid")]
    InvalidModel(String),
    #[error("unknown time zone {0:?}; use an IANA name such as Europe/Zagreb")]
    InvalidTimezone(String),
    #[error("invalid timestamp {0:?}; use RFC 3339, e.g. 2026-03-01T09:30:00Z")]
    InvalidTimestamp(String),
}

/// Parses RFC 3339 (with any offset) or a bare date (`2026-03-01`, midnight UTC).
/// Rejects years outside 1970..=2200 so a typo cannot place an event in the far future.
pub fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, DomainError> {
    let s = raw.trim();
    let parsed = DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").map(|n| n.and_utc())
        })
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
        })
        .map_err(|_| DomainError::InvalidTimestamp(s.chars().take(60).collect()))?;
    use chrono::Datelike;
    if !(1970..=2200).contains(&parsed.year()) {
        return Err(DomainError::InvalidTimestamp(s.chars().take(60).collect()));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_parsed_and_domains_lowercased() {
        assert_eq!(
            Email::parse(" Ana@Example.COM ").unwrap().as_str(),
            "Ana@example.com"
        );
        for bad in [
            "",
            "no-at",
            "a@b",
            "a@@b.com",
            "a@b.com\r\nBcc: x@y.com",
            "a b@c.com",
            "a@b.com,c@d.com",
            "<a@b.com>",
            "a@\u{130}x.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ids_reject_control_characters_and_empties() {
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse("a\nb").is_err());
        assert_eq!(CustomerId::parse(" c1 ").unwrap().as_str(), "c1");
    }

    #[test]
    fn timestamps_accept_offsets_and_reject_far_future() {
        let t = parse_timestamp("2026-03-01T10:00:00.123+02:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-03-01T08:00:00.123+00:00");
        assert!(parse_timestamp("2026-03-01").is_ok());
        assert!(parse_timestamp("9999-01-01T00:00:00Z").is_err());
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn models_accept_common_spellings() {
        assert_eq!(
            EngagementModel::parse("Low_Touch").unwrap(),
            EngagementModel::LowTouch
        );
        assert!(EngagementModel::parse("medium").is_err());
    }
}
