//! Events as publishers send them: validation, and the exact bytes subscribers receive.
//!
//! The body is the publisher's JSON object byte for byte; fields the service fills in (`eventKey`, `timestamp`,
//! `eventVersion`, `product`) are prepended when absent, so nothing the publisher sent is reformatted.

use bytes::Bytes;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::delivery::NewEvent;
use crate::domain::{format_ms, now_ms, EventName};
use crate::error::{Error, Result};

/// Most events one publish request may carry.
pub const MAX_BATCH: usize = 1000;

/// Fields that carry GoTo keys: JSON integers (int64) wherever they appear at the top level.
const KEY_FIELDS: [&str; 6] = [
    "webinarKey",
    "organizerKey",
    "accountKey",
    "registrantKey",
    "webinarCreatorKey",
    "sessionKey",
];

/// Parses a publish body: one event object or an array of up to `MAX_BATCH`.
pub fn parse_batch(body: &[u8]) -> Result<Vec<NewEvent>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let raws: Vec<&RawValue> =
        match first {
            None => {
                return Err(Error::bad_request(
                    "a JSON body is required: one event or an array of events",
                ))
            }
            Some(b'[') => serde_json::from_slice(body)
                .map_err(|e| Error::bad_request(format!("the body is not valid JSON: {e}")))?,
            Some(_) => vec![serde_json::from_slice(body)
                .map_err(|e| Error::bad_request(format!("the body is not valid JSON: {e}")))?],
        };
    if raws.is_empty() {
        return Err(Error::bad_request("body: the array holds no events"));
    }
    if raws.len() > MAX_BATCH {
        return Err(Error::bad_request(format!(
            "body: {} events in one request; the limit is {MAX_BATCH}",
            raws.len()
        )));
    }
    let many = raws.len() > 1 || first == Some(&b'[');
    raws.iter()
        .enumerate()
        .map(|(i, raw)| parse_event(raw, many.then_some(i)))
        .collect()
}

/// The top-level fields the service reads, borrowed from the request body; every other field is skipped
/// without being parsed into values.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields<'a> {
    #[serde(default, borrow)]
    event_name: Field<'a>,
    #[serde(default, borrow)]
    event_key: Field<'a>,
    #[serde(default, borrow)]
    timestamp: Field<'a>,
    #[serde(default, borrow)]
    event_version: Field<'a>,
    #[serde(default, borrow)]
    product: Field<'a>,
    #[serde(default, borrow)]
    webinar_key: Field<'a>,
    #[serde(default, borrow)]
    organizer_key: Field<'a>,
    #[serde(default, borrow)]
    account_key: Field<'a>,
    #[serde(default, borrow)]
    registrant_key: Field<'a>,
    #[serde(default, borrow)]
    webinar_creator_key: Field<'a>,
    #[serde(default, borrow)]
    session_key: Field<'a>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        match name {
            "webinarKey" => self.webinar_key.0,
            "organizerKey" => self.organizer_key.0,
            "accountKey" => self.account_key.0,
            "registrantKey" => self.registrant_key.0,
            "webinarCreatorKey" => self.webinar_creator_key.0,
            "sessionKey" => self.session_key.0,
            _ => None,
        }
    }
}

/// A field as it was sent, `null` included (absent is `None`).
#[derive(Default)]
struct Field<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|raw| Field(Some(raw)))
    }
}

/// A JSON string's value; None for any other JSON value.
fn as_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str(raw.get()).ok()
}

