//! A server (or relay) process the bench started, and what it reads of it.

use super::*;

/// The keyring every server of a run seals secrets with (a backlog's two nodes share one database).
const BENCH_KEYS: &str = "bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// CPU seconds used so far, read at the start of a measurement.
#[derive(Clone, Copy)]
pub(super) struct Cpu {
    pub(super) server: f64,
    /// Bytes the server has caused to be written to storage (`write_bytes` in `/proc/PID/io`).
    pub(super) server_disk: f64,
    pub(super) database: f64,
    /// This process: the publishers and the receiver.
    pub(super) bench: f64,
    /// The whole machine's busy and total clock ticks.
    pub(super) machine: (f64, f64),
}

pub(super) struct Server {
    pub(super) child: Child,
    pub(super) base: String,
    /// For set-up and `/metrics`.
    pub(super) http: reqwest::Client,
    pub(super) publisher: DeliveryClient,
    pub(super) events: axum::http::Uri,
}

impl Server {
    pub(super) fn cpu_secs(&self) -> f64 {
        cpu_secs(&self.child.id().to_string())
    }

    /// CPU used so far by the server and by PostgreSQL.
    pub(super) fn cpu(&self) -> Cpu {
        Cpu {
            server_disk: disk_write_bytes(&self.child.id().to_string()),
            server: self.cpu_secs(),
            database: postgres_cpu_secs(),
            bench: cpu_secs("self"),
            machine: machine_ticks(),
        }
    }

    pub(super) fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Publishes through the same client the ceiling uses (the server's delivery client), so publishing costs
    /// the machine no more than a ceiling request does.
    pub(super) async fn publish(&self, body: String) -> anyhow::Result<()> {
        let mut headers = json_headers();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer bench-admin"));
        let answer = self
            .publisher
            .post(self.events.clone(), headers, Bytes::from(body), 4096)
            .await
            .map_err(|e| anyhow::anyhow!("publish failed: {e}"))?;
        if answer.status != 202 {
            bail!(
                "publish answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.excerpt)
            );
        }
        Ok(())
    }

    pub(super) async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// A scenario that fails part-way leaves no server behind.
impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_999)
}

/// Fresh databases and the processes that run on them.
impl Bench {
    /// A fresh database: a file in `dir`, or a new PostgreSQL schema (named in the second value).
    pub(super) async fn fresh_db(
        &self,
        backend: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<(String, Option<String>)> {
        if backend == "sqlite" {
            return Ok((format!("sqlite://{}", dir.join("bench.db").display()), None));
        }
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&self.args.postgres_url)
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await?;
        pool.close().await;
        let sep = if self.args.postgres_url.contains('?') { '&' } else { '?' };
        Ok((
            format!("{}{sep}options[search_path]={schema}", self.args.postgres_url),
            Some(schema),
        ))
    }

    /// Drops a scenario's schema, so that PostgreSQL's autovacuum does not work through its tables while the
    /// next scenario runs on the same cores.
    pub(super) async fn drop_schema(&self, schema: &str) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(&self.args.postgres_url).await?;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok(())
    }

    pub(super) async fn start_server(&self, db: &str, extra: &[&str]) -> anyhow::Result<(Server, Duration)> {
        let port = free_port();
        let started = Instant::now();
        let mut command = Command::new(&self.bin);
        command
            .args([
                "serve",
                "--dev",
                "--database-url",
                db,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args([
                "--admin-token",
                "bench-admin",
                "--max-in-flight",
                &self.args.max_in_flight.to_string(),
            ])
            .args(["--sqlite-synchronous", self.args.sqlite_synchronous.as_str()])
            .args(extra)
            .env("G2W_SECRETS_KEYS", BENCH_KEYS)
            .env("RUST_LOG", "warn");
        let server = Self::ready(command, port).await?;
        Ok((server, started.elapsed()))
    }

    /// The relay (`g2w-relay`, beside this binary), forwarding every event it is sent to `target`.
    pub(super) async fn start_relay(&self, target: &str) -> anyhow::Result<Server> {
        let port = free_port();
        let mut command = Command::new(self.bin.with_file_name("g2w-relay"));
        command.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--target",
            target,
            "--max-in-flight",
            &self.args.max_in_flight.to_string(),
        ]);
        Self::ready(command, port).await
    }

    /// Starts `command`, listening on `port`, and waits until it answers `/readyz`.
    pub(super) async fn ready(mut command: Command, port: u16) -> anyhow::Result<Server> {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = client(64);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the server did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let server = Server {
            events: format!("{base}/admin/v1/events").parse()?,
            publisher: DeliveryClient::new(Policy::AllowPrivate, Duration::from_secs(300), 64),
            child,
            base,
            http,
        };
        Ok(server)
    }
}
