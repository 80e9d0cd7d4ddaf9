//! Command line and environment configuration. Every setting has a flag, an `G2W_*` variable and a doc line,
//! so `--help` is the configuration reference.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "g2w-webhooks",
    version,
    about = "GoToWebinar Webhooks API: management and signed, durable delivery"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "G2W_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API and the delivery workers.
    Serve(ServeArgs),
    /// Run only the delivery workers (no HTTP API except health and metrics).
    Worker(ServeArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate(DbArgs),
    /// Print the dev application's bearer token and the dev admin token as shell exports
    /// (`eval "$(g2w-webhooks dev-tokens)"`). The same database always gives the same tokens.
    DevTokens(DbArgs),
    /// Manage bearer tokens (works while the server runs).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Publish a realistic sample event to a running server.
    Trigger(TriggerArgs),
    /// Inspect and repair deliveries on a running server.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Receive deliveries locally: answer the validation GET, verify signatures, print events, optionally forward.
    Listen(ListenArgs),
    /// Check the signature of one captured delivery (body from FILE, or stdin).
    Verify {
        /// Secret key; repeat to accept any of several (rotation).
        #[arg(long, required = true)]
        secret: Vec<String>,
        /// The X-Webhook-Signature-Timestamp header.
        #[arg(long)]
        timestamp: String,
        /// The X-Webhook-Signature header.
        #[arg(long)]
        signature: String,
        /// File holding the raw body; `-` or nothing reads stdin.
        file: Option<String>,
    },
    /// The keys that seal stored secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Deliver every delivery of an event again.
    Redeliver {
        /// The event's eventKey.
        event_key: String,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Print a new key as `--secrets-keys` takes it (put it first; keep the old ones until `rekey` is done).
    NewKey {
        /// The key's id.
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Seal every stored secret again with the newest key (in batches, while the server runs; run it again to
    /// go on after a stop). Then the older keys can leave the keyring.
    Rekey(DbArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Database URL: `sqlite://FILE` (embedded default) or `postgres://...` for several nodes.
    #[arg(long, env = "G2W_DATABASE_URL", default_value = "sqlite://g2w-webhooks.db")]
    pub database_url: String,
    /// Keys that seal the stored secrets, newest first: `ID:BASE64,...` (32 bytes each; `secrets new-key` makes
    /// one). Without it a SQLite database uses the key file beside it (`FILE.secrets`, made on first start);
    /// PostgreSQL needs it.
    #[arg(long, env = "G2W_SECRETS_KEYS", hide_env_values = true)]
    pub secrets_keys: Option<String>,
}

impl DbArgs {
    /// The database these name, opened with their keyring.
    pub async fn open(&self, pool: u32, durability: Durability) -> crate::error::Result<crate::store::DynStore> {
        let ring = crate::store::keyring_for(&self.database_url, self.secrets_keys.as_deref())?;
        crate::store::connect(&self.database_url, pool, durability, std::sync::Arc::new(ring)).await
    }

    /// The database these name, for a command that reads no secret (tokens, migrations): no keyring needed.
    pub async fn open_without_secrets(&self) -> crate::error::Result<crate::store::DynStore> {
        let ring = std::sync::Arc::new(crate::store::sealed::Keyring::none());
        crate::store::connect(&self.database_url, 1, Durability::Full, ring).await
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "G2W_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub db: DbArgs,

    /// Development mode: allows http:// and private callback URLs, creates a dev application and organizer and
    /// prints their token, the admin token and a curl line.
    #[arg(long, env = "G2W_DEV")]
    pub dev: bool,

    /// Token that authorizes the admin API (`/admin/v1`: publishing events, deliveries). Without it, and outside
    /// dev mode, the admin API refuses every request.
    #[arg(long, env = "G2W_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Run the API only; another node's workers deliver.
    #[arg(long, env = "G2W_NO_WORKER")]
    pub no_worker: bool,

    /// Most delivery attempts in flight at once on this node.
    #[arg(long, env = "G2W_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Delays between attempts after a failure, comma separated (units ms, s, m, h). The number of delays is the
    /// number of retries.
    #[arg(long, env = "G2W_RETRY_SCHEDULE", default_value = "5s,30s,2m,10m,30m,1h,3h,6h,12h", value_parser = parse_schedule)]
    pub retry_schedule: Schedule,

    /// How long a callback has to answer one delivery attempt.
    #[arg(long, env = "G2W_ATTEMPT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub attempt_timeout: Duration,

    /// A subscription whose deliveries have all failed for this long is set INACTIVE.
    #[arg(long, env = "G2W_DISABLE_AFTER", default_value = "24h", value_parser = parse_duration)]
    pub disable_after: Duration,

    /// How long a client has to send a request's headers; past it the connection is closed.
    #[arg(long, env = "G2W_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a request may take from its headers to its answer (body and callback checks included); past it
    /// the answer is 408.
    #[arg(long, env = "G2W_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Allow `--dev` on an address that is not loopback (it turns on private callback URLs and prints tokens).
    #[arg(long, env = "G2W_DEV_ALLOW_REMOTE")]
    pub dev_allow_remote: bool,

    /// Most webhooks one application may have; past it creating one answers 409.
    #[arg(long, env = "G2W_MAX_WEBHOOKS_PER_APP", default_value_t = 1000)]
    pub max_webhooks_per_app: i64,

    /// Most user subscriptions one organizer may have in one application; past it creating one answers 409.
    #[arg(long, env = "G2W_MAX_SUBSCRIPTIONS_PER_ORGANIZER", default_value_t = 1000)]
    pub max_subscriptions_per_organizer: i64,

    /// Attempts in flight to one callback destination (scheme, host and port) at most, so one slow or hostile
    /// destination cannot take every slot; its other deliveries wait for its own.
    #[arg(long, env = "G2W_MAX_IN_FLIGHT_PER_DESTINATION", default_value_t = 32)]
    pub max_in_flight_per_destination: usize,

    /// How long a callback URL has to answer the validation GET.
    #[arg(long, env = "G2W_CALLBACK_CHECK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub callback_check_timeout: Duration,

    /// Also send the Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature).
    #[arg(long, env = "G2W_STANDARD_WEBHOOKS")]
    pub standard_webhooks: bool,

    /// How long a claimed delivery stays with this node before another may take it (PostgreSQL).
    #[arg(long, env = "G2W_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,

    /// Longest a worker waits before looking for due deliveries on its own.
    #[arg(long, env = "G2W_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// How long finished deliveries (delivered or failed), their attempts and their events are kept, counted
    /// from when they finished; `off` keeps everything. Pending deliveries are never removed.
    #[arg(long, env = "G2W_RETENTION", default_value = "30d", value_parser = parse_retention)]
    pub retention: Retention,

    /// Requests a second each token may make to the GoTo API (as the real service limits it, 10 by default
    /// there); past it, 429 with `Retry-After`. Unset: no limit.
    #[arg(long, env = "G2W_RATE_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: Option<u32>,

    /// How long shutdown waits for in-flight attempts to finish.
    #[arg(long, env = "G2W_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Database connections for reads (PostgreSQL: the whole pool).
    #[arg(long, env = "G2W_DB_POOL", default_value_t = 8)]
    pub db_pool: u32,

    /// SQLite durability: `full` makes an acknowledged write survive power loss, `normal` survives a process crash.
    #[arg(long, env = "G2W_SQLITE_SYNCHRONOUS", value_enum, default_value_t = Durability::Full)]
    pub sqlite_synchronous: Durability,
}

/// How durable an acknowledged write is on SQLite (its `synchronous` setting; PostgreSQL has its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Survives power loss: each commit is synced to disk before it is acknowledged.
    Full,
    /// Survives a crash of the process, not of the machine.
    Normal,
    /// Benchmarks only: a crash of the machine can lose or corrupt acknowledged writes.
    Off,
}

impl Durability {
    /// The flag's value, as the server's command line takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Full => "full",
            Durability::Normal => "normal",
            Durability::Off => "off",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token for an application and organizer; prints only the token.
    Create {
        /// Application (OAuth client) name; created if new.
        #[arg(long)]
        app: String,
        /// Organizer key (int64).
        #[arg(long)]
        organizer: i64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a token.
    Revoke {
        /// The token to revoke.
        token: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AdminClientArgs {
    /// Base URL of the running server.
    #[arg(long, env = "G2W_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Admin token of the running server.
    #[arg(long, env = "G2W_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Port to receive on (127.0.0.1).
    #[arg(long, default_value_t = 4000)]
    pub port: u16,
    /// Secret key to verify with; repeat for rotation. With --subscribe and no key, a fresh key is made for the
    /// webhooks it creates.
    #[arg(long)]
    pub secret: Vec<String>,
    /// Verify with every secret key of this application, read from --database-url.
    #[arg(long)]
    pub app: Option<String>,
    /// Pass each delivery on, headers and body unchanged, to this URL, and answer with its status.
    #[arg(long)]
    pub forward_to: Option<String>,
    /// Print each delivery's raw body as one line (for piping), and nothing else on stdout.
    #[arg(long)]
    pub json: bool,
    /// Create, activate and subscribe webhooks on the server for the events; remove them on exit.
    #[arg(long)]
    pub subscribe: bool,
    /// Events to subscribe to.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "registrant.added,registrant.joined,webinar.created,webinar.changed"
    )]
    pub events: Vec<String>,
    /// Base URL of the running server (for --subscribe).
    #[arg(long, env = "G2W_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Bearer token of the organizer to subscribe (for --subscribe; `dev-tokens` prints the dev one).
    #[arg(long, env = "G2W_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// registrant.added, registrant.joined, webinar.created or webinar.changed.
    pub event: String,
    /// Organizer whose subscriptions receive it.
    #[arg(long)]
    pub organizer: i64,
    /// Override or add a field: `--set webinarTitle=Demo` (numbers and JSON values are taken as JSON).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub admin: AdminClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// pending, delivered, failed, paused or cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        webhook: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long)]
        event_name: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
    /// Show one delivery with its attempts.
    Get {
        id: i64,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
    /// Attempt one delivery again now.
    Retry {
        id: i64,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
    /// Attempt every failed delivery of a subscription again now.
    RetryFailed {
        /// The user subscription key.
        subscription: String,
        #[command(flatten)]
        admin: AdminClientArgs,
    },
}

/// Delays between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("`{s}` needs a unit: ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 5s, 2m or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("`{s}` has unknown unit `{unit}`; use ms, s, m, h or d")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `--retention`: a duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

pub fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(Retention(None));
    }
    match parse_duration(s)? {
        d if d.is_zero() => {
            Err("a retention of zero would remove deliveries as they finish; use `off` to keep everything".into())
        }
        d => Ok(Retention(Some(d))),
    }
}

pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    if s.trim().is_empty() {
        return Ok(Schedule(Vec::new()));
    }
    s.split(',').map(parse_duration).collect::<Result<_, _>>().map(Schedule)
}

impl ServeArgs {
    /// Settings for tests and embedding: defaults, dev mode, the given database.
    pub fn for_database(database_url: &str) -> Self {
        let cli = Cli::parse_from(["g2w-webhooks", "serve", "--dev", "--database-url", database_url]);
        match cli.command {
            Command::Serve(args) => args,
            _ => unreachable!("parsed a serve command"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_schedules_parse() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(
            parse_retention("30d"),
            Ok(Retention(Some(Duration::from_secs(30 * 86_400))))
        );
        assert_eq!(parse_retention("OFF"), Ok(Retention(None)));
        assert!(parse_retention("0s").is_err());
        assert!(parse_retention("forever").is_err());
        let s = parse_schedule("5s,30s,2m").expect("parses");
        assert_eq!(s.0.len(), 3);
    }

    #[test]
    fn the_sqlite_durability_is_one_of_its_names() {
        let parse = |v: &str| Cli::try_parse_from(["g2w-webhooks", "serve", "--sqlite-synchronous", v]);
        let err = parse("sometimes").expect_err("refused");
        assert!(err.to_string().contains("sometimes"), "{err}");
        match parse("normal").expect("accepted").command {
            Command::Serve(args) => assert_eq!(args.sqlite_synchronous, Durability::Normal),
            _ => panic!("a serve command"),
        }
        assert_eq!(
            ServeArgs::for_database("sqlite://x.db").sqlite_synchronous,
            Durability::Full
        );
    }
}