/// Validates one event; `index` is its place in an array, named in errors.
fn parse_event(raw: &RawValue, index: Option<usize>) -> Result<NewEvent> {
    let bad = |msg: String| match index {
        Some(i) => Error::bad_request(format!("[{i}].{msg}")),
        None => Error::bad_request(msg),
    };
    let text = raw.get();
    let fields: Fields = serde_json::from_str(text).map_err(|e| {
        if text.starts_with('{') {
            bad(format!("{e}"))
        } else {
            bad("expected an event object".into())
        }
    })?;
    let name = match fields.event_name.0 {
        None => return Err(bad("eventName: missing field `eventName`".into())),
        Some(v) => match as_string(v) {
            Some(s) => EventName::parse(&s).ok_or_else(|| {
                bad(format!(
                    "eventName: unknown event `{s}`, expected one of registrant.added, registrant.joined, webinar.created, webinar.changed"
                ))
            })?,
            None => return Err(bad("eventName: expected a string".into())),
        },
    };
    for field in KEY_FIELDS {
        if let Some(v) = fields.get(field) {
            if serde_json::from_str::<i64>(v.get()).is_err() {
                return Err(bad(format!("{field}: expected an integer (int64), found {}", v.get())));
            }
        }
    }
    for field in name.required_keys() {
        if fields.get(field).is_none() {
            return Err(bad(format!(
                "{field}: missing field `{field}` (required for {})",
                name.as_str()
            )));
        }
    }
    let mut strings = [None, None, None];
    for (i, (field, value)) in [
        ("eventKey", fields.event_key.0),
        ("timestamp", fields.timestamp.0),
        ("eventVersion", fields.event_version.0),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(v) = value {
            strings[i] = Some(as_string(v).ok_or_else(|| bad(format!("{field}: expected a string")))?);
        }
    }
    let [event_key, timestamp, event_version] = strings;
    if let Some(k) = &event_key {
        if k.is_empty() || k.len() > 200 {
            return Err(bad("eventKey: must be 1 to 200 characters".into()));
        }
    }
    if let Some(p) = fields.product.0 {
        if as_string(p).as_deref() != Some("g2w") {
            return Err(bad(format!("product: expected \"g2w\", found {}", p.get())));
        }
    }
    let organizer_key = fields
        .get(name.organizer_field())
        .and_then(|v| serde_json::from_str::<i64>(v.get()).ok())
        .ok_or_else(|| bad(format!("{}: missing field", name.organizer_field())))?;

    // The body as sent; when service fields are missing they go first, written once into a buffer of the
    // body's final size.
    let missing = timestamp.is_none() || event_version.is_none() || fields.product.0.is_none();
    let (event_key, body) = match event_key {
        Some(k) if !missing => (k.into_owned(), Bytes::copy_from_slice(text.as_bytes())),
        given => {
            let mut body = String::with_capacity(text.len() + 160);
            body.push('{');
            let event_key = match given {
                Some(k) => k.into_owned(),
                None => {
                    // Time-ordered (UUID version 7), so the events index grows at its end, not at random pages.
                    let k = uuid::Uuid::now_v7().to_string();
                    body.push_str("\"eventKey\":\"");
                    body.push_str(&k);
                    body.push_str("\",");
                    k
                }
            };
            if timestamp.is_none() {
                body.push_str("\"timestamp\":\"");
                body.push_str(&format_ms(now_ms()));
                body.push_str("\",");
            }
            if event_version.is_none() {
                body.push_str("\"eventVersion\":\"1.0.0\",");
            }
            if fields.product.0.is_none() {
                body.push_str("\"product\":\"g2w\",");
            }
            // The object is non-empty (it has eventName), so inserting after `{` keeps it valid.
            body.push_str(text.trim_start().strip_prefix('{').unwrap_or(text));
            (event_key, Bytes::from(body))
        }
    };
    Ok(NewEvent {
        event_key,
        organizer_key,
        event_name: name,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn fills_in_missing_fields_and_keeps_the_rest_verbatim() {
        let body = br#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":5064544480539859206,"times":[{"startTime":"2020-08-25T20:00:00Z"}],"x":1.50}"#;
        let ev = parse_batch(body).expect("valid").remove(0);
        let text = std::str::from_utf8(&ev.body).expect("utf8");
        assert!(text.ends_with(r#""eventName":"webinar.created","webinarKey":1,"organizerKey":5064544480539859206,"times":[{"startTime":"2020-08-25T20:00:00Z"}],"x":1.50}"#));
        let v: Value = serde_json::from_str(text).expect("still JSON");
        assert_eq!(v["eventKey"], Value::String(ev.event_key.clone()));
        assert_eq!(v["product"], "g2w");
        assert_eq!(v["eventVersion"], "1.0.0");
        assert_eq!(ev.organizer_key, 5064544480539859206);
    }

    #[test]
    fn refuses_bad_events() {
        for (body, needle) in [
            (
                r#"{"eventName":"webinar.deleted","organizerKey":1,"webinarKey":1}"#,
                "unknown event",
            ),
            (r#"{"eventName":"webinar.created","webinarKey":1}"#, "organizerKey"),
            (
                r#"{"eventName":"webinar.created","webinarKey":"1","organizerKey":1}"#,
                "webinarKey: expected an integer",
            ),
            (
                r#"{"eventName":"registrant.added","webinarKey":1,"registrantKey":2}"#,
                "webinarCreatorKey",
            ),
            (
                r#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":1,"eventKey":null}"#,
                "eventKey: expected a string",
            ),
            (
                r#"{"eventName":null,"webinarKey":1,"organizerKey":1}"#,
                "eventName: expected a string",
            ),
            (
                r#"{"eventName":"webinar.created","webinarKey":1,"webinarKey":2,"organizerKey":1}"#,
                "duplicate field `webinarKey`",
            ),
            (r#"[]"#, "no events"),
            (r#"[1]"#, "[0].expected an event object"),
            (
                r#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":1,"product":"g2m"}"#,
                "product",
            ),
        ] {
            let err = parse_batch(body.as_bytes()).expect_err(body).to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let many = format!(
            "[{}]",
            vec![r#"{"eventName":"webinar.created","webinarKey":1,"organizerKey":1}"#; 1001].join(",")
        );
        assert!(parse_batch(many.as_bytes())
            .expect_err("too many")
            .to_string()
            .contains("limit is 1000"));
    }
}
