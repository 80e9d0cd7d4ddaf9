//! The storage trait's contract, run against both backends: every `Store` must behave the same.

use bytes::Bytes;
use g2w_webhooks::domain::delivery::{AttemptRecord, Lease, NewEvent, Outcome, RetryTarget, Standing};
use g2w_webhooks::domain::{EventName, NewSubscription, NewWebhook, State, SubscriptionChange, Tenant, WebhookChange};
use g2w_webhooks::store::{self, DeliveryFilter, DynStore, Pruned};

use crate::support::Backend;

crate::on_both!(
    tenancy_scoping,
    publish_fan_out_and_idempotence,
    concurrent_publishes_get_their_own_outcomes,
    claims_are_exclusive_until_the_lease_expires,
    attempts_move_deliveries_through_their_states,
    a_retry_asked_for_during_an_attempt_outlives_its_result,
    a_backlog_drains_in_full_claims_and_what_falls_behind_is_claimed_again,
    retention_removes_what_finished_before_the_cutoff_and_nothing_pending,
    ids_of_removed_deliveries_are_not_given_again_after_a_restart,
    an_event_goes_with_its_last_delivery,
    a_database_from_before_delivery_id_ranges_finds_its_events_deliveries,
    listing_by_creation_time_finds_every_delivery_in_the_window,
    deleting_a_subscription_cancels_its_waiting_deliveries_at_once,
    claims_read_where_a_subscription_stands_now,
    an_attempt_in_flight_when_its_subscription_changes_keeps_the_change
);

async fn open(b: Backend) -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = b.fresh_url(dir.path()).await;
    (
        store::connect(
            &url,
            4,
            g2w_webhooks::config::Durability::Normal,
            crate::support::test_keyring(),
        )
        .await
        .unwrap(),
        dir,
    )
}

/// An application with an ACTIVE webhook for `event` and an ACTIVE subscription of `organizer`.
async fn subscribed(s: &DynStore, app: &str, organizer: i64, event: EventName) -> (Tenant, String, String) {
    let app_id = s.ensure_app(app).await.unwrap();
    let t = Tenant {
        app_id,
        organizer_key: organizer,
    };
    let hook = s
        .create_webhooks(
            app_id,
            vec![NewWebhook {
                event_name: event,
                event_version: "1.0.0".into(),
                callback_url: format!("https://{app}.example/{organizer}"),
                secret_key: None,
            }],
            1000,
        )
        .await
        .unwrap()
        .remove(0);
    s.update_webhooks(
        app_id,
        vec![WebhookChange {
            key: hook.key.clone(),
            state: Some(State::Active),
            callback_url: None,
        }],
    )
    .await
    .unwrap();
    let sub = s
        .create_subscriptions(
            t,
            vec![NewSubscription {
                webhook_key: hook.key.clone(),
                callback_url: None,
                state: State::Active,
            }],
            1000,
        )
        .await
        .unwrap()
        .remove(0);
    (t, hook.key, sub.key)
}

fn event(key: &str, organizer: i64) -> NewEvent {
    NewEvent {
        event_key: key.into(),
        organizer_key: organizer,
        event_name: EventName::WebinarCreated,
        body: Bytes::from_static(b"{}"),
    }
}

/// A first attempt of `job`, started now, that ended with `outcome`.
fn first_attempt(job: &g2w_webhooks::domain::delivery::DeliveryJob, outcome: Outcome) -> AttemptRecord {
    AttemptRecord {
        delivery_id: job.id,
        subscription_key: job.subscription_key.clone(),
        number: 1,
        node: "n".into(),
        started_at: g2w_webhooks::domain::now_ms(),
        job_updated_at: job.updated_at,
        duration_ms: 1,
        status_code: Some(200),
        error: None,
        response_excerpt: None,
        outcome,
    }
}

/// Publishes `events` leased to node "n" and returns the deliveries created, in order.
async fn publish_leased(s: &DynStore, events: Vec<NewEvent>) -> Vec<g2w_webhooks::domain::delivery::DeliveryJob> {
    s.publish(events, Some(lease("n", 60_000)))
        .await
        .unwrap()
        .into_iter()
        .flat_map(|o| o.jobs)
        .collect()
}

fn lease(owner: &str, ms: i64) -> Lease {
    Lease {
        owner: owner.into(),
        until: g2w_webhooks::domain::now_ms() + ms,
    }
}

