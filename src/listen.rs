//! `listen` and `verify`: the receiver's side, for developing an endpoint against real signed deliveries.

use std::io::Read;
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use g2w_webhook_verify::{Event, Verifier};
use serde_json::{json, Value};

use crate::config::ListenArgs;

struct Listener {
    verifier: Option<Verifier>,
    forward: Option<String>,
    json: bool,
    http: reqwest::Client,
}

/// `g2w-webhooks verify`: exit 0 when the signature holds.
pub fn verify(secrets: &[String], timestamp: &str, signature: &str, file: Option<&str>) -> anyhow::Result<()> {
    let mut body = Vec::new();
    match file {
        None | Some("-") => {
            std::io::stdin().read_to_end(&mut body)?;
        }
        Some(path) => body = std::fs::read(path).with_context(|| format!("reading {path}"))?,
    }
    let mut keys = secrets.iter();
    let first = keys.next().context("--secret is required")?;
    let verifier = keys.fold(Verifier::new(first.clone()), |v, k| v.with_key(k.clone()));
    verifier.verify(timestamp, signature, &body)?;
    println!("signature ok ({} bytes)", body.len());
    Ok(())
}

/// One line that says what happened: event name, keys, who or what, verdict.
fn summary(body: &[u8], verdict: &str) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    let what = match s("eventName").as_str() {
        "registrant.added" | "registrant.joined" => {
            format!(
                "{} {} <{}>  webinarKey={} registrantKey={}",
                s("firstName"),
                s("lastName"),
                s("email"),
                n("webinarKey"),
                n("registrantKey")
            )
        }
        "webinar.created" | "webinar.changed" => {
            format!(
                "\"{}\" {}  webinarKey={} organizerKey={}",
                s("webinarTitle"),
                s("status"),
                n("webinarKey"),
                n("organizerKey")
            )
        }
        _ => String::new(),
    };
    let parsed = if Event::parse(body).is_ok() {
        ""
    } else {
        "  (not a known event shape)"
    };
    format!(
        "{:<18} {}  eventKey={}  [{verdict}]{parsed}",
        s("eventName"),
        what,
        s("eventKey")
    )
}

async fn receive(
    State(l): State<Arc<Listener>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if method != Method::POST {
        return (StatusCode::OK, "ok".into()); // the callback validation GET
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (verdict, ok) = match &l.verifier {
        None => ("signature not checked: no secret".to_string(), true),
        Some(v) => match v.verify_headers(header, &body) {
            Ok(()) => ("signature ok".to_string(), true),
            Err(e) => (format!("SIGNATURE REFUSED: {e}"), false),
        },
    };
    if l.json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        println!("{}", summary(&body, &verdict));
    }
    if let Some(url) = &l.forward {
        let mut req = l.http.post(url).body(body.clone());
        for (name, value) in headers.iter() {
            if !matches!(
                name.as_str(),
                "host" | "content-length" | "connection" | "transfer-encoding"
            ) {
                req = req.header(name, value);
            }
        }
        return match req.send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                if !l.json {
                    println!("  -> forwarded to {url}: {status}");
                }
                (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    String::new(),
                )
            }
            Err(e) => {
                if !l.json {
                    println!("  -> forwarding to {url} failed: {}", crate::outbound::root_cause(&e));
                }
                (StatusCode::BAD_GATEWAY, "forwarding failed".into())
            }
        };
    }
    if ok {
        (StatusCode::OK, "ok".into())
    } else {
        (StatusCode::UNAUTHORIZED, verdict)
    }
}

/// Creates, activates and subscribes one webhook per event; returns their keys.
async fn subscribe(args: &ListenArgs, callback: &str, secret: &str) -> anyhow::Result<Vec<String>> {
    let token = args
        .token
        .as_deref()
        .context("--subscribe needs a token: --token or G2W_TOKEN")?;
    let api = format!("{}{}", args.server.trim_end_matches('/'), crate::http::API_BASE);
    let http = reqwest::Client::new();
    let hooks: Vec<Value> = args
        .events
        .iter()
        .map(|e| json!({"product": "g2w", "eventName": e, "eventVersion": "1.0.0", "callbackUrl": callback, "secretKey": secret}))
        .collect();
    let res = http
        .post(format!("{api}/webhooks"))
        .bearer_auth(token)
        .json(&hooks)
        .send()
        .await?;
    if !res.status().is_success() {
        bail!(
            "creating webhooks: {} {}",
            res.status(),
            res.text().await.unwrap_or_default()
        );
    }
    let v: Value = res.json().await?;
    let keys: Vec<String> = v["_embedded"]["webhooks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w["webhookKey"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let activate: Vec<Value> = keys
        .iter()
        .map(|k| json!({"webhookKey": k, "state": "ACTIVE"}))
        .collect();
    let res = http
        .put(format!("{api}/webhooks"))
        .bearer_auth(token)
        .json(&activate)
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("activating webhooks: {}", res.status());
    }
    let subs: Vec<Value> = keys.iter().map(|k| json!({"webhookKey": k})).collect();
    let res = http
        .post(format!("{api}/userSubscriptions"))
        .bearer_auth(token)
        .json(&subs)
        .send()
        .await?;
    if !res.status().is_success() {
        bail!("subscribing: {}", res.status());
    }
    Ok(keys)
}

async fn unsubscribe(args: &ListenArgs, keys: &[String]) -> anyhow::Result<()> {
    let token = args.token.as_deref().unwrap_or_default();
    let api = format!("{}{}", args.server.trim_end_matches('/'), crate::http::API_BASE);
    reqwest::Client::new()
        .delete(format!("{api}/webhooks"))
        .bearer_auth(token)
        .json(&keys)
        .send()
        .await?;
    Ok(())
}

/// `g2w-webhooks listen`.
pub async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let mut secrets = args.secret.clone();
    if let Some(app) = &args.app {
        let store = args.db.open(1, crate::config::Durability::Full).await?;
        let app_id = store.ensure_app(app).await?;
        secrets.extend(store.secret_keys(app_id).await?.into_iter().map(|k| k.value));
        if secrets.is_empty() {
            bail!("application {app} has no secret key yet: POST /webhooks/secretkey first");
        }
    }
    if args.subscribe && secrets.is_empty() {
        secrets.push(crate::domain::new_key());
    }
    let verifier = secrets.split_first().map(|(first, rest)| {
        rest.iter()
            .fold(Verifier::new(first.clone()), |v, k| v.with_key(k.clone()))
    });
    let state = Arc::new(Listener {
        verifier,
        forward: args.forward_to.clone(),
        json: args.json,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
    });
    let app = axum::Router::new().fallback(receive).with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("listening on port {}", args.port))?;
    let path = format!("/webhooks/{}", &crate::domain::new_key()[..8]);
    let callback = format!("http://127.0.0.1:{}{path}", args.port);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let keys = if args.subscribe {
        let keys = subscribe(&args, &callback, &secrets[0]).await?;
        eprintln!(
            "subscribed {} to {} (webhooks {}); Ctrl-C removes them",
            args.events.join(", "),
            callback,
            keys.join(", ")
        );
        keys
    } else {
        eprintln!("listening on {callback} (any path works)");
        Vec::new()
    };
    tokio::select! {
        _ = crate::shutdown_signal() => {}
        res = server => { res??; }
    }
    if !keys.is_empty() {
        unsubscribe(&args, &keys).await?;
        eprintln!("removed the webhooks and their subscriptions");
    }
    Ok(())
}
