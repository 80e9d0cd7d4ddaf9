//! g2w-bench: measures g2w-webhooks end to end on loopback, next to the ceiling of the same machine.
//!
//! For each backend and scenario it starts a fresh server (the `g2w-webhooks` binary beside this one) on a fresh
//! database, a receiver and a publisher in this process, and reports figures with their ratio to the ceiling:
//! the same receiver driven directly by the same HTTP client at the same concurrency.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use axum::http::{Method, StatusCode};
use clap::Parser;
use g2w_webhooks::config::Durability;
use g2w_webhooks::outbound::{DeliveryClient, Policy};
use serde::Serialize;
use serde_json::{json, Value};

mod measure;
mod procfs;
mod receiver;
mod scenarios;
mod server;

use measure::{commit_tail, counter, disk_bound};
use receiver::{client, fresh_ceiling, json_headers, recording_receiver, Seen};
use server::{Cpu, Server};

use procfs::{busy_since, cpu_secs, disk_write_bytes, machine, machine_ticks, postgres_cpu_secs};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "g2w-bench",
    about = "Benchmark g2w-webhooks against the machine's own ceiling"
)]
struct Args {
    /// Backends: sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
    /// Scenarios: throughput, fanout, latency, backlog, single, failing (backlog includes restart); also
    /// retention (not in the default set: how fast `--retention` removes `--backlog` finished deliveries).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,fanout,latency,backlog,single,failing"
    )]
    scenarios: Vec<Scenario>,
    /// PostgreSQL database for the postgres backend (each run uses a fresh schema).
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Events in the throughput scenario (one subscription each).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per publish request in batched scenarios.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Concurrent publishers in batched scenarios.
    #[arg(long, default_value_t = 4)]
    batch_publishers: usize,
    /// Events in the fan-out scenario.
    #[arg(long, default_value_t = 2_000)]
    fanout_events: u64,
    /// Subscriptions per event in the fan-out scenario.
    #[arg(long, default_value_t = 50)]
    fanout_subs: u64,
    /// Events per second in the latency scenario.
    #[arg(long, default_value_t = 500)]
    latency_rate: u64,
    /// Seconds the latency scenario lasts.
    #[arg(long, default_value_t = 30)]
    latency_secs: u64,
    /// Deliveries waiting in the backlog scenario.
    #[arg(long, default_value_t = 200_000)]
    backlog: u64,
    /// Events in the one-event-per-request scenario.
    #[arg(long, default_value_t = 20_000)]
    single_events: u64,
    /// Concurrent publishers in the one-event-per-request scenario.
    #[arg(long, default_value_t = 32)]
    publishers: usize,
    /// Events in the failing-receiver scenario.
    #[arg(long, default_value_t = 10_000)]
    failing_events: u64,
    /// The server's --max-in-flight, and the ceiling's concurrency.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// The SQLite server's --sqlite-synchronous: full (acknowledged means on disk), normal, off.
    #[arg(long, value_enum, default_value_t = Durability::Full)]
    sqlite_synchronous: Durability,
    /// Tiny sizes for CI: checks every scenario runs and every event arrives, in seconds.
    #[arg(long)]
    smoke: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the bench measures; each is one method of `Bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Throughput,
    Fanout,
    Latency,
    Backlog,
    Retention,
    Single,
    Failing,
}

impl Scenario {
    fn as_str(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Fanout => "fanout",
            Scenario::Latency => "latency",
            Scenario::Backlog => "backlog",
            Scenario::Retention => "retention",
            Scenario::Single => "single",
            Scenario::Failing => "failing",
        }
    }
}

/// What a scenario runs against: a fresh database, a recording receiver, a directory of its own.
struct Run<'a> {
    backend: &'a str,
    scenario: Scenario,
    db: &'a str,
    url: &'a str,
    seen: &'a Arc<Seen>,
    dir: &'a Path,
}

/// Longest a scenario waits for every event to arrive.
const MAX_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize)]
struct Figure {
    backend: String,
    scenario: String,
    metric: String,
    value: f64,
    unit: String,
    /// Ratio to the ceiling, where the figure is a rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    of_ceiling: Option<f64>,
}

/// One webinar.created event as JSON text, written out directly: the publishers' cost per event stays small
/// beside the server's.
fn event(key: i64, organizer: i64) -> String {
    format!(
        r#"{{"eventName":"webinar.created","webinarKey":{key},"organizerKey":{organizer},"webinarTitle":"Benchmark webinar","experienceType":"CLASSIC","recurrenceType":"single_session","status":"NEW","timeZone":"UTC","times":[{{"startTime":"2030-01-01T10:00:00Z","endTime":"2030-01-01T11:00:00Z"}}],"accountKey":77}}"#
    )
}

struct Bench {
    args: Args,
    bin: PathBuf,
    figures: Vec<Figure>,
    /// The ceiling measured before the current scenario.
    ceiling: f64,
    /// The CPU time per request of that ceiling, in us (client and receiver together).
    ceiling_cpu: f64,
}

impl Bench {
    fn record(&mut self, backend: &str, scenario: &str, metric: &str, value: f64, unit: &str, rate: bool) {
        let of_ceiling = rate.then(|| value / self.ceiling);
        self.figures.push(Figure {
            backend: backend.into(),
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            of_ceiling,
        });
        if !self.args.json {
            eprintln!("  {backend:<8} {scenario:<10} {metric:<40} {value:>12.1} {unit}");
        }
    }

    /// The server's (and PostgreSQL's) CPU time per delivery since `from`, how busy the machine was, and, where
    /// a ceiling was measured, the share of it this CPU per delivery allows with both cores fully used.
    fn record_cpu(&mut self, backend: &str, scenario: &str, server: &Server, from: Cpu, deliveries: u64) {
        if let Some(share) = busy_since(from.machine) {
            self.record(backend, scenario, "machine busy (every process)", share, "%", false);
        }
        let server_us = (server.cpu_secs() - from.server) / deliveries as f64 * 1e6;
        self.record(backend, scenario, "server CPU per delivery", server_us, "us", false);
        let bench_us = (cpu_secs("self") - from.bench) / deliveries as f64 * 1e6;
        self.record(
            backend,
            scenario,
            "load generator CPU per delivery (publishers + receiver)",
            bench_us,
            "us",
            false,
        );
        let mut all_us = server_us + bench_us;
        if backend == "postgres" {
            let per = (postgres_cpu_secs() - from.database) / deliveries as f64 * 1e6;
            all_us += per;
            self.record(backend, scenario, "PostgreSQL CPU per delivery", per, "us", false);
        }
        if scenario != "latency" && all_us > 0.0 {
            // The ceiling spends `ceiling_cpu` per request; a delivery here costs `all_us` of the same two cores.
            let bound = self.ceiling_cpu / all_us * 100.0;
            self.record(
                backend,
                scenario,
                "bound from CPU: ceiling's CPU per request / CPU per delivery",
                bound,
                "%",
                false,
            );
        }
        if backend != "postgres" {
            let written = disk_write_bytes(&server.child.id().to_string()) - from.server_disk;
            let per = written / deliveries as f64 / 1024.0;
            self.record(backend, scenario, "server disk writes per delivery", per, "KiB", false);
        }
    }

    fn record_percentiles(&mut self, backend: &str, scenario: &str, what: &str, mut ms: Vec<f64>) {
        ms.sort_by(|x, y| x.total_cmp(y));
        let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
        for (name, v) in [
            ("p50", pct(0.5)),
            ("p90", pct(0.9)),
            ("p99", pct(0.99)),
            ("max", ms[ms.len() - 1]),
        ] {
            self.record(backend, scenario, &format!("{what} {name}"), v, "ms", false);
        }
    }

    /// A token, an ACTIVE webhook and `subs` ACTIVE subscriptions of organizer 1, each to its own path.
    async fn subscribe(&self, server: &Server, db: &str, url: &str, subs: u64) -> anyhow::Result<()> {
        let out = Command::new(&self.bin)
            .args([
                "token",
                "create",
                "--app",
                "bench",
                "--organizer",
                "1",
                "--database-url",
                db,
            ])
            .output()?;
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        let api = format!("{}/G2W/rest/v2", server.base);
        let res: Value = server
            .http
            .post(format!("{api}/webhooks"))
            .bearer_auth(&token)
            .json(&json!([{"product": "g2w", "eventName": "webinar.created", "eventVersion": "1.0.0", "callbackUrl": url}]))
            .send()
            .await?
            .json()
            .await?;
        let wk = res["_embedded"]["webhooks"][0]["webhookKey"]
            .as_str()
            .context("webhook key")?
            .to_string();
        server
            .http
            .put(format!("{api}/webhooks"))
            .bearer_auth(&token)
            .json(&json!([{"webhookKey": wk, "state": "ACTIVE"}]))
            .send()
            .await?;
        secret(server, &api, &token).await?;
        let items: Vec<Value> = (0..subs)
            .map(|i| json!({"webhookKey": wk, "callbackUrl": format!("{url}/{i}")}))
            .collect();
        for chunk in items.chunks(100) {
            server
                .http
                .post(format!("{api}/userSubscriptions"))
                .bearer_auth(&token)
                .json(&chunk)
                .send()
                .await?;
        }
        Ok(())
    }

    /// Publishes events 0..n in batches from several publishers; returns the publish phase's duration.
    async fn publish_batched(
        &self,
        server: &Arc<Server>,
        n: u64,
        batch: u64,
        publishers: usize,
    ) -> anyhow::Result<Duration> {
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..publishers {
            let (server, next) = (server.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let from = next.fetch_add(batch, Ordering::Relaxed);
                    if from >= n {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let events: Vec<String> = (from..(from + batch).min(n)).map(|k| event(k as i64, 1)).collect();
                    server.publish(format!("[{}]", events.join(","))).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(start.elapsed())
    }

    /// Waits until `n` callbacks arrived: distinct events where the receiver records them (a duplicate does
    /// not stand in for an event still missing), every callback otherwise.
    async fn wait_for(&self, seen: &Seen, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let arrived = || {
            if seen.record_arrivals.load(Ordering::Relaxed) {
                seen.arrivals.lock().expect("lock").len() as u64
            } else {
                seen.count.load(Ordering::Relaxed)
            }
        };
        let deadline = Instant::now() + timeout;
        while arrived() < n {
            if Instant::now() > deadline {
                bail!("only {} of {n} callbacks arrived in {timeout:?}", arrived());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Checks that events 0..n all arrived, and records how many arrived more than once.
    fn complete(&mut self, backend: &str, scenario: &str, seen: &Seen, n: u64) -> anyhow::Result<()> {
        {
            let arrivals = seen.arrivals.lock().expect("lock");
            if let Some(k) = (0..n as i64).find(|k| !arrivals.contains_key(k)) {
                bail!("event {k} never arrived");
            }
        }
        let duplicates = seen.duplicates.load(Ordering::Relaxed) as f64;
        self.record(backend, scenario, "duplicate callbacks", duplicates, "", false);
        Ok(())
    }

    async fn scenario(&mut self, backend: &str, scenario: Scenario) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (db, schema) = self.fresh_db(backend, dir.path()).await?;
        let (seen, url) = recording_receiver().await?;
        let a = self.args.clone();
        let ceiling_requests = if a.smoke { 5000 } else { a.events.min(100_000) };
        let with_ceiling = !matches!(scenario, Scenario::Latency | Scenario::Retention);
        if with_ceiling {
            // Measured right before the scenario: on a shared machine the ceiling moves between minutes, and
            // a ratio means most when both sides ran under the same conditions.
            let machine = machine_ticks();
            let (rate, cpu) = fresh_ceiling(ceiling_requests, a.max_in_flight).await?;
            let busy = busy_since(machine);
            self.ceiling = rate;
            self.ceiling_cpu = cpu;
            self.record(
                backend,
                scenario.as_str(),
                "ceiling: receiver driven directly",
                rate,
                "/s",
                true,
            );
            if let Some(share) = busy {
                self.record(
                    backend,
                    scenario.as_str(),
                    "ceiling: machine busy (every process)",
                    share,
                    "%",
                    false,
                );
            }
            self.record(
                backend,
                scenario.as_str(),
                "ceiling: CPU per request (client + receiver)",
                cpu,
                "us",
                false,
            );
        }
        let run = Run {
            backend,
            scenario,
            db: &db,
            url: &url,
            seen: &seen,
            dir: dir.path(),
        };
        match scenario {
            Scenario::Throughput => self.throughput(&run).await?,
            Scenario::Fanout => self.fanout(&run).await?,
            Scenario::Latency => self.latency(&run).await?,
            Scenario::Backlog => self.backlog(&run).await?,
            Scenario::Retention => self.retention(&run).await?,
            Scenario::Single => self.single(&run).await?,
            Scenario::Failing => self.failing(&run).await?,
        }
        if let Some(schema) = schema {
            self.drop_schema(&schema).await?;
        }
        if with_ceiling {
            // Measured again once the scenario is over: where it differs much from the one before, the machine's
            // speed moved during the scenario and its ratios are uncertain by as much (the share shown is of the
            // ceiling before).
            let (rate, _) = fresh_ceiling(ceiling_requests, a.max_in_flight).await?;
            self.record(
                backend,
                scenario.as_str(),
                "ceiling: measured again after the scenario",
                rate,
                "/s",
                true,
            );
        }
        Ok(())
    }
}

async fn secret(server: &Server, api: &str, token: &str) -> anyhow::Result<()> {
    server
        .http
        .post(format!("{api}/webhooks/secretkey"))
        .bearer_auth(token)
        .send()
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        (
            args.events,
            args.fanout_events,
            args.fanout_subs,
            args.latency_rate,
            args.latency_secs,
        ) = (2000, 100, 5, 200, 2);
        (args.backlog, args.single_events, args.failing_events, args.batch) = (3000, 500, 500, 200);
    }
    let bin = std::env::current_exe()?.with_file_name("g2w-webhooks");
    for needed in [&bin, &bin.with_file_name("g2w-relay")] {
        if !needed.exists() {
            bail!("{} not found: build it first (cargo build --release)", needed.display());
        }
    }
    let settings = json!({"events": args.events, "batch": args.batch, "batch_publishers": args.batch_publishers,
        "fanout": [args.fanout_events, args.fanout_subs], "latency": [args.latency_rate, args.latency_secs],
        "backlog": args.backlog, "single": [args.single_events, args.publishers], "failing": args.failing_events,
        "max_in_flight": args.max_in_flight, "sqlite_synchronous": args.sqlite_synchronous.as_str()});
    if !args.json {
        eprintln!("machine {}  settings {settings}", machine());
        eprintln!(
            "  ceiling before each scenario: the server's delivery client, {} connections, the same receiver, no g2w-webhooks",
            args.max_in_flight
        );
    }
    let mut bench = Bench {
        bin,
        figures: Vec::new(),
        ceiling: 0.0,
        ceiling_cpu: 0.0,
        args,
    };
    let backends = bench.args.backends.clone();
    let scenarios = bench.args.scenarios.clone();
    for backend in &backends {
        for &scenario in &scenarios {
            bench
                .scenario(backend, scenario)
                .await
                .with_context(|| format!("{backend} {}", scenario.as_str()))?;
        }
    }
    if bench.args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"machine": machine(), "settings": settings,
            "figures": bench.figures}))?
        );
    } else {
        println!("| backend | scenario | figure | value | of ceiling |\n|---|---|---|---|---|");
        for f in &bench.figures {
            let ratio = f.of_ceiling.map(|r| format!("{:.0}%", r * 100.0)).unwrap_or_default();
            println!(
                "| {} | {} | {} | {:.1} {} | {ratio} |",
                f.backend, f.scenario, f.metric, f.value, f.unit
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_the_json_the_receiver_reads() {
        let v: Value = serde_json::from_str(&event(42, 7)).expect("valid JSON");
        assert_eq!(v["eventName"], "webinar.created");
        assert_eq!(v["webinarKey"], 42);
        assert_eq!(v["organizerKey"], 7);
        assert_eq!(v["times"][0]["endTime"], "2030-01-01T11:00:00Z");
        let k: receiver::KeyOnly = serde_json::from_str(&event(42, 7)).expect("the receiver's view");
        assert_eq!(k.webinar_key, 42);
    }

    #[test]
    fn the_machine_counts_a_busy_core_as_busy() {
        let (busy, total) = machine_ticks();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(spin.elapsed());
        }
        let (busy2, total2) = machine_ticks();
        // 200 ms on one core: about 20 ticks of USER_HZ 100, busy, out of at least as many in all.
        assert!(busy2 - busy >= 10.0, "busy ticks {busy} -> {busy2}");
        assert!(
            total2 - total >= busy2 - busy,
            "total {total} -> {total2}, busy {busy} -> {busy2}"
        );
    }

    #[test]
    fn the_disk_bound_times_every_arrival_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("dir");
        let started = Instant::now();
        let waits = disk_bound(dir.path(), 200, 1).expect("probe");
        assert_eq!(waits.len(), 200, "one wait per arrival");
        assert!(waits.iter().all(|w| *w >= 0.0), "{waits:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(990),
            "arrivals are spread over the second"
        );
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn the_commit_tail_is_read_from_the_histogram() {
        let metrics = "g2w_store_commit_duration_seconds_bucket{le=\"0.002\"} 90\n\
                       g2w_store_commit_duration_seconds_bucket{le=\"0.003\"} 96\n\
                       g2w_store_commit_duration_seconds_bucket{le=\"0.1\"} 99\n\
                       g2w_store_commit_duration_seconds_bucket{le=\"+Inf\"} 100\n\
                       g2w_store_commit_duration_seconds_count 100\n";
        let (over, p99) = commit_tail(metrics).expect("parsed");
        assert!((over - 0.04).abs() < 1e-9, "{over}");
        assert_eq!(p99, 0.1);
        assert_eq!(commit_tail("g2w_events_accepted_total 0\n"), None);
    }

    #[test]
    fn a_counter_is_read_by_its_whole_name() {
        let metrics = "# TYPE g2w_deliveries_pruned_total counter\n\
                       g2w_deliveries_pruned_total_extra 7\n\
                       g2w_deliveries_pruned_total 1500\n\
                       g2w_events_pruned_total 1499\n";
        assert_eq!(counter(metrics, "g2w_deliveries_pruned_total"), Some(1500.0));
        assert_eq!(counter(metrics, "g2w_events_pruned_total"), Some(1499.0));
        assert_eq!(counter(metrics, "g2w_attempts_total"), None);
    }

    #[test]
    fn an_unknown_synchronous_mode_is_refused_before_anything_starts() {
        let err = Args::try_parse_from(["g2w-bench", "--sqlite-synchronous", "sometimes"]).expect_err("refused");
        assert!(err.to_string().contains("sometimes"), "{err}");
        let ok = Args::try_parse_from(["g2w-bench", "--sqlite-synchronous", "off"]).expect("accepted");
        assert_eq!(ok.sqlite_synchronous, Durability::Off);
    }
}