async fn tenancy_scoping(b: Backend) {
    let (s, _dir) = open(b).await;
    let (a, wk, sk) = subscribed(&s, "a", 1, EventName::WebinarCreated).await;
    let other_app = Tenant {
        app_id: s.ensure_app("b").await.unwrap(),
        organizer_key: 1,
    };
    let other_org = Tenant {
        app_id: a.app_id,
        organizer_key: 2,
    };
    assert!(s.get_webhook(other_app.app_id, &wk).await.unwrap().is_none());
    assert!(s.get_subscription(other_org, &sk).await.unwrap().is_none());
    assert!(s
        .update_webhooks(
            other_app.app_id,
            vec![WebhookChange {
                key: wk.clone(),
                state: Some(State::Inactive),
                callback_url: None
            }]
        )
        .await
        .is_err());
    assert_eq!(
        s.delete_subscriptions(other_org, std::slice::from_ref(&sk))
            .await
            .unwrap(),
        0
    );
    s.delete_webhooks(other_app.app_id, std::slice::from_ref(&wk))
        .await
        .unwrap();
    assert!(s.get_webhook(a.app_id, &wk).await.unwrap().is_some());
    let sub = s.get_subscription(a, &sk).await.unwrap().unwrap();
    assert_eq!(sub.activation_state(), State::Active);
    s.delete_webhooks(a.app_id, &[wk]).await.unwrap();
    assert!(
        s.get_subscription(a, &sk).await.unwrap().is_none(),
        "deleting a webhook deletes its subscriptions"
    );
}

async fn publish_fan_out_and_idempotence(b: Backend) {
    let (s, _dir) = open(b).await;
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    subscribed(&s, "b", 7, EventName::WebinarCreated).await;
    subscribed(&s, "c", 8, EventName::WebinarCreated).await;
    let out = s
        .publish(
            vec![event("e1", 7), event("e2", 8), event("e1", 7)],
            Some(lease("n1", 60_000)),
        )
        .await
        .unwrap();
    assert_eq!((out[0].deliveries, out[0].duplicate, out[0].jobs.len()), (2, false, 2));
    assert_eq!((out[1].deliveries, out[1].jobs.len()), (1, 1));
    assert!(out[2].duplicate && out[2].jobs.is_empty());
    let again = s.publish(vec![event("e1", 7)], None).await.unwrap();
    assert_eq!((again[0].deliveries, again[0].duplicate), (2, true));
    let all = s
        .list_deliveries(&DeliveryFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let of_e1 = s
        .list_deliveries(&DeliveryFilter {
            event_key: Some("e1".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_e1.len(), 2, "an event's deliveries are found by its key");
    assert_eq!(s.retry_deliveries(RetryTarget::Event("e2")).await.unwrap(), 1);
}

/// Concurrent requests share group commits; each still gets its own outcomes, and one key published by many
/// requests at once is created exactly once.
async fn concurrent_publishes_get_their_own_outcomes(b: Backend) {
    let (s, _dir) = open(b).await;
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{i}");
            let out = s.publish(vec![event(&key, 7), event("shared", 7)], None).await.unwrap();
            (key, out)
        }));
    }
    let mut created_shared = 0;
    for t in tasks {
        let (key, out) = t.await.unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].event_key.as_str(), out[0].duplicate, out[0].deliveries),
            (key.as_str(), false, 1)
        );
        assert_eq!((out[1].event_key.as_str(), out[1].deliveries), ("shared", 1));
        created_shared += usize::from(!out[1].duplicate);
    }
    assert_eq!(created_shared, 1, "the shared key is created once");
}

