//! The SQL both backends share: management queries, inspection and repair, written once in the common
//! subset of SQLite and PostgreSQL (`$N` parameters, `CAST`, `ON CONFLICT`, `RETURNING`). Each backend adds
//! its own hot path (publish, claim, record) where the two databases differ.
//!
//! Why one long macro: a backend's `Store` impl must be one impl block, and sqlx's row and transaction types
//! differ per database, so one text serves both only when expanded per backend. It holds SQL and the mapping
//! of rows, no decision of its own: those live in `rules.rs` and on the domain types.

/// Implements `Store` for `$store` over database `$db` (rows `$row`), with the backend's own hot-path methods.
macro_rules! sql_store {
    ($store:ty, $db:ty, $row:ty, { $($hot:tt)* }) => {
const WEBHOOK_COLS: &str = "w.webhook_key AS w_key, w.event_name AS w_event_name, \
    w.event_version AS w_event_version, w.callback_url AS w_callback_url, w.state AS w_state, \
    w.secret_key AS w_secret_key, w.created_at AS w_created_at";

const DELIVERY_COLS: &str = "id, event_key, event_name, webhook_key, subscription_key, url, state, \
    attempts, next_attempt_at, last_status, last_error, created_at, updated_at";

impl $store {
    /// The readers answer and a write commits: reads can work while writes fail (a full disk, a read-only
    /// standby), so `/readyz` proves both.
    async fn reads_and_writes(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        sqlx::query(PROVE_WRITES)
            .bind(now_ms().to_string())
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn fetch_subscriptions(&self, tenant: Tenant, key: Option<&str>) -> Result<Vec<Subscription>> {
        let sql = format!(
            "SELECT s.subscription_key, s.organizer_key, s.callback_url, s.state, s.inactive_reason, \
             s.created_at, {WEBHOOK_COLS} FROM user_subscriptions s \
             JOIN webhooks w ON w.webhook_key = s.webhook_key \
             WHERE s.app_id = $1 AND s.organizer_key = $2 AND (CAST($3 AS TEXT) IS NULL OR s.subscription_key = CAST($3 AS TEXT)) \
             ORDER BY s.created_at, s.subscription_key"
        );
        let rows = sqlx::query(&sql)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .bind(key)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(|r| subscription_from_row(r, &self.ring)).collect()
    }

    /// Adds a secret key to the application, sealed for its row; in the caller's transaction.
    async fn insert_secret_key(
        &self,
        tx: &mut sqlx::Transaction<'_, $db>,
        app_id: i64,
        value: &str,
        valid_from: i64,
    ) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO secret_keys (app_id, value, valid_from, created_at) VALUES ($1, '', $2, $3) RETURNING id",
        )
        .bind(app_id)
        .bind(valid_from)
        .bind(now_ms())
        .fetch_one(&mut **tx)
        .await?;
        sqlx::query("UPDATE secret_keys SET value = $1 WHERE id = $2")
            .bind(self.ring.seal(&sealed::secret_key_row(id), value)?)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(id)
    }
}

fn webhook_from_row(row: &$row, ring: &Keyring) -> Result<Webhook> {
    let name: String = row.try_get("w_event_name")?;
    let state: String = row.try_get("w_state")?;
    let key: String = row.try_get("w_key")?;
    let secret: Option<String> = row.try_get("w_secret_key")?;
    Ok(Webhook {
        secret_key: secret.map(|s| ring.open(&sealed::webhook_row(&key), &s)).transpose()?,
        key,
        event_name: EventName::parse(&name).ok_or_else(|| Error::Internal(format!("stored event name `{name}`")))?,
        event_version: row.try_get("w_event_version")?,
        callback_url: row.try_get("w_callback_url")?,
        state: State::parse(&state),
        created_at: row.try_get("w_created_at")?,
    })
}

fn subscription_from_row(row: &$row, ring: &Keyring) -> Result<Subscription> {
    let webhook = webhook_from_row(row, ring)?;
    let state: String = row.try_get("state")?;
    Ok(Subscription {
        key: row.try_get("subscription_key")?,
        organizer_key: row.try_get("organizer_key")?,
        webhook_key: webhook.key.clone(),
        callback_url: row.try_get("callback_url")?,
        state: State::parse(&state),
        inactive_reason: row.try_get("inactive_reason")?,
        created_at: row.try_get("created_at")?,
        webhook,
    })
}

fn delivery_from_row(row: &$row) -> Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: row.try_get("id")?,
        event_key: row.try_get("event_key")?,
        event_name: row.try_get("event_name")?,
        webhook_key: row.try_get("webhook_key")?,
        subscription_key: row.try_get("subscription_key")?,
        url: row.try_get("url")?,
        state: row.try_get("state")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Moves `updated_at` (always, even within the millisecond it was last set in), so an attempt in flight sees
/// that its delivery changed and its result does not overwrite the change.
const TOUCH: &str = "updated_at = CASE WHEN updated_at >= $1 THEN updated_at + 1 ELSE $1 END";

/// Pauses the waiting deliveries that `cond` picks (`$2` is the key): they leave the due queue until resumed.
async fn pause(tx: &mut sqlx::Transaction<'_, $db>, cond: &str, key: &str, now: i64) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE {PENDING_DELIVERIES} SET state = 'paused', last_error = $3, {TOUCH} \
         WHERE state = 'pending' AND {cond}"
    ))
    .bind(now)
    .bind(key)
    .bind($crate::store::rules::PAUSED)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Makes the paused deliveries of the subscriptions `cond` picks (over `user_subscriptions s`; `$2` is the key)
