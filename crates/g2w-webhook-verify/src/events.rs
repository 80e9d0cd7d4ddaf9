//! The four GoToWebinar events, typed. Keys are integers (int64) as in real payloads; fields this crate does not
//! name are kept in `extra`, so nothing a newer payload carries is lost.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One delivered event.
///
/// ```
/// use g2w_webhook_verify::Event;
/// let body = br#"{"eventName":"webinar.created","eventKey":"k1","webinarKey":2456981187019095056,
///   "organizerKey":5064544480539859206,"times":[{"startTime":"2020-08-25T20:00:00Z","endTime":"2020-08-25T21:00:00Z"}],
///   "status":"NEW","custom":1}"#;
/// match Event::parse(body)? {
///     Event::WebinarCreated(w) => {
///         assert_eq!(w.webinar_key, 2456981187019095056);
///         assert_eq!(w.times[0].start_time, "2020-08-25T20:00:00Z");
///         assert_eq!(w.extra["custom"], 1);
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "eventName")]
pub enum Event {
    #[serde(rename = "registrant.added")]
    RegistrantAdded(RegistrantAdded),
    #[serde(rename = "registrant.joined")]
    RegistrantJoined(RegistrantJoined),
    #[serde(rename = "webinar.created")]
    WebinarCreated(Webinar),
    #[serde(rename = "webinar.changed")]
    WebinarChanged(Webinar),
}

impl Event {
    /// Parses a delivery's raw body.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    fn common(&self) -> &Common {
        match self {
            Event::RegistrantAdded(e) => &e.common,
            Event::RegistrantJoined(e) => &e.common,
            Event::WebinarCreated(e) | Event::WebinarChanged(e) => &e.common,
        }
    }

    /// The event's unique key: de-duplicate deliveries on it (delivery is at-least-once).
    pub fn event_key(&self) -> Option<&str> {
        self.common().event_key.as_deref()
    }

    /// When the event happened (ISO-8601).
    pub fn timestamp(&self) -> Option<&str> {
        self.common().timestamp.as_deref()
    }

    /// The event name, e.g. `registrant.added`.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RegistrantAdded(_) => "registrant.added",
            Event::RegistrantJoined(_) => "registrant.joined",
            Event::WebinarCreated(_) => "webinar.created",
            Event::WebinarChanged(_) => "webinar.changed",
        }
    }
}

/// Fields every event carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Common {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// One session of a webinar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Times {
    pub start_time: String,
    pub end_time: String,
}

/// `webinar.created` and `webinar.changed` (whose `status` is `UPDATED` or `DELETED`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webinar {
    #[serde(flatten)]
    pub common: Common,
    pub webinar_key: i64,
    pub organizer_key: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_key: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webinar_title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default)]
    pub times: Vec<Times>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Fields not named above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `registrant.added`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrantAdded {
    #[serde(flatten)]
    pub common: Common,
    pub webinar_key: i64,
    pub registrant_key: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webinar_creator_key: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webinar_title: Option<String>,
    /// Fields not named above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `registrant.joined` (`joinTime` is epoch milliseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrantJoined {
    #[serde(flatten)]
    pub common: Common,
    pub webinar_key: i64,
    pub registrant_key: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webinar_creator_key: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Fields not named above, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