async fn claims_are_exclusive_until_the_lease_expires(b: Backend) {
    let (s, _dir) = open(b.clone()).await;
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let events: Vec<NewEvent> = (0..10).map(|i| event(&format!("e{i}"), 7)).collect();
    s.publish(events, None).await.unwrap();
    let now = g2w_webhooks::domain::now_ms();
    let first = s.claim_due(now, &lease("n1", 300), 6).await.unwrap();
    let second = s.claim_due(now, &lease("n2", 300), 100).await.unwrap();
    assert_eq!((first.len(), second.len()), (6, 4));
    let ids: std::collections::HashSet<i64> = first.iter().chain(&second).map(|j| j.id).collect();
    assert_eq!(ids.len(), 10, "no delivery handed out twice");
    assert!(s.claim_due(now, &lease("n3", 300), 100).await.unwrap().is_empty());
    assert_eq!(s.next_due(now).await.unwrap(), None, "held deliveries are not waiting");
    if matches!(b, Backend::Postgres(_)) {
        // Shared databases: a dead node's leases expire and any node takes the deliveries.
        tokio::time::sleep(std::time::Duration::from_millis(350)).await;
        let later = g2w_webhooks::domain::now_ms();
        assert_eq!(
            s.claim_due(later, &lease("n3", 60_000), 100).await.unwrap().len(),
            10,
            "expired leases return"
        );
    }
    s.release_leases(None).await.unwrap();
    let later = g2w_webhooks::domain::now_ms();
    assert_eq!(s.next_due(later).await.unwrap().map(|t| t <= later), Some(true));
    assert_eq!(
        s.claim_due(later, &lease("n4", 60_000), 100).await.unwrap().len(),
        10,
        "released leases return"
    );
}

async fn attempts_move_deliveries_through_their_states(b: Backend) {
    let (s, _dir) = open(b).await;
    let (t, _, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let jobs: Vec<_> = s
        .publish(
            vec![event("ok", 7), event("retry", 7), event("gone", 7)],
            Some(lease("n", 60_000)),
        )
        .await
        .unwrap()
        .into_iter()
        .flat_map(|o| o.jobs)
        .collect();
    let now = g2w_webhooks::domain::now_ms();
    let rec = |job: &g2w_webhooks::domain::delivery::DeliveryJob, outcome: Outcome, status: i64| AttemptRecord {
        delivery_id: job.id,
        subscription_key: sk.clone(),
        number: 1,
        node: "n".into(),
        started_at: now,
        job_updated_at: job.updated_at,
        duration_ms: 3,
        status_code: Some(status),
        error: None,
        response_excerpt: Some("body".into()),
        outcome,
    };
    s.record_attempts(
        vec![
            rec(&jobs[0], Outcome::Delivered, 200),
            rec(&jobs[1], Outcome::RetryAt(now + 60_000), 500),
        ],
        86_400_000,
    )
    .await
    .unwrap();
    let (d, attempts) = s.get_delivery(jobs[0].id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.attempts, attempts.len()), ("delivered", 1, 1));
    assert_eq!(attempts[0].response_excerpt.as_deref(), Some("body"));
    let (d, _) = s.get_delivery(jobs[1].id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.next_attempt_at), ("pending", now + 60_000));
    assert_eq!(s.queue_stats().await.unwrap().waiting, 2);
    s.record_attempts(vec![rec(&jobs[2], Outcome::Gone, 410)], 86_400_000)
        .await
        .unwrap();
    let sub = s.get_subscription(t, &sk).await.unwrap().unwrap();
    assert_eq!(sub.state, State::Inactive);
    assert!(sub.inactive_reason.unwrap().contains("410"));
    assert_eq!(
        s.retry_deliveries(RetryTarget::FailedOfSubscription(&sk))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.retry_deliveries(RetryTarget::Event("ok")).await.unwrap(), 1);
    assert_eq!(s.get_delivery(jobs[0].id).await.unwrap().unwrap().0.state, "pending");
}

