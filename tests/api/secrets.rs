//! Secrets at rest: signing keys and webhook secrets are sealed in the database, each bound to its row; values
//! stored in the clear by an older version are sealed at start; a key the keyring lacks stops the start, named;
//! a rekey moves every value to the newest key.

use std::sync::Arc;

use g2w_webhooks::store::sealed::Keyring;
use reqwest::Method;
use serde_json::json;
use sqlx::Row;

use crate::support::{signed_with, Backend, Receiver, TestApp};

crate::on_both!(
    no_secret_is_stored_in_the_clear,
    a_sealed_value_moved_to_another_row_does_not_open,
    secrets_from_before_sealing_are_sealed_at_start_and_a_rekey_moves_them_to_the_newest_key,
);

/// Every stored secret value, as the database holds it.
async fn stored(url: &str) -> Vec<String> {
    let queries = [
        "SELECT value AS v FROM secret_keys",
        "SELECT secret_key AS v FROM webhooks WHERE secret_key IS NOT NULL",
    ];
    let mut out = Vec::new();
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        for q in queries {
            for r in sqlx::query(q).fetch_all(&pool).await.unwrap() {
                out.push(r.get::<String, _>("v"));
            }
        }
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        for q in queries {
            for r in sqlx::query(q).fetch_all(&pool).await.unwrap() {
                out.push(r.get::<String, _>("v"));
            }
        }
    }
    out
}

async fn execute(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
}

/// An application key (from `POST /webhooks/secretkey`) and a webhook's own secret, both in use.
async fn two_secrets(app: &TestApp, rx: &Receiver) -> (String, String) {
    let key = app.new_secret_key(None).await;
    let body = json!({"product": "g2w", "eventName": "webinar.changed", "eventVersion": "1.0.0",
        "callbackUrl": format!("{}/own", rx.url), "secretKey": "my-very-own-webhook-secret"});
    let res = app.call(Method::POST, "/webhooks", Some(body)).await;
    assert_eq!(res.status(), 201);
    (key, "my-very-own-webhook-secret".to_string())
}

async fn no_secret_is_stored_in_the_clear(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let (app_key, own) = two_secrets(&app, &rx).await;
    let values = stored(&app.db_url).await;
    assert_eq!(values.len(), 2, "{values:?}");
    for v in &values {
        assert!(v.starts_with("g2w1:"), "stored unsealed: {v}");
        assert!(!v.contains(&app_key) && !v.contains(&own));
    }
    if let Some(path) = app.db_url.strip_prefix("sqlite://") {
        // Not in the file, nor in its write-ahead log.
        for file in [path.to_string(), format!("{path}-wal")] {
            let bytes = std::fs::read(&file).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(&app_key) && !text.contains(&own),
                "{file} holds a secret in the clear"
            );
        }
    }
    // They still sign: the API opens them where they are used.
    app.subscribe("webinar.created", &rx.url).await;
    app.publish(json!({"eventName": "webinar.created", "webinarKey": 1, "organizerKey": 1001}))
        .await;
    let got = rx.wait_for(1, std::time::Duration::from_secs(10)).await;
    assert!(signed_with(&got[0], &app_key));
}

async fn a_sealed_value_moved_to_another_row_does_not_open(b: Backend) {
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    two_secrets(&app, &rx).await;
    app.call(Method::POST, "/webhooks/secretkey", None).await;
    let app_id = app.store.ensure_app("app-a").await.unwrap();
    assert!(app.store.secret_keys(app_id).await.unwrap().len() >= 2);
    // Swap two keys' sealed values: each is bound to its own row.
    execute(
        &app.db_url,
        "UPDATE secret_keys SET value = CASE WHEN id = (SELECT MIN(id) FROM secret_keys) \
           THEN (SELECT value FROM secret_keys WHERE id = (SELECT MAX(id) FROM secret_keys)) \
           ELSE (SELECT value FROM secret_keys WHERE id = (SELECT MIN(id) FROM secret_keys)) END \
         WHERE id IN ((SELECT MIN(id) FROM secret_keys), (SELECT MAX(id) FROM secret_keys))",
    )
    .await;
    let err = app.store.secret_keys(app_id).await.expect_err("refused");
    assert!(err.to_string().contains("does not open"), "{err}");
}

async fn secrets_from_before_sealing_are_sealed_at_start_and_a_rekey_moves_them_to_the_newest_key(b: Backend) {
    let is_sqlite = matches!(b, Backend::Sqlite);
    let app = TestApp::on(b).await;
    let rx = Receiver::start().await;
    let (app_key, _) = two_secrets(&app, &rx).await;
    // As an older version stored them: in the clear.
    execute(&app.db_url, &format!("UPDATE secret_keys SET value = '{app_key}'")).await;
    execute(
        &app.db_url,
        "UPDATE webhooks SET secret_key = 'plain-own' WHERE secret_key IS NOT NULL",
    )
    .await;
    let (url, dir) = app.stop_keeping_data().await;
    let app = TestApp::start_on_url(url.clone(), dir).await;
    assert!(
        stored(&url).await.iter().all(|v| v.starts_with("g2w1:")),
        "sealed at start"
    );
    let app_id = app.store.ensure_app("app-a").await.unwrap();
    assert!(app
        .store
        .secret_keys(app_id)
        .await
        .unwrap()
        .iter()
        .all(|k| k.value == app_key));

    // A new key first, the old one kept: rekey seals every value with the new one; then the old can go.
    let old = if is_sqlite {
        std::fs::read_to_string(format!("{}.secrets", url.trim_start_matches("sqlite://")))
            .unwrap()
            .trim()
            .to_string()
    } else {
        crate::support::TEST_KEYS.to_string()
    };
    let new = Keyring::generate("newer");
    let both = Arc::new(Keyring::parse(&format!("{new},{old}")).unwrap());
    let s = g2w_webhooks::store::connect(&url, 1, g2w_webhooks::config::Durability::Normal, both)
        .await
        .unwrap();
    assert!(s.reseal_secrets(true).await.unwrap() >= 2);
    assert!(stored(&url).await.iter().all(|v| v.starts_with("g2w1:newer:")));
    let only_new = Arc::new(Keyring::parse(&new).unwrap());
    let s = g2w_webhooks::store::connect(&url, 1, g2w_webhooks::config::Durability::Normal, only_new)
        .await
        .unwrap();
    assert!(s.secret_keys(app_id).await.unwrap().iter().all(|k| k.value == app_key));
    assert_eq!(s.reseal_secrets(true).await.unwrap(), 0, "nothing left to move");

    // A server given a keyring without the key the values were sealed with does not start, and says which.
    let (url, dir) = app.stop_keeping_data().await;
    let mut args = g2w_webhooks::config::ServeArgs::for_database(&url);
    args.db.secrets_keys = Some(Keyring::generate("unrelated"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let role = g2w_webhooks::Role::serve(&args);
    let err = g2w_webhooks::run(args, role, listener, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(format!("{err:#}").contains("key newer"), "{err:#}");
    drop(dir);
}

/// PostgreSQL without `--secrets-keys` does not start: nodes share no key file.
#[tokio::test]
async fn postgres_without_a_keyring_is_refused_with_what_to_do() {
    let err = g2w_webhooks::store::keyring_for("postgres://db.example/g2w", None).expect_err("refused");
    assert!(err.to_string().contains("--secrets-keys"), "{err}");
}
