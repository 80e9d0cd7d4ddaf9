//! The scenarios, one method each (what they measure: docs/BENCHMARKS.md).

use super::*;

impl Bench {
    /// The **throughput** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn throughput(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let (events, batch, pubs, max_wait) = (self.args.events, self.args.batch, self.args.batch_publishers, MAX_WAIT);
        let (server, _) = self.start_server(db, &[]).await?;
        self.subscribe(&server, db, url, 1).await?;
        let server = Arc::new(server);
        let cpu = server.cpu();
        let start = Instant::now();
        let publish = self.publish_batched(&server, events, batch, pubs).await?;
        self.wait_for(seen, events, max_wait).await?;
        let end = seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        self.complete(backend, scenario, seen, events)?;
        self.record_cpu(backend, scenario, &server, cpu, events);
        let rss = server.peak_rss_mib();
        self.record(
            backend,
            scenario,
            "events accepted/s (batched)",
            events as f64 / publish.as_secs_f64(),
            "/s",
            false,
        );
        self.record(
            backend,
            scenario,
            "deliveries/s end to end",
            events as f64 / (end - start).as_secs_f64(),
            "/s",
            true,
        );
        self.record(backend, scenario, "peak server memory", rss, "MiB", false);
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        Ok(())
    }

    /// The **fanout** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn fanout(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let a = self.args.clone();
        let (pubs, max_wait) = (self.args.batch_publishers, MAX_WAIT);
        let (server, _) = self.start_server(db, &[]).await?;
        self.subscribe(&server, db, url, a.fanout_subs).await?;
        let server = Arc::new(server);
        seen.record_arrivals.store(false, Ordering::Relaxed);
        let total = a.fanout_events * a.fanout_subs;
        let cpu = server.cpu();
        let start = Instant::now();
        self.publish_batched(&server, a.fanout_events, 100, pubs).await?;
        self.wait_for(seen, total, max_wait).await?;
        let end = seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        self.record_cpu(backend, scenario, &server, cpu, total);
        self.record(
            backend,
            scenario,
            "deliveries/s end to end",
            total as f64 / (end - start).as_secs_f64(),
            "/s",
            true,
        );
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        Ok(())
    }

    /// The **latency** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn latency(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let dir = r.dir;
        let a = self.args.clone();
        let max_wait = MAX_WAIT;
        // The bound the disk sets: the same arrivals, acknowledged by nothing but a write and an
        // fdatasync on the database's file system. Measured first, so the two do not share the disk.
        let (rate, secs, probe) = (a.latency_rate, a.latency_secs, dir.to_path_buf());
        let bound = tokio::task::spawn_blocking(move || disk_bound(&probe, rate, secs)).await??;
        self.record_percentiles(backend, scenario, "disk alone: arrival to fdatasync", bound);
        let (server, _) = self.start_server(db, &[]).await?;
        self.subscribe(&server, db, url, 1).await?;
        let server = Arc::new(server);
        let n = a.latency_rate * a.latency_secs;
        // The first second warms up connections and caches and is left out of the figures.
        let warm = a.latency_rate as i64;
        let interval = Duration::from_secs_f64(1.0 / a.latency_rate as f64);
        let sent: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(n as usize);
        let cpu = server.cpu();
        for k in -warm..n as i64 {
            ticker.tick().await;
            let (server, sent) = (server.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                sent.lock().expect("lock").insert(k, Instant::now());
                server.publish(event(k, 1)).await
            }));
        }
        for t in tasks {
            t.await??;
        }
        self.wait_for(seen, n + warm as u64, max_wait).await?;
        self.complete(backend, scenario, seen, n)?;
        self.record_cpu(backend, scenario, &server, cpu, n + warm as u64);
        if (-warm..0).any(|k| !seen.arrivals.lock().expect("lock").contains_key(&k)) {
            bail!("a warm-up event never arrived");
        }
        let lat: Vec<f64> = {
            let arrivals = seen.arrivals.lock().expect("lock");
            let sent = sent.lock().expect("lock");
            (0..n as i64)
                .map(|k| (arrivals[&k] - sent[&k]).as_secs_f64() * 1000.0)
                .collect()
        };
        self.record_percentiles(backend, scenario, "publish to callback", lat);
        let (over, p99) = commit_tail(&server.metrics().await?).context("no commit histogram in /metrics")?;
        self.record(
            backend,
            scenario,
            "server: store commits over 3 ms",
            over * 100.0,
            "%",
            false,
        );
        self.record(
            backend,
            scenario,
            "server: store commit p99 (bucket bound)",
            p99 * 1000.0,
            "ms",
            false,
        );
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        Ok(())
    }

    /// The **backlog** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn backlog(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let a = self.args.clone();
        let (batch, pubs, max_wait) = (self.args.batch, self.args.batch_publishers, MAX_WAIT);
        // Deliveries pile up while no worker runs (an API-only node), then a node with workers starts on
        // the same database: its start-up time, drain rate and peak memory are measured.
        let (server, _) = self.start_server(db, &["--no-worker"]).await?;
        self.subscribe(&server, db, url, 1).await?;
        let server = Arc::new(server);
        seen.record_arrivals.store(false, Ordering::Relaxed);
        self.publish_batched(&server, a.backlog, batch, pubs).await?;
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        let (server, startup) = self.start_server(db, &[]).await?;
        let cpu = server.cpu();
        let start = Instant::now();
        self.record(
            backend,
            "restart",
            "start-up to serving with backlog",
            startup.as_secs_f64() * 1000.0,
            "ms",
            false,
        );
        self.wait_for(seen, a.backlog, max_wait).await?;
        let end = seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        self.record_cpu(backend, scenario, &server, cpu, a.backlog);
        self.record(
            backend,
            scenario,
            "drain deliveries/s",
            a.backlog as f64 / (end - start).as_secs_f64(),
            "/s",
            true,
        );
        self.record(
            backend,
            scenario,
            "peak server memory",
            server.peak_rss_mib(),
            "MiB",
            false,
        );
        server.stop().await?;
        Ok(())
    }

    /// The **retention** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn retention(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let a = self.args.clone();
        let (batch, pubs, max_wait) = (self.args.batch, self.args.batch_publishers, MAX_WAIT);
        // Deliveries finish on a node that keeps everything; then a node keeping them a moment starts on
        // the same database, and how fast its retention removes them (with their attempts and events)
        // is read from its /metrics.
        let (server, _) = self.start_server(db, &["--retention", "off"]).await?;
        self.subscribe(&server, db, url, 1).await?;
        let server = Arc::new(server);
        seen.record_arrivals.store(false, Ordering::Relaxed);
        let n = a.backlog;
        self.publish_batched(&server, n, batch, pubs).await?;
        self.wait_for(seen, n, max_wait).await?;
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Checks come every 50 ms at this retention; the clock starts at the first rows removed.
        let (server, _) = self.start_server(db, &["--retention", "200ms"]).await?;
        let cpu = server.cpu();
        let deadline = Instant::now() + max_wait;
        let mut first: Option<(Instant, f64)> = None;
        let (end, events) = loop {
            let metrics = server.metrics().await?;
            let removed = counter(&metrics, "g2w_deliveries_pruned_total").unwrap_or(0.0);
            let events = counter(&metrics, "g2w_events_pruned_total").unwrap_or(0.0);
            if removed > 0.0 && first.is_none() {
                first = Some((Instant::now(), removed));
            }
            if removed >= n as f64 && events >= n as f64 {
                break (Instant::now(), events);
            }
            if Instant::now() > deadline {
                bail!("retention removed {removed} of {n} deliveries and {events} of {n} events");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (start, before) = first.context("nothing was removed")?;
        let server_us = (server.cpu_secs() - cpu.server) / n as f64 * 1e6;
        self.record(backend, scenario, "events removed", events, "", false);
        self.record(
            backend,
            scenario,
            "server CPU per delivery removed",
            server_us,
            "us",
            false,
        );
        if backend == "postgres" {
            let per = (postgres_cpu_secs() - cpu.database) / n as f64 * 1e6;
            self.record(
                backend,
                scenario,
                "PostgreSQL CPU per delivery removed",
                per,
                "us",
                false,
            );
        }
        let secs = (end - start).as_secs_f64().max(1e-3);
        self.record(
            backend,
            scenario,
            "deliveries removed/s (with their attempts and events)",
            (n as f64 - before) / secs,
            "/s",
            false,
        );
        server.stop().await?;
        Ok(())
    }

    /// The **single** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn single(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let a = self.args.clone();
        let max_wait = MAX_WAIT;
        let (server, _) = self.start_server(db, &[]).await?;
        self.subscribe(&server, db, url, 1).await?;
        let server = Arc::new(server);
        let n = a.single_events;
        let cpu = server.cpu();
        let start = Instant::now();
        self.publish_batched(&server, n, 1, a.publishers).await?;
        self.wait_for(seen, n, max_wait).await?;
        let end = seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        self.complete(backend, scenario, seen, n)?;
        self.record_cpu(backend, scenario, &server, cpu, n);
        let rate = n as f64 / (end - start).as_secs_f64();
        self.record(
            backend,
            scenario,
            &format!("deliveries/s, 1 event/request, {} publishers", a.publishers),
            rate,
            "/s",
            true,
        );
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        // The same load through the relay: both HTTP exchanges of each event and nothing else.
        let (relay_seen, relay_url) = recording_receiver().await?;
        let relay = Arc::new(self.start_relay(&relay_url).await?);
        let from = relay.cpu();
        let start = Instant::now();
        self.publish_batched(&relay, n, 1, a.publishers).await?;
        self.wait_for(&relay_seen, n, max_wait).await?;
        let end = relay_seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        let per = |secs: f64| secs / n as f64 * 1e6;
        let (relay_us, bench_us) = (per(relay.cpu_secs() - from.server), per(cpu_secs("self") - from.bench));
        if let Some(share) = busy_since(from.machine) {
            self.record(
                backend,
                scenario,
                "relay: machine busy (every process)",
                share,
                "%",
                false,
            );
        }
        self.record(backend, scenario, "relay: relay CPU per event", relay_us, "us", false);
        self.record(
            backend,
            scenario,
            "relay: load generator CPU per event (publishers + receiver)",
            bench_us,
            "us",
            false,
        );
        self.record(
            backend,
            scenario,
            "relay: events/s answered at once and forwarded, nothing stored",
            n as f64 / (end - start).as_secs_f64(),
            "/s",
            true,
        );
        Arc::into_inner(relay).context("relay still shared")?.stop().await?;
        Ok(())
    }

    /// The **failing** scenario (see docs/BENCHMARKS.md).
    pub(super) async fn failing(&mut self, r: &Run<'_>) -> anyhow::Result<()> {
        let (backend, scenario) = (r.backend, r.scenario.as_str());
        let db = r.db;
        let url = r.url;
        let seen = r.seen;
        let a = self.args.clone();
        let (batch, pubs, max_wait) = (self.args.batch, self.args.batch_publishers, MAX_WAIT);
        let (server, _) = self
            .start_server(db, &["--retry-schedule", "1ms,2ms,5ms,10ms,20ms,50ms,100ms,200ms"])
            .await?;
        self.subscribe(&server, db, url, 1).await?;
        seen.fail_every_third.store(true, Ordering::Relaxed);
        let server = Arc::new(server);
        let n = a.failing_events;
        let start = Instant::now();
        self.publish_batched(&server, n, batch, pubs).await?;
        let deadline = Instant::now() + max_wait;
        while seen.arrivals.lock().expect("lock").len() < n as usize {
            if Instant::now() > deadline {
                bail!("not every event arrived past the failing receiver");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let end = seen.last.lock().expect("lock").unwrap_or_else(Instant::now);
        self.complete(backend, scenario, seen, n)?;
        self.record(
            backend,
            scenario,
            "deliveries/s, every 3rd answer 500",
            n as f64 / (end - start).as_secs_f64(),
            "/s",
            true,
        );
        Arc::into_inner(server).context("server still shared")?.stop().await?;
        Ok(())
    }
}
