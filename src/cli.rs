//! Operator subcommands: tokens (on the database directly) and the admin client (trigger, deliveries, redeliver).

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{AdminClientArgs, Command, DeliveriesCommand, SecretsCommand, TokenCommand, TriggerArgs};
use crate::domain::token;
use crate::domain::{format_ms, now_ms, EventName};

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Secrets(SecretsCommand::NewKey { id }) => {
            println!("{}", crate::store::sealed::Keyring::generate(&id));
            Ok(())
        }
        Command::Secrets(SecretsCommand::Rekey(db)) => {
            let store = db.open(1, crate::config::Durability::Full).await?;
            let n = store.reseal_secrets(true).await?;
            eprintln!("{n} secrets sealed again with the newest key");
            Ok(())
        }
        Command::Migrate(db) => {
            db.open_without_secrets().await?;
            eprintln!("database is up to date");
            Ok(())
        }
        Command::DevTokens(db) => {
            let store = db.open_without_secrets().await?;
            let dev = crate::dev_tokens(&store).await?;
            println!("export G2W_TOKEN={} G2W_ADMIN_TOKEN={}", dev.bearer, dev.admin);
            Ok(())
        }
        Command::Token(TokenCommand::Create { app, organizer, db }) => {
            let store = db.open_without_secrets().await?;
            println!("{}", crate::issue_token(&store, &app, organizer).await?);
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { token, db }) => {
            let store = db.open_without_secrets().await?;
            if !store.revoke_token(&token::hash(token.trim())).await? {
                bail!("no live token matches");
            }
            eprintln!("revoked");
            Ok(())
        }
        Command::Trigger(t) => trigger(t).await,
        Command::Listen(l) => crate::listen::listen(l).await,
        Command::Verify {
            secret,
            timestamp,
            signature,
            file,
        } => crate::listen::verify(&secret, &timestamp, &signature, file.as_deref()),
        Command::Deliveries(d) => deliveries(d).await,
        Command::Redeliver { event_key, admin } => admin_post(&admin, &format!("/events/{event_key}/redeliver")).await,
        Command::Serve(_) | Command::Worker(_) => unreachable!("handled by main"),
    }
}

/// An admin API `POST` with no body (retries and redelivery).
async fn admin_post(admin: &AdminClientArgs, path: &str) -> anyhow::Result<()> {
    admin_call(admin, reqwest::Method::POST, path, None).await
}

async fn admin_call(
    admin: &AdminClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<()> {
    let token = admin
        .admin_token
        .as_deref()
        .context("the admin token is needed: --admin-token or G2W_ADMIN_TOKEN (serve --dev prints it)")?;
    let url = format!(
        "{}{}{path}",
        admin.server.trim_end_matches('/'),
        crate::http::ADMIN_BASE
    );
    let mut req = reqwest::Client::new().request(method, &url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.with_context(|| format!("calling {url}"))?;
    let status = res.status();
    let text = res.text().await?;
    let shown = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if !status.is_success() {
        bail!("{} answered {status}: {shown}", url);
    }
    println!("{shown}");
    Ok(())
}

async fn deliveries(cmd: DeliveriesCommand) -> anyhow::Result<()> {
    match cmd {
        DeliveriesCommand::List {
            state,
            webhook,
            subscription,
            event_name,
            limit,
            admin,
        } => {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            q.append_pair("limit", &limit.to_string());
            for (k, v) in [
                ("state", state),
                ("webhookKey", webhook),
                ("subscriptionKey", subscription),
                ("eventName", event_name),
            ] {
                if let Some(v) = v {
                    q.append_pair(k, &v);
                }
            }
            admin_call(
                &admin,
                reqwest::Method::GET,
                &format!("/deliveries?{}", q.finish()),
                None,
            )
            .await
        }
        DeliveriesCommand::Get { id, admin } => {
            admin_call(&admin, reqwest::Method::GET, &format!("/deliveries/{id}"), None).await
        }
        DeliveriesCommand::Retry { id, admin } => admin_post(&admin, &format!("/deliveries/{id}/retry")).await,
        DeliveriesCommand::RetryFailed { subscription, admin } => {
            admin_post(&admin, &format!("/subscriptions/{subscription}/retry-failed")).await
        }
    }
}

fn random_key() -> i64 {
    rand::random::<i64>().abs()
}

/// A realistic event of the given type, shaped like GoTo's real payloads.
pub fn sample_event(name: EventName, organizer: i64) -> Value {
    let now = now_ms();
    let start = format_ms(now + 86_400_000);
    let start = format!("{}Z", &start[..19]);
    let end = format_ms(now + 90_000_000);
    let end = format!("{}Z", &end[..19]);
    match name {
        EventName::WebinarCreated | EventName::WebinarChanged => json!({
            "eventName": name.as_str(),
            "webinarKey": random_key(),
            "webinarTitle": "Quarterly Product Update",
            "experienceType": "CLASSIC",
            "recurrenceType": "single_session",
            "webinarCreationDate": format_ms(now),
            "times": [{"startTime": start, "endTime": end}],
            "status": if name == EventName::WebinarCreated { "NEW" } else { "UPDATED" },
            "timeZone": "America/Los_Angeles",
            "organizerKey": organizer,
            "accountKey": random_key(),
        }),
        EventName::RegistrantAdded => json!({
            "eventName": name.as_str(),
            "firstName": "Ada",
            "lastName": "Lovelace",
            "email": "ada@example.com",
            "responses": [],
            "registrationDate": format_ms(now),
            "status": "APPROVED",
            "webinarKey": random_key(),
            "webinarTitle": "Quarterly Product Update",
            "experienceType": "CLASSIC",
            "recurrenceType": "single_session",
            "webinarCreatorKey": organizer,
            "registrantKey": random_key(),
            "joinUrl": "https://global.gotowebinar.com/join/4511123456226725432/123456789",
        }),
        EventName::RegistrantJoined => json!({
            "eventName": name.as_str(),
            "sessionKey": random_key() % 100_000_000,
            "webinarKey": random_key(),
            "firstName": "Ada",
            "lastName": "Lovelace",
            "email": "ada@example.com",
            "webinarTitle": "Quarterly Product Update",
            "webinarCreatorKey": organizer,
            "registrantKey": random_key(),
            "joinTime": now,
        }),
    }
}

async fn trigger(t: TriggerArgs) -> anyhow::Result<()> {
    let name = EventName::parse(&t.event).with_context(|| {
        format!(
            "unknown event `{}`: use registrant.added, registrant.joined, webinar.created or webinar.changed",
            t.event
        )
    })?;
    let mut event = sample_event(name, t.organizer);
    for set in &t.set {
        let (k, v) = set
            .split_once('=')
            .with_context(|| format!("--set {set}: expected FIELD=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        event[k] = value;
    }
    admin_call(&t.admin, reqwest::Method::POST, "/events", Some(event)).await
}