/// An operator retries a delivery while its attempt is in flight: the attempt's result is logged but does not
/// overwrite the retry, so the delivery is attempted again. Without a retry, the result settles the delivery.
async fn a_retry_asked_for_during_an_attempt_outlives_its_result(b: Backend) {
    let (s, _dir) = open(b).await;
    let (_, _, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let jobs = publish_leased(&s, vec![event("retried", 7), event("settled", 7)]).await;
    // The attempts started within the millisecond of the retry below, or later by their node's clock (clocks
    // are coarse, and nodes' differ): what decides is that the retry changed the delivery after their jobs were
    // read.
    let started_at = g2w_webhooks::domain::now_ms() + 1000;
    assert_eq!(s.retry_deliveries(RetryTarget::Delivery(jobs[0].id)).await.unwrap(), 1);
    assert!(
        s.claim_due(g2w_webhooks::domain::now_ms(), &lease("m", 60_000), 10)
            .await
            .unwrap()
            .is_empty(),
        "a retried delivery is not claimed again while its attempt is in flight"
    );
    let delivered = |job: &g2w_webhooks::domain::delivery::DeliveryJob| AttemptRecord {
        delivery_id: job.id,
        subscription_key: sk.clone(),
        number: 1,
        node: "n".into(),
        started_at,
        job_updated_at: job.updated_at,
        duration_ms: 3,
        status_code: Some(200),
        error: None,
        response_excerpt: None,
        outcome: Outcome::Delivered,
    };
    s.record_attempts(vec![delivered(&jobs[0])], 86_400_000).await.unwrap();
    let (d, attempts) = s.get_delivery(jobs[0].id).await.unwrap().unwrap();
    assert_eq!(
        (d.state.as_str(), d.attempts, attempts.len()),
        ("pending", 1, 1),
        "the retry stands, the attempt is logged"
    );
    assert_eq!(s.queue_stats().await.unwrap().waiting, 2);
    // The retried delivery is claimable again (the other is still this node's, in flight).
    let claimed = s
        .claim_due(g2w_webhooks::domain::now_ms(), &lease("m", 60_000), 10)
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![jobs[0].id]);

    // The other delivery is as its job found it: the result settles it.
    s.record_attempts(vec![delivered(&jobs[1])], 86_400_000).await.unwrap();
    let (d, _) = s.get_delivery(jobs[1].id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.attempts), ("delivered", 1));
}

