//! Events as publishers send them: validation, and the exact bytes subscribers receive.
//!
//! The body is the publisher's JSON object byte for byte; fields the service fills in (`eventKey`, `timestamp`,
//! `eventVersion`, `product`) are prepended when absent, so nothing the publisher sent is reformatted.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::domain::{format_ms, now_ms, EventName};
use crate::error::{Error, Result};
use crate::store::NewEvent;

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
        .map(|(i, raw)| parse_event(raw, if many { format!("[{i}].") } else { String::new() }))
        .collect()
}

fn parse_event(raw: &RawValue, at: String) -> Result<NewEvent> {
    let bad = |msg: String| Error::bad_request(format!("{at}{msg}"));
    let fields: Map<String, Value> =
        serde_json::from_str(raw.get()).map_err(|_| bad("expected an event object".into()))?;
    let name = match fields.get("eventName") {
        None => return Err(bad("eventName: missing field `eventName`".into())),
        Some(Value::String(s)) => EventName::parse(s).ok_or_else(|| {
            bad(format!(
                "eventName: unknown event `{s}`, expected one of registrant.added, registrant.joined, webinar.created, webinar.changed"
            ))
        })?,
        Some(_) => return Err(bad("eventName: expected a string".into())),
    };
    for field in KEY_FIELDS {
        if let Some(v) = fields.get(field) {
            if v.as_i64().is_none() {
                return Err(bad(format!("{field}: expected an integer (int64), found {v}")));
            }
        }
    }
    for field in name.required_keys() {
        if !fields.contains_key(*field) {
            return Err(bad(format!(
                "{field}: missing field `{field}` (required for {})",
                name.as_str()
            )));
        }
    }
    for field in ["eventKey", "timestamp", "eventVersion"] {
        match fields.get(field) {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(bad(format!("{field}: expected a string"))),
        }
    }
    if let Some(Value::String(k)) = fields.get("eventKey") {
        if k.is_empty() || k.len() > 200 {
            return Err(bad("eventKey: must be 1 to 200 characters".into()));
        }
    }
    match fields.get("product") {
        None => {}
        Some(Value::String(p)) if p == "g2w" => {}
        Some(other) => return Err(bad(format!("product: expected \"g2w\", found {other}"))),
    }
    let organizer_key = fields
        .get(name.organizer_field())
        .and_then(Value::as_i64)
        .ok_or_else(|| bad(format!("{}: missing field", name.organizer_field())))?;

    let event_key = match fields.get("eventKey") {
        Some(Value::String(k)) => k.clone(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let mut prefix = String::new();
    if !fields.contains_key("eventKey") {
        prefix.push_str(&format!("\"eventKey\":\"{event_key}\","));
    }
    if !fields.contains_key("timestamp") {
        prefix.push_str(&format!("\"timestamp\":\"{}\",", format_ms(now_ms())));
    }
    if !fields.contains_key("eventVersion") {
        prefix.push_str("\"eventVersion\":\"1.0.0\",");
    }
    if !fields.contains_key("product") {
        prefix.push_str("\"product\":\"g2w\",");
    }
    let text = raw.get();
    let body = if prefix.is_empty() {
        Bytes::copy_from_slice(text.as_bytes())
    } else {
        // The object is non-empty (it has eventName), so inserting after `{` keeps it valid.
        let rest = text.trim_start().strip_prefix('{').unwrap_or(text);
        Bytes::from(format!("{{{prefix}{rest}"))
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