/// pending and due now; returns how many.
async fn resume(tx: &mut sqlx::Transaction<'_, $db>, cond: &str, key: &str, now: i64) -> Result<u64> {
    Ok(sqlx::query(&format!(
        "UPDATE deliveries SET state = 'pending', next_attempt_at = $1, {TOUCH} \
         WHERE state = 'paused' AND subscription_key IN (SELECT s.subscription_key FROM user_subscriptions s \
         WHERE s.state = 'ACTIVE' AND s.{cond})"
    ))
    .bind(now)
    .bind(key)
    .execute(&mut **tx)
    .await?
    .rows_affected())
}

/// Ends the waiting and paused deliveries that `cond` picks (`$3` is the key): cancelled, with the reason.
async fn cancel(tx: &mut sqlx::Transaction<'_, $db>, cond: &str, key: &str, why: Cancel, now: i64) -> Result<()> {
    for (from, state) in [(PENDING_DELIVERIES, "pending"), ("deliveries", "paused")] {
        sqlx::query(&format!(
            "UPDATE {from} SET state = 'cancelled', last_error = $2, {TOUCH} WHERE state = '{state}' AND {cond}"
        ))
        .bind(now)
        .bind(why.reason())
        .bind(key)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Points the waiting and paused deliveries that `cond` picks (`$2` is the key) at the callback URL `url`, as
/// shown by the admin API. (`updated_at` stays: an attempt in flight to the old URL settles its delivery as
/// usual. Jobs already in memory take the new URL from the engine's check before they are sent.)
async fn follow_url(tx: &mut sqlx::Transaction<'_, $db>, cond: &str, url: &str, key: &str) -> Result<()> {
    for (from, state) in [(PENDING_DELIVERIES, "pending"), ("deliveries", "paused")] {
        sqlx::query(&format!("UPDATE {from} SET url = $1 WHERE state = '{state}' AND {cond}"))
        .bind(url)
        .bind(key)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn duplicate_webhook(name: EventName, url: &str) -> Error {
    Error::Conflict(format!(
        "a webhook for eventName {} and callbackUrl {url} already exists in this application",
        name.as_str()
    ))
}

#[async_trait]
impl Store for $store {
    async fn ensure_app(&self, name: &str) -> Result<i64> {
        sqlx::query("INSERT INTO applications (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now_ms())
            .execute(&self.write)
            .await?;
        Ok(sqlx::query_scalar("SELECT id FROM applications WHERE name = $1")
            .bind(name)
            .fetch_one(&self.write)
            .await?)
    }

    async fn insert_token(&self, token_hash: &str, tenant: Tenant) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (token_hash, app_id, organizer_key, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (token_hash) DO UPDATE SET revoked_at = NULL",
        )
        .bind(token_hash)
        .bind(tenant.app_id)
        .bind(tenant.organizer_key)
        .bind(now_ms())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn revoke_token(&self, token_hash: &str) -> Result<bool> {
        let n = sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(token_hash)
            .execute(&self.write)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn find_token(&self, token_hash: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT app_id, organizer_key FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(token_hash)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| {
            Ok(Tenant {
                app_id: r.try_get("app_id")?,
                organizer_key: r.try_get("organizer_key")?,
            })
        })
        .transpose()
    }

    async fn meta_get_or_insert(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_one(&self.write)
            .await?)
    }

    async fn create_secret_key(&self, app_id: i64, value: &str, valid_from: i64) -> Result<SecretKey> {
        let mut tx = self.write.begin().await?;
        let id = self.insert_secret_key(&mut tx, app_id, value, valid_from).await?;
        tx.commit().await?;
        self.changed(Changed::Keys(app_id)).await;
        Ok(SecretKey {
            id,
            value: value.to_string(),
            valid_from,
        })
    }

    async fn secret_keys(&self, app_id: i64) -> Result<Vec<SecretKey>> {
        let rows =
            sqlx::query("SELECT id, value, valid_from FROM secret_keys WHERE app_id = $1 ORDER BY valid_from, id")
                .bind(app_id)
                .fetch_all(&self.read)
                .await?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get("id")?;
                let value: String = r.try_get("value")?;
                Ok(SecretKey {
                    id,
                    value: self.ring.open(&sealed::secret_key_row(id), &value)?,
                    valid_from: r.try_get("valid_from")?,
                })
            })
            .collect()
    }

    async fn create_webhooks(&self, app_id: i64, new: Vec<NewWebhook>, max: i64) -> Result<Vec<Webhook>> {
        let mut tx = self.write.begin().await?;
        let now = now_ms();
        let has: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhooks WHERE app_id = $1")
            .bind(app_id)
            .fetch_one(&mut *tx)
            .await?;
        if has + new.len() as i64 > max {
            return Err(Error::Conflict(format!(
                "the application has {has} webhooks; {} more would pass the most it may have, {max}",
                new.len()
            )));
        }
        let mut keys = Vec::with_capacity(new.len());
        for w in &new {
            let key = new_key();
            let res = sqlx::query(
                "INSERT INTO webhooks (webhook_key, app_id, event_name, event_version, callback_url, state, \
                 secret_key, created_at) VALUES ($1, $2, $3, $4, $5, 'INACTIVE', $6, $7)",
            )
            .bind(&key)
            .bind(app_id)
            .bind(w.event_name.as_str())
            .bind(&w.event_version)
            .bind(&w.callback_url)
            .bind(
                w.secret_key
                    .as_deref()
                    .map(|s| self.ring.seal(&sealed::webhook_row(&key), s))
                    .transpose()?,
            )
            .bind(now)
            .execute(&mut *tx)
            .await;
            match res {
                Err(e) if is_unique_violation(&e) => return Err(duplicate_webhook(w.event_name, &w.callback_url)),
                other => other?,
            };
            keys.push(key);
        }
        // No delivery leaves unsigned: an application that has no key valid now gets one with its first
        // webhook. `POST /webhooks/secretkey` rotates it (the new key is returned and signs from its validFrom).
        let has_key: Option<i64> =
            sqlx::query_scalar("SELECT id FROM secret_keys WHERE app_id = $1 AND valid_from <= $2 LIMIT 1")
                .bind(app_id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
        if has_key.is_none() {
            self.insert_secret_key(&mut tx, app_id, &new_key(), now).await?;
        }
        tx.commit().await?;
        if has_key.is_none() {
            self.changed(Changed::Keys(app_id)).await;
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(
                self.get_webhook(app_id, &key)
                    .await?
                    .ok_or_else(|| Error::Internal("created webhook vanished".into()))?,
            );
        }
        Ok(out)
    }

    async fn get_webhook(&self, app_id: i64, key: &str) -> Result<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks w WHERE w.app_id = $1 AND w.webhook_key = $2");
        let row = sqlx::query(&sql)
            .bind(app_id)
            .bind(key)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(|r| webhook_from_row(r, &self.ring)).transpose()
    }

    async fn list_webhooks(&self, app_id: i64) -> Result<Vec<Webhook>> {
        let sql =
            format!("SELECT {WEBHOOK_COLS} FROM webhooks w WHERE w.app_id = $1 ORDER BY w.created_at, w.webhook_key");
        let rows = sqlx::query(&sql).bind(app_id).fetch_all(&self.read).await?;
        rows.iter().map(|r| webhook_from_row(r, &self.ring)).collect()
    }

    async fn update_webhooks(&self, app_id: i64, changes: Vec<WebhookChange>) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let mut resumed = 0;
        for c in &changes {
            let res = sqlx::query(
                "UPDATE webhooks SET state = COALESCE($1, state), callback_url = COALESCE($2, callback_url) \
                 WHERE webhook_key = $3 AND app_id = $4",
            )
            .bind(c.state.map(State::as_str))
            .bind(&c.callback_url)
            .bind(&c.key)
            .bind(app_id)
            .execute(&mut *tx)
            .await;
            let n = match res {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::Conflict(format!(
                        "another webhook of this application already has eventName and callbackUrl {}",
                        c.callback_url.as_deref().unwrap_or_default()
                    )))
                }
                other => other?.rows_affected(),
            };
            if n == 0 {
                return Err(Error::not_found(format!("webhookKey {} not found", c.key)));
            }
            // The webhook's deliveries follow: paused while it is INACTIVE, resumed (for its ACTIVE
            // subscriptions) when it is ACTIVE again, and sent to its new URL where no subscription names its own.
            let now = now_ms();
            let of_webhook = "webhook_key = $2";
            match c.state {
                Some(State::Inactive) => pause(&mut tx, of_webhook, &c.key, now).await?,
                Some(State::Active) => {
                    resumed += resume(&mut tx, "webhook_key = $2 AND s.state = 'ACTIVE'", &c.key, now).await?
                }
                None => {}
            }
            if let Some(url) = &c.callback_url {
                follow_url(
                    &mut tx,
                    "webhook_key = $2 AND subscription_key IN (SELECT subscription_key FROM user_subscriptions \
                     WHERE webhook_key = $2 AND callback_url IS NULL)",
                    url,
                    &c.key,
                )
                .await?;
            }
        }
        tx.commit().await?;
        self.changed(Changed::Routes { resumed }).await;
        Ok(())
    }

    async fn delete_webhooks(&self, app_id: i64, keys: &[String]) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let now = now_ms();
        for key in keys {
            sqlx::query("DELETE FROM user_subscriptions WHERE webhook_key = $1 AND app_id = $2")
                .bind(key)
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
            let gone = sqlx::query("DELETE FROM webhooks WHERE webhook_key = $1 AND app_id = $2")
                .bind(key)
                .bind(app_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone > 0 {
                cancel(&mut tx, "webhook_key = $3", key, Cancel::WebhookDeleted, now).await?;
            }
        }
        tx.commit().await?;
        self.changed(Changed::Routes { resumed: 0 }).await;
        Ok(())
    }

    async fn create_subscriptions(
        &self,
        tenant: Tenant,
        new: Vec<NewSubscription>,
        max: i64,
    ) -> Result<Vec<Subscription>> {
        let mut tx = self.write.begin().await?;
        let now = now_ms();
        let has: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM user_subscriptions WHERE app_id = $1 AND organizer_key = $2")
                .bind(tenant.app_id)
                .bind(tenant.organizer_key)
                .fetch_one(&mut *tx)
                .await?;
        if has + new.len() as i64 > max {
            return Err(Error::Conflict(format!(
                "the organizer has {has} subscriptions in this application; {} more would pass the most it may \
                 have, {max}",
                new.len()
            )));
        }
        let mut keys = Vec::with_capacity(new.len());
        for s in &new {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT webhook_key FROM webhooks WHERE webhook_key = $1 AND app_id = $2")
                    .bind(&s.webhook_key)
                    .bind(tenant.app_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                return Err(Error::not_found(format!("webhookKey {} not found", s.webhook_key)));
            }
            let key = new_key();
            sqlx::query(
                "INSERT INTO user_subscriptions (subscription_key, app_id, organizer_key, webhook_key, callback_url, \
                 state, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .bind(&s.webhook_key)
            .bind(&s.callback_url)
            .bind(s.state.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            keys.push(key);
        }
        tx.commit().await?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(
                self.get_subscription(tenant, &key)
                    .await?
                    .ok_or_else(|| Error::Internal("created subscription vanished".into()))?,
            );
        }
        Ok(out)
    }

    async fn get_subscription(&self, tenant: Tenant, key: &str) -> Result<Option<Subscription>> {
        Ok(self.fetch_subscriptions(tenant, Some(key)).await?.into_iter().next())
    }

    async fn list_subscriptions(&self, tenant: Tenant) -> Result<Vec<Subscription>> {
        self.fetch_subscriptions(tenant, None).await
    }

    async fn update_subscriptions(&self, tenant: Tenant, changes: Vec<SubscriptionChange>) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let mut resumed = 0;
        for c in &changes {
            // Reactivating clears the reason and the failure clock of an automatic deactivation.
            let reactivate = c.state == Some(State::Active);
            let n = sqlx::query(
                "UPDATE user_subscriptions SET state = COALESCE($1, state), callback_url = COALESCE($2, callback_url), \
                 inactive_reason = CASE WHEN $3 THEN NULL ELSE inactive_reason END, \
                 failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END \
                 WHERE subscription_key = $4 AND app_id = $5 AND organizer_key = $6",
            )
            .bind(c.state.map(State::as_str))
            .bind(&c.callback_url)
            .bind(reactivate)
            .bind(&c.key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 0 {
                return Err(Error::not_found(format!("userSubscriptionKey {} not found", c.key)));
            }
            let now = now_ms();
            let of_subscription = "subscription_key = $2";
            match c.state {
                Some(State::Inactive) => pause(&mut tx, of_subscription, &c.key, now).await?,
                Some(State::Active) => {
                    let sql = "subscription_key = $2 AND EXISTS (SELECT 1 FROM webhooks w \
                               WHERE w.webhook_key = s.webhook_key AND w.state = 'ACTIVE')";
                    resumed += resume(&mut tx, sql, &c.key, now).await?
                }
                None => {}
            }
            if let Some(url) = &c.callback_url {
                follow_url(&mut tx, "subscription_key = $2", url, &c.key).await?;
            }
        }
        tx.commit().await?;
        self.changed(Changed::Routes { resumed }).await;
        Ok(())
    }

    async fn delete_subscriptions(&self, tenant: Tenant, keys: &[String]) -> Result<u64> {
        let mut tx = self.write.begin().await?;
        let mut n = 0;
        let now = now_ms();
        for key in keys {
            let gone = sqlx::query(
                "DELETE FROM user_subscriptions WHERE subscription_key = $1 AND app_id = $2 AND organizer_key = $3",
            )
            .bind(key)
            .bind(tenant.app_id)
            .bind(tenant.organizer_key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if gone > 0 {
                cancel(&mut tx, "subscription_key = $3", key, Cancel::SubscriptionDeleted, now).await?;
            }
            n += gone;
        }
        tx.commit().await?;
        if n > 0 {
            self.changed(Changed::Routes { resumed: 0 }).await;
        }
        Ok(n)
    }

    async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>> {
        let mut qb = QueryBuilder::<$db>::new(format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE 1 = 1"));
        if let Some(v) = &f.state {
            qb.push(" AND state = ").push_bind(v);
        }
        if let Some(v) = &f.webhook_key {
            qb.push(" AND webhook_key = ").push_bind(v);
        }
        if let Some(v) = &f.subscription_key {
            qb.push(" AND subscription_key = ").push_bind(v);
        }
        if let Some(v) = &f.event_name {
            qb.push(" AND event_name = ").push_bind(v);
        }
        if let Some(v) = &f.event_key {
            // An event's deliveries lie within the range of ids kept on it (the random eventKey is not indexed).
            qb.push(" AND event_key = ").push_bind(v);
            qb.push(" AND id BETWEEN (SELECT first_delivery FROM events WHERE event_key = ")
                .push_bind(v)
                .push(") AND (SELECT last_delivery FROM events WHERE event_key = ")
                .push_bind(v)
                .push(")");
        }
        if let Some(v) = f.since {
            qb.push(" AND created_at >= ").push_bind(v);
        }
        if let Some(v) = f.until {
            qb.push(" AND created_at < ").push_bind(v);
        }
        // The walk of the primary key is bounded to ids that can hold the window: by the slack, the rows before
        // the first bound were all created before `since`, and those from the second on at or after `until`.
        // They are found first, so the listing's plan sees a range, not a subquery of unknown size.
        if f.since.is_some() || f.until.is_some() {
            const SLACK: i64 = $crate::store::common::CREATION_ORDER_SLACK_MS;
            let bound = |present: bool, param: &str| match present {
                true => $crate::store::common::id_bound(param),
                false => "CAST(NULL AS BIGINT)".to_string(),
            };
            let sql = format!(
                "SELECT {} AS first_id, {} AS end_id",
                bound(f.since.is_some(), "$1"),
                bound(f.until.is_some(), "$2")
            );
            let row = sqlx::query(&sql)
                .bind(f.since.map_or(0, |v| v.saturating_sub(SLACK)))
                .bind(f.until.map_or(0, |v| v.saturating_add(SLACK)))
                .fetch_one(&self.read)
                .await?;
            // NULL on an empty table: the comparison then lists nothing, as there is nothing.
            if f.since.is_some() {
                qb.push(" AND id >= ").push_bind(row.try_get::<Option<i64>, _>("first_id")?);
            }
            if f.until.is_some() {
                qb.push(" AND id < ").push_bind(row.try_get::<Option<i64>, _>("end_id")?);
            }
        }
        if let Some(v) = f.before_id {
            qb.push(" AND id < ").push_bind(v);
        }
        qb.push(" ORDER BY id DESC LIMIT ").push_bind(f.limit);
        let rows = qb.build().fetch_all(&self.read).await?;
        rows.iter().map(delivery_from_row).collect()
    }

    async fn get_delivery(&self, id: i64) -> Result<Option<(DeliveryRow, Vec<AttemptRow>)>> {
        let sql = format!("SELECT {DELIVERY_COLS} FROM deliveries WHERE id = $1");
        let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(&self.read).await? else {
            return Ok(None);
        };
        let attempts = sqlx::query(
            "SELECT number, node, started_at, duration_ms, status_code, error, response_excerpt \
             FROM attempts WHERE delivery_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(|r| {
            Ok(AttemptRow {
                number: r.try_get("number")?,
                node: r.try_get("node")?,
                started_at: r.try_get("started_at")?,
                duration_ms: r.try_get("duration_ms")?,
                status_code: r.try_get("status_code")?,
                error: r.try_get("error")?,
                response_excerpt: r.try_get("response_excerpt")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok(Some((delivery_from_row(&row)?, attempts)))
    }

    async fn retry_deliveries(&self, target: RetryTarget<'_>) -> Result<u64> {
        let (cond, key): (&str, String) = match target {
            RetryTarget::Delivery(id) => ("id = $2", id.to_string()),
            RetryTarget::Event(k) => (
                "event_key = $2 AND id BETWEEN (SELECT first_delivery FROM events WHERE event_key = $2) \
                 AND (SELECT last_delivery FROM events WHERE event_key = $2)",
                k.to_string(),
            ),
            RetryTarget::FailedOfSubscription(k) => ("subscription_key = $2 AND state = 'failed'", k.to_string()),
        };
        let sql = format!(
            // `updated_at` always moves, even within the millisecond it was last set in: an attempt in flight
            // compares it with the value its job was read with, and must see the retry.
            "UPDATE deliveries SET state = 'pending', next_attempt_at = $1, \
             updated_at = CASE WHEN updated_at >= $1 THEN updated_at + 1 ELSE $1 END WHERE {cond} \
             AND EXISTS (SELECT 1 FROM user_subscriptions s WHERE s.subscription_key = deliveries.subscription_key)"
        );
        let mut q = sqlx::query(&sql).bind(now_ms());
        q = match target {
            RetryTarget::Delivery(id) => q.bind(id),
            _ => q.bind(key),
        };
        Ok(q.execute(&self.write).await?.rows_affected())
    }

    async fn webhook_secret(&self, webhook_key: &str) -> Result<Option<String>> {
        let stored: Option<Option<String>> =
            sqlx::query_scalar("SELECT secret_key FROM webhooks WHERE webhook_key = $1")
                .bind(webhook_key)
                .fetch_optional(&self.read)
                .await?;
        stored
            .flatten()
            .map(|s| self.ring.open(&sealed::webhook_row(webhook_key), &s))
            .transpose()
    }

    async fn reseal_secrets(&self, every: bool) -> Result<u64> {
        let newest = self
            .ring
            .newest_id()
            .ok_or_else(|| Error::Config("no secrets key: start with --secrets-keys".into()))?
            .to_string();
        // Plain rows (from before sealing), or with `every` also those sealed with an older key; in batches,
        // each its own transaction, so a rekey stopped half-way goes on where it stopped.
        // A value sealed with a key the keyring lacks stops it, named: nothing could open it.
        let wanted = |v: &Option<String>| -> Result<bool> {
            Ok(match v.as_deref() {
                None | Some("") => false,
                Some(v) => match Keyring::sealed_with(v) {
                    None => true,
                    Some(id) if !self.ring.has(id) => {
                        return Err(Error::Config(format!(
                            "stored secrets are sealed with key {id}, which is not in the keyring: add it to \
                             --secrets-keys (after the newest)"
                        )))
                    }
                    Some(id) => every && id != newest,
                },
            })
        };
        let mut done = 0;
        loop {
            let mut tx = self.write.begin().await?;
            let mut n = 0;
            let keys = sqlx::query("SELECT id, value FROM secret_keys WHERE value NOT LIKE $1 ORDER BY id LIMIT 500")
                .bind(format!("g2w1:{newest}:%"))
                .fetch_all(&mut *tx)
                .await?;
            for r in &keys {
                let (id, value): (i64, Option<String>) = (r.try_get("id")?, r.try_get("value")?);
                if wanted(&value)? {
                    let row = sealed::secret_key_row(id);
                    let plain = self.ring.open(&row, value.as_deref().unwrap_or_default())?;
                    sqlx::query("UPDATE secret_keys SET value = $1 WHERE id = $2")
                        .bind(self.ring.seal(&row, &plain)?)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    n += 1;
                }
            }
            let hooks = sqlx::query(
                "SELECT webhook_key, secret_key FROM webhooks WHERE secret_key IS NOT NULL AND secret_key NOT LIKE $1 \
                 ORDER BY webhook_key LIMIT 500",
            )
            .bind(format!("g2w1:{newest}:%"))
            .fetch_all(&mut *tx)
            .await?;
            for r in &hooks {
                let (key, value): (String, Option<String>) = (r.try_get("webhook_key")?, r.try_get("secret_key")?);
                if wanted(&value)? {
                    let row = sealed::webhook_row(&key);
                    let plain = self.ring.open(&row, value.as_deref().unwrap_or_default())?;
                    sqlx::query("UPDATE webhooks SET secret_key = $1 WHERE webhook_key = $2")
                        .bind(self.ring.seal(&row, &plain)?)
                        .bind(&key)
                        .execute(&mut *tx)
                        .await?;
                    n += 1;
                }
            }
            tx.commit().await?;
            done += n;
            // A batch that changed nothing has only rows this pass leaves as they are.
            if n == 0 {
                return Ok(done);
            }
        }
    }

    async fn route(&self, subscription_key: &str, webhook_key: &str) -> Result<Route> {
        let row = sqlx::query(
            "SELECT w.state AS w_state, w.secret_key, s.state AS s_state, \
             COALESCE(s.callback_url, w.callback_url) AS url FROM webhooks w \
             LEFT JOIN user_subscriptions s ON s.subscription_key = $1 AND s.webhook_key = w.webhook_key \
             WHERE w.webhook_key = $2",
        )
        .bind(subscription_key)
        .bind(webhook_key)
        .fetch_optional(&self.read)
        .await?;
        let Some(row) = row else {
            return Ok(Route {
                standing: Standing::Gone(Cancel::WebhookDeleted),
                url: None,
                own_secret: false,
            });
        };
        let w_state: String = row.try_get("w_state")?;
        let s_state: Option<String> = row.try_get("s_state")?;
        let secret: Option<String> = row.try_get("secret_key")?;
        Ok(Route {
            standing: Standing::of(Some(&w_state), s_state.as_deref()),
            url: row.try_get("url")?,
            own_secret: secret.is_some(),
        })
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM deliveries WHERE state = 'pending'")
                .fetch_one(&self.read)
                .await?;
        Ok(QueueStats {
            waiting: row.try_get("n")?,
            oldest_waiting_created_at: row.try_get("oldest")?,
        })
    }

$($hot)*
}
    };
}

pub(crate) use sql_store;

/// How far the order of deliveries' ids and of their `created_at` may disagree: a delivery's time is read by the
/// node that publishes it, its id given when its group commits, so a group that waited on its commit (the
/// slowest seen took a quarter of a second) or nodes' clocks apart can put a later id at an earlier time. A
/// walk bounded by creation time reads this much more of the table at each end of its window.
pub(crate) const CREATION_ORDER_SLACK_MS: i64 = 10_000;

/// A subquery for the id where `created_at` reaches `at` (an SQL expression) in the primary key, found by a
/// binary search of it (about 40 probes of one index entry each), as there is no index on `created_at`. NULL
/// on an empty table. If the search ends past the first row, the row just before the bound was created before
/// `at`; if before the last, the first row at or past it was created at or after `at`. Ids are handed out in
/// creation order only up to [`CREATION_ORDER_SLACK_MS`], so a walk bounded by it still checks every row's own
/// `created_at`, and one that must be exact moves `at` by the slack. (The ends are read apart: SQLite reads
/// `min` and `max` through the index only when each is alone.)
pub(crate) fn id_bound(at: &str) -> String {
    let probe = "(SELECT created_at FROM deliveries WHERE id >= (b.lo + b.hi) / 2 ORDER BY id LIMIT 1)";
    format!(
        "(WITH RECURSIVE b(lo, hi) AS ( \
           SELECT (SELECT min(id) FROM deliveries), (SELECT max(id) FROM deliveries) + 1 \
           UNION ALL \
           SELECT CASE WHEN {probe} < {at} THEN (b.lo + b.hi) / 2 + 1 ELSE b.lo END, \
                  CASE WHEN {probe} < {at} THEN b.hi ELSE (b.lo + b.hi) / 2 END \
           FROM b WHERE b.lo < b.hi) \
         SELECT max(lo) FROM b)"
    )
}