/// A backlog is drained by claims that come back full, each taking deliveries none before it took; a delivery
/// that becomes due again behind them (a retry due in the past, recorded while the backlog drains) is found by
/// the claims that follow.
async fn a_backlog_drains_in_full_claims_and_what_falls_behind_is_claimed_again(b: Backend) {
    let (s, _dir) = open(b).await;
    let (_, _, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let events: Vec<NewEvent> = (0..12).map(|i| event(&format!("b{i}"), 7)).collect();
    s.publish(events, None).await.unwrap();
    let claim = || async {
        s.claim_due(g2w_webhooks::domain::now_ms(), &lease("n", 60_000), 4)
            .await
            .unwrap()
    };
    let mut seen = std::collections::HashSet::new();
    let first = claim().await;
    let second = claim().await;
    assert_eq!((first.len(), second.len()), (4, 4), "full claims");
    assert!(
        first.iter().chain(&second).all(|j| seen.insert(j.id)),
        "no delivery handed out twice"
    );
    let now = g2w_webhooks::domain::now_ms();
    s.record_attempts(
        vec![AttemptRecord {
            delivery_id: first[1].id,
            subscription_key: sk.clone(),
            number: 1,
            node: "n".into(),
            started_at: now,
            job_updated_at: first[1].updated_at,
            duration_ms: 3,
            status_code: Some(503),
            error: None,
            response_excerpt: None,
            outcome: Outcome::RetryAt(now - 10_000),
        }],
        86_400_000,
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.extend(claim().await.into_iter().map(|j| j.id));
    }
    assert_eq!(rest.len(), 5, "the four never claimed and the retry: {rest:?}");
    assert!(
        rest.contains(&first[1].id),
        "the retry due in the past is claimed again"
    );
    assert!(rest.iter().filter(|id| **id != first[1].id).all(|id| seen.insert(*id)));
}

/// Retention removes finished deliveries with their attempts, and the events nothing refers to any more; a
/// pending delivery stays however old, and so does its event. A removed event's key can be published again.
async fn retention_removes_what_finished_before_the_cutoff_and_nothing_pending(b: Backend) {
    let (s, _dir) = open(b).await;
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let published = s
        .publish(
            vec![
                event("done", 7),
                event("failed", 7),
                event("waiting", 7),
                event("nobody", 8),
            ],
            Some(lease("n", 60_000)),
        )
        .await
        .unwrap();
    assert_eq!(published[3].deliveries, 0, "organizer 8 has no subscription");
    let jobs: Vec<_> = published.into_iter().flat_map(|o| o.jobs).collect();
    let now = g2w_webhooks::domain::now_ms();
    s.record_attempts(
        vec![
            first_attempt(&jobs[0], Outcome::Delivered),
            first_attempt(&jobs[1], Outcome::Failed),
            first_attempt(&jobs[2], Outcome::RetryAt(now + 60_000)),
        ],
        86_400_000,
    )
    .await
    .unwrap();

    // Nothing finished before a cutoff in the past.
    assert_eq!(s.prune(now - 60_000, 1000).await.unwrap(), Pruned::default());
    // A cutoff after everything: one delivery per pass at a limit of one, then the rest.
    let later = g2w_webhooks::domain::now_ms() + 1000;
    let first = s.prune(later, 1).await.unwrap();
    assert_eq!((first.deliveries, first.attempts), (1, 1));
    let rest = s.prune(later, 1000).await.unwrap();
    assert_eq!((rest.deliveries, rest.attempts), (1, 1));
    assert_eq!(
        first.events + rest.events,
        3,
        "done, failed and nobody: {first:?} {rest:?}"
    );
    assert_eq!(s.prune(later, 1000).await.unwrap(), Pruned::default());

    assert!(s.get_delivery(jobs[0].id).await.unwrap().is_none());
    assert!(s.get_delivery(jobs[1].id).await.unwrap().is_none());
    let (waiting, attempts) = s.get_delivery(jobs[2].id).await.unwrap().unwrap();
    assert_eq!((waiting.state.as_str(), attempts.len()), ("pending", 1));
    assert_eq!(s.queue_stats().await.unwrap().waiting, 1);

    // The removed event's key is new again; the kept one is still a duplicate. New deliveries take new ids.
    let again = s
        .publish(vec![event("done", 7), event("waiting", 7)], Some(lease("n", 60_000)))
        .await
        .unwrap();
    assert!(!again[0].duplicate && again[1].duplicate, "{again:?}");
    assert!(again[0].jobs[0].id > jobs[2].id);
}

/// Retention may remove the newest deliveries (a quiet service): a restarted store still numbers new ones past
/// them, so an id an operator noted never names another delivery.
async fn ids_of_removed_deliveries_are_not_given_again_after_a_restart(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = b.fresh_url(dir.path()).await;
    let s = store::connect(
        &url,
        4,
        g2w_webhooks::config::Durability::Normal,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let jobs = publish_leased(&s, vec![event("one", 7), event("two", 7)]).await;
    let newest = jobs.iter().map(|j| j.id).max().unwrap();
    let delivered = jobs.iter().map(|j| first_attempt(j, Outcome::Delivered)).collect();
    s.record_attempts(delivered, 86_400_000).await.unwrap();
    let pruned = s.prune(g2w_webhooks::domain::now_ms() + 1000, 1000).await.unwrap();
    assert_eq!(pruned.deliveries, 2);
    drop(s);

    let s = store::connect(
        &url,
        4,
        g2w_webhooks::config::Durability::Normal,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    let again = s
        .publish(vec![event("three", 7)], Some(lease("n", 60_000)))
        .await
        .unwrap();
    assert!(again[0].jobs[0].id > newest, "{} after {newest}", again[0].jobs[0].id);
}

/// An event with two deliveries (two applications subscribe its organizer) stays while either is kept, and
/// goes in the pass that removes the last; both removed in one pass take it with them.
async fn an_event_goes_with_its_last_delivery(b: Backend) {
    let (s, _dir) = open(b).await;
    subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    subscribed(&s, "b", 7, EventName::WebinarCreated).await;
    let jobs = publish_leased(&s, vec![event("split", 7), event("together", 7)]).await;
    assert_eq!(jobs.len(), 4);
    let delivered = |which: &str| -> Vec<AttemptRecord> {
        jobs.iter()
            .filter(|j| j.event_key == which)
            .map(|j| first_attempt(j, Outcome::Delivered))
            .collect()
    };
    s.record_attempts(delivered("split"), 86_400_000).await.unwrap();
    let later = g2w_webhooks::domain::now_ms() + 1000;
    let one = s.prune(later, 1).await.unwrap();
    assert_eq!(
        (one.deliveries, one.events),
        (1, 0),
        "the other delivery still refers to it"
    );
    let two = s.prune(later, 1).await.unwrap();
    assert_eq!((two.deliveries, two.events), (1, 1));

    s.record_attempts(delivered("together"), 86_400_000).await.unwrap();
    let later = g2w_webhooks::domain::now_ms() + 1000;
    let both = s.prune(later, 1000).await.unwrap();
    assert_eq!((both.deliveries, both.attempts, both.events), (2, 2, 1));
    let again = s
        .publish(vec![event("split", 7), event("together", 7)], None)
        .await
        .unwrap();
    assert!(again.iter().all(|o| !o.duplicate), "{again:?}");
}

/// A database written before events kept the range of their deliveries' ids: the migration fills the ranges in,
/// and an event's deliveries are then listed, retried and removed through them.
async fn a_database_from_before_delivery_id_ranges_finds_its_events_deliveries(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = b.fresh_url(dir.path()).await;
    let rows = "INSERT INTO events (event_key, organizer_key, event_name, body, deliveries, created_at) VALUES \
          ('two', 7, 'webinar.created', $1, 2, 100), ('other', 7, 'webinar.created', $1, 1, 100), \
          ('none', 7, 'webinar.created', $1, 0, 100); \
        INSERT INTO applications (id, name, created_at) VALUES (1, 'a', 100); \
        INSERT INTO webhooks (webhook_key, app_id, event_name, event_version, callback_url, state, created_at) \
          VALUES ('w', 1, 'webinar.created', '1.0.0', 'https://a.example/', 'ACTIVE', 100); \
        INSERT INTO user_subscriptions (subscription_key, app_id, organizer_key, webhook_key, state, created_at) \
          VALUES ('s1', 1, 7, 'w', 'ACTIVE', 100); \
        INSERT INTO deliveries (event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
          next_attempt_at, created_at, updated_at) VALUES \
          ('two', 'webinar.created', 1, 'w', 's1', 'https://a.example/', 'delivered', 100, 100, 100), \
          ('other', 'webinar.created', 1, 'w', 's1', 'https://a.example/', 'delivered', 100, 100, 100), \
          ('two', 'webinar.created', 1, 'w', 's2', 'https://a.example/', 'failed', 100, 100, 100)";
    write_rows(&b, &url, Some((5, 8)), rows).await;
    let s = store::connect(
        &url,
        4,
        g2w_webhooks::config::Durability::Normal,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    let of = |key: &str| DeliveryFilter {
        event_key: Some(key.into()),
        limit: 100,
        ..Default::default()
    };
    let two = s.list_deliveries(&of("two")).await.unwrap();
    let mut subs: Vec<&str> = two.iter().map(|d| d.subscription_key.as_str()).collect();
    subs.sort_unstable();
    assert_eq!(subs, ["s1", "s2"]);
    assert_eq!(s.list_deliveries(&of("other")).await.unwrap().len(), 1);
    assert!(s.list_deliveries(&of("none")).await.unwrap().is_empty());
    assert_eq!(s.retry_deliveries(RetryTarget::Event("other")).await.unwrap(), 1);
    // The retried delivery is pending again, so it and its event stay; the rest goes.
    let pruned = s.prune(g2w_webhooks::domain::now_ms() + 1000, 1000).await.unwrap();
    assert_eq!((pruned.deliveries, pruned.events), (2, 2));
    assert!(s.list_deliveries(&of("two")).await.unwrap().is_empty());
    assert_eq!(s.list_deliveries(&of("other")).await.unwrap().len(), 1);
}

/// Writes `statements` (separated by "; ", each given `{}` as `$1` where it has one) into the database at `url`
/// before a store opens it, migrated up to below `before` (SQLite's version, PostgreSQL's), or fully.
async fn write_rows(b: &Backend, url: &str, before: Option<(i64, i64)>, statements: &str) {
    macro_rules! write {
        ($pool:expr, $migrator:expr, $below:expr) => {{
            let pool = $pool;
            let mut migrator = $migrator;
            if let Some(below) = $below {
                migrator.migrations = migrator
                    .migrations
                    .iter()
                    .filter(|m| m.version < below)
                    .cloned()
                    .collect::<Vec<_>>()
                    .into();
            }
            migrator.run(&pool).await.unwrap();
            for statement in statements.split("; ") {
                let query = sqlx::query(statement);
                let query = match statement.contains("$1") {
                    true => query.bind(&b"{}"[..]),
                    false => query,
                };
                query.execute(&pool).await.unwrap();
            }
            pool.close().await;
        }};
    }
    match b {
        Backend::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
                .await
                .unwrap();
            write!(pool, sqlx::migrate!("migrations/sqlite"), before.map(|b| b.0))
        }
        Backend::Postgres(_) => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            write!(pool, sqlx::migrate!("migrations/postgres"), before.map(|b| b.1))
        }
    }
}

/// `since` and `until` bound the listing's walk of the primary key by ids found for them, yet every delivery
/// created in the window is listed, also where the order of ids and of `created_at` disagree (nodes' clocks,
/// a publish group that waited), by up to the slack the store allows for it.
async fn listing_by_creation_time_finds_every_delivery_in_the_window(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = b.fresh_url(dir.path()).await;
    const BASE: i64 = 1_700_000_000_000;
    // A second apart in id order, each moved by up to 4 s either way (scattered): later ids up to 6 s earlier.
    let created: Vec<i64> = (0..300i64)
        .map(|i| BASE + i * 1000 + ((i * i * 31 + i * 7 + 17) % 9 - 4) * 1000)
        .collect();
    let values: Vec<String> = created
        .iter()
        .map(|at| format!("('e', 'webinar.created', 1, 'w', 's', 'https://a.example/', 'delivered', {at}, {at}, {at})"))
        .collect();
    let rows = format!(
        "INSERT INTO events (event_key, organizer_key, event_name, body, deliveries, created_at) \
           VALUES ('e', 7, 'webinar.created', $1, 300, {BASE}); \
         INSERT INTO deliveries (event_key, event_name, app_id, webhook_key, subscription_key, url, state, \
           next_attempt_at, created_at, updated_at) VALUES {}",
        values.join(", ")
    );
    write_rows(&b, &url, None, &rows).await;
    let s = store::connect(
        &url,
        4,
        g2w_webhooks::config::Durability::Normal,
        crate::support::test_keyring(),
    )
    .await
    .unwrap();
    let all = s
        .list_deliveries(&DeliveryFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), created.len());
    let at_of_id: std::collections::HashMap<i64, i64> = all.iter().map(|d| (d.id, d.created_at)).collect();

    let edges = [
        BASE - 100_000,
        BASE,
        BASE + 42_500,
        BASE + 150_000,
        BASE + 299_000,
        BASE + 400_000,
    ];
    for since in edges.iter().map(|&e| Some(e)).chain([None]) {
        for until in edges.iter().map(|&e| Some(e)).chain([None]) {
            let got: Vec<i64> = s
                .list_deliveries(&DeliveryFilter {
                    since,
                    until,
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .iter()
                .map(|d| d.id)
                .collect();
            let want: Vec<i64> = all
                .iter()
                .map(|d| d.id)
                .filter(|id| {
                    let at = at_of_id[id];
                    since.is_none_or(|v| at >= v) && until.is_none_or(|v| at < v)
                })
                .collect();
            assert_eq!(got, want, "since {since:?}, until {until:?}");
        }
    }
}

/// Deleting a subscription ends its waiting deliveries in one step: bounded time however many wait, and none of
/// them claimable afterwards. Another tenant's waiting delivery is untouched.
async fn deleting_a_subscription_cancels_its_waiting_deliveries_at_once(b: Backend) {
    let (s, _dir) = open(b).await;
    let (t, _, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let (_, _, other) = subscribed(&s, "b", 8, EventName::WebinarCreated).await;
    for batch in 0..10 {
        let events = (0..1000).map(|i| event(&format!("e{batch}-{i}"), 7)).collect();
        s.publish(events, None).await.unwrap();
    }
    s.publish(vec![event("o", 8)], None).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(s.delete_subscriptions(t, std::slice::from_ref(&sk)).await.unwrap(), 1);
    let took = started.elapsed();
    eprintln!("10,000 waiting deliveries cancelled in {took:?}");
    assert!(took < std::time::Duration::from_secs(5), "10,000 cancelled in {took:?}");
    let jobs = s
        .claim_due(g2w_webhooks::domain::now_ms() + 1000, &lease("n", 60_000), 20_000)
        .await
        .unwrap();
    let claimed: Vec<&str> = jobs.iter().map(|j| j.subscription_key.as_str()).collect();
    assert_eq!(
        claimed,
        [other.as_str()],
        "only the other tenant's delivery is claimable"
    );
    let cancelled = s
        .list_deliveries(&DeliveryFilter {
            state: Some("cancelled".into()),
            limit: 20_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 10_000);
    assert!(cancelled
        .iter()
        .all(|d| d.last_error.as_deref() == Some("subscription deleted")));
    // Cancelled is final: retention removes them like finished ones; the waiting delivery stays.
    let pruned = s.prune(g2w_webhooks::domain::now_ms() + 1000, 20_000).await.unwrap();
    assert_eq!((pruned.deliveries, pruned.events), (10_000, 10_000));
}

/// A claim reads the subscription as it stands: its URL now, and whether it is still ACTIVE.
async fn claims_read_where_a_subscription_stands_now(b: Backend) {
    let (s, _dir) = open(b).await;
    let (t, wk, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    s.publish(vec![event("e1", 7)], None).await.unwrap();
    let new_url = "https://moved.example/hook".to_string();
    let change = WebhookChange {
        key: wk.clone(),
        state: None,
        callback_url: Some(new_url.clone()),
    };
    s.update_webhooks(t.app_id, vec![change]).await.unwrap();
    let now = || g2w_webhooks::domain::now_ms() + 1000;
    let jobs = s.claim_due(now(), &lease("n", 60_000), 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].url.as_str(), jobs[0].standing),
        (new_url.as_str(), Standing::Active)
    );
    let listed = s.get_delivery(jobs[0].id).await.unwrap().unwrap().0;
    assert_eq!(listed.url, new_url, "the waiting delivery shows where it goes now");
    s.record_attempts(vec![first_attempt(&jobs[0], Outcome::RetryAt(0))], i64::MAX)
        .await
        .unwrap();

    // Deactivated: the waiting delivery is paused at once, and out of the claims.
    let deactivate = |state| SubscriptionChange {
        key: sk.clone(),
        state: Some(state),
        callback_url: None,
    };
    s.update_subscriptions(t, vec![deactivate(State::Inactive)])
        .await
        .unwrap();
    let id = jobs[0].id;
    assert_eq!(s.get_delivery(id).await.unwrap().unwrap().0.state, "paused");
    assert!(s.claim_due(now(), &lease("n", 60_000), 10).await.unwrap().is_empty());
    // Made pending again by an operator while still inactive: the claim says so, and the engine pauses it again
    // without logging an attempt.
    assert_eq!(s.retry_deliveries(RetryTarget::Delivery(id)).await.unwrap(), 1);
    let jobs = s.claim_due(now(), &lease("n", 60_000), 10).await.unwrap();
    assert_eq!(jobs[0].standing, Standing::Inactive);
    let mut paused = first_attempt(&jobs[0], Outcome::Paused);
    paused.number = jobs[0].attempts;
    s.record_attempts(vec![paused], i64::MAX).await.unwrap();
    let (d, attempts) = s.get_delivery(id).await.unwrap().unwrap();
    assert_eq!((d.state.as_str(), d.attempts, attempts.len()), ("paused", 1, 1));
    // Active again: due now.
    s.update_subscriptions(t, vec![deactivate(State::Active)])
        .await
        .unwrap();
    let jobs = s.claim_due(now(), &lease("n", 60_000), 10).await.unwrap();
    assert_eq!((jobs.len(), jobs[0].standing), (1, Standing::Active));
}

/// An attempt in flight when its subscription is paused or deleted: a success settles the delivery as
/// delivered; anything else leaves it paused or cancelled, with the attempt logged.
async fn an_attempt_in_flight_when_its_subscription_changes_keeps_the_change(b: Backend) {
    let (s, _dir) = open(b).await;
    let (t, _, sk) = subscribed(&s, "a", 7, EventName::WebinarCreated).await;
    let jobs = publish_leased(&s, vec![event("e1", 7), event("e2", 7)]).await;
    let change = SubscriptionChange {
        key: sk.clone(),
        state: Some(State::Inactive),
        callback_url: None,
    };
    s.update_subscriptions(t, vec![change]).await.unwrap();
    s.record_attempts(
        vec![
            first_attempt(&jobs[0], Outcome::Delivered),
            first_attempt(&jobs[1], Outcome::RetryAt(0)),
        ],
        i64::MAX,
    )
    .await
    .unwrap();
    let state = |id| {
        let s = s.clone();
        async move { s.get_delivery(id).await.unwrap().unwrap() }
    };
    assert_eq!(state(jobs[0].id).await.0.state, "delivered");
    let (d, attempts) = state(jobs[1].id).await;
    assert_eq!((d.state.as_str(), attempts.len()), ("paused", 1));

    s.delete_subscriptions(t, &[sk]).await.unwrap();
    assert_eq!(
        state(jobs[0].id).await.0.state,
        "delivered",
        "what was delivered stays so"
    );
    let (d, _) = state(jobs[1].id).await;
    assert_eq!(
        (d.state.as_str(), d.last_error.as_deref()),
        ("cancelled", Some("subscription deleted"))
    );
}
