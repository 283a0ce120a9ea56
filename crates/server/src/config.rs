//! Server configuration: flags, each also settable as a `FLOTILLA_*` environment variable.
//! Parsing never fails on defaults; [`ServerConfig::resolve`] validates and derives the rest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

#[derive(Debug, Clone, Args, Serialize)]
pub struct ServerConfig {
    /// Directory for the database, the CA and the server's keys.
    #[arg(
        long,
        env = "FLOTILLA_DATA_DIR",
        default_value = "./flotilla-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// The database: `sqlite://PATH` (default: DATA_DIR/flotilla.db) or
    /// `postgres://USER:PASSWORD@HOST/DB` for several replicas. A password is never printed.
    #[arg(
        long,
        env = "FLOTILLA_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<flotilla_store::DatabaseUrlArg>,
    /// User API and dashboard (plain HTTP; put it behind TLS termination when exposed).
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// HTTPS listener for devices: /sign-csr, /ca.pem, firmware downloads.
    #[arg(long, env = "FLOTILLA_DEVICE_ADDR", default_value = "0.0.0.0:8443")]
    pub device_addr: SocketAddr,
    /// MQTT over mutual TLS.
    #[arg(long, env = "FLOTILLA_MQTT_ADDR", default_value = "0.0.0.0:8883")]
    pub mqtt_addr: SocketAddr,
    /// Extra names for the server certificate (DNS names or IPs); localhost and 127.0.0.1
    /// are always included.
    #[arg(long, env = "FLOTILLA_PUBLIC_HOST", value_delimiter = ',')]
    pub public_host: Vec<String>,
    /// A device with no heartbeat for this many seconds is marked offline.
    #[arg(
        long = "heartbeat-timeout",
        env = "FLOTILLA_HEARTBEAT_TIMEOUT",
        default_value_t = 90
    )]
    pub heartbeat_timeout_secs: u64,
    /// Lifetime of the device certificates the server issues, in seconds (default 397 days,
    /// the longest public CAs use). Devices renew theirs before it ends (`flotilla-agent
    /// --renew-at`); a stolen key can renew too, so revoke a device you suspect.
    #[arg(
        long = "device-cert-validity",
        env = "FLOTILLA_DEVICE_CERT_VALIDITY",
        default_value_t = flotilla_pki::DEVICE_VALIDITY_DAYS as u64 * 86_400,
        value_parser = clap::value_parser!(u64).range(10..=825 * 86_400)
    )]
    pub device_cert_validity_secs: u64,
    /// Lifetime of the certificates the server's own MQTT clients (downlink, ingest) show the
    /// broker, in seconds (default 30 days); each is renewed after two thirds of it while the
    /// server runs.
    #[arg(
        long = "service-cert-validity",
        env = "FLOTILLA_SERVICE_CERT_VALIDITY",
        default_value_t = flotilla_pki::SERVICE_VALIDITY_DAYS as u64 * 86_400,
        value_parser = clap::value_parser!(u64).range(10..=825 * 86_400)
    )]
    pub service_cert_validity_secs: u64,
    /// Lifetime of the server's TLS certificate (HTTPS device listener, the embedded broker's
    /// device and internal listeners), in seconds (default 365 days); renewed after two thirds of it while the server runs,
    /// shown to every handshake from then on.
    #[arg(
        long = "server-cert-validity",
        env = "FLOTILLA_SERVER_CERT_VALIDITY",
        default_value_t = 365 * 86_400,
        value_parser = clap::value_parser!(u64).range(10..=825 * 86_400)
    )]
    pub server_cert_validity_secs: u64,
    /// What is kept how long.
    #[command(flatten)]
    pub retention: RetentionConfig,
    /// Lifetime of login tokens, in seconds.
    #[arg(long = "jwt-ttl", env = "FLOTILLA_JWT_TTL", default_value_t = 12 * 3600)]
    pub jwt_ttl_secs: u64,
    /// Default and maximum lifetime of provisioning tokens, in seconds.
    #[arg(
        long = "provisioning-ttl",
        env = "FLOTILLA_PROVISIONING_TTL",
        default_value_t = 3600
    )]
    pub provisioning_ttl_secs: u64,
    /// Messages per second a device may publish, sustained; past its burst a device that
    /// publishes faster is disconnected (presence and the audit log say why).
    #[arg(long, env = "FLOTILLA_DEVICE_PUBLISH_RATE", default_value_t = 20)]
    pub device_publish_rate: u32,
    /// Messages a device may publish in a burst above the sustained rate.
    #[arg(long, env = "FLOTILLA_DEVICE_PUBLISH_BURST", default_value_t = 200)]
    pub device_publish_burst: u32,
    /// Open connections the user API accepts from one source address (a reverse proxy in
    /// front counts as one address).
    #[arg(long, env = "FLOTILLA_HTTP_PER_ADDRESS", default_value_t = 256)]
    pub http_per_address: usize,
    /// Open connections the user API accepts in all.
    #[arg(long, env = "FLOTILLA_HTTP_MAX", default_value_t = 1024)]
    pub http_max: usize,
    /// Load balancers (addresses or networks, comma-separated) whose connections to the user
    /// API and the device listener start with a PROXY protocol header (HAProxy `send-proxy` or
    /// `send-proxy-v2`) naming the client: the caps and the login, registration and
    /// certificate-request limits then count clients, not the balancer. A connection from
    /// one of them without a valid header is closed. Name the balancers themselves: anyone
    /// connecting from a named address can claim to be any client.
    #[arg(
        long,
        env = "FLOTILLA_PROXY_PROTOCOL_FROM",
        value_delimiter = ',',
        value_name = "ADDRESS[/PREFIX]"
    )]
    pub proxy_protocol_from: Vec<crate::proxy_protocol::ProxyPeer>,
    /// Open connections the device HTTPS listener (`/sign-csr`, firmware) accepts from one
    /// source address; more are closed at once. Raise it for many devices behind one NAT.
    #[arg(
        long,
        env = "FLOTILLA_DEVICE_LISTENER_PER_ADDRESS",
        default_value_t = 256
    )]
    pub device_listener_per_address: usize,
    /// Open connections the device HTTPS listener accepts in all.
    #[arg(long, env = "FLOTILLA_DEVICE_LISTENER_MAX", default_value_t = 4096)]
    pub device_listener_max: usize,
    /// Seconds an MQTT connection may take from being accepted to an authenticated session
    /// (TLS, then CONNECT); one that is not a session by then is closed.
    #[arg(
        long = "mqtt-handshake-timeout",
        env = "FLOTILLA_MQTT_HANDSHAKE_TIMEOUT",
        default_value_t = 10
    )]
    pub mqtt_handshake_timeout_secs: u64,
    /// MQTT connections from one source address (IPv6: one /64) that may be arriving at once
    /// (accepted, not yet an authenticated session); more are closed at once. Connected devices
    /// do not count, so many devices behind one NAT are not capped by it. With `--demo N` it is
    /// at least N + 16.
    #[arg(long, env = "FLOTILLA_MQTT_PER_ADDRESS", default_value_t = 64)]
    pub mqtt_per_address: usize,
    /// Open MQTT device connections in all; 0 sizes it from the open-file limit (raised to its
    /// hard limit) after the HTTP listeners' caps and 512 more descriptors, three per device,
    /// and from the loopback port range.
    #[arg(long, env = "FLOTILLA_MQTT_MAX_CONNECTIONS", default_value_t = 0)]
    pub mqtt_max_connections: usize,
    /// Maximum telemetry rows per database transaction (group commit).
    #[arg(long, env = "FLOTILLA_INGEST_BATCH", default_value_t = 512)]
    pub ingest_batch: usize,
    /// Also run a demo fleet of N virtual devices (`flotilla-agent sim`, found next to this
    /// binary) owned by a demo account whose credentials go to `DATA_DIR/demo-credentials.json`.
    #[arg(long, env = "FLOTILLA_DEMO", default_value_t = 0)]
    pub demo: usize,
    /// Release public keys (PEM, from `flotilla release keygen`) releases must be signed by.
    /// Several may be trusted at once, for key rotation.
    #[arg(
        long = "release-key",
        env = "FLOTILLA_RELEASE_KEYS",
        value_delimiter = ','
    )]
    pub release_keys: Vec<PathBuf>,
    /// Where release images are stored (default: DATA_DIR/artifacts).
    #[arg(long, env = "FLOTILLA_ARTIFACTS_DIR")]
    pub artifacts_dir: Option<PathBuf>,
    /// Store release images in this S3 bucket instead (credentials from AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY); the artifacts dir then only stages uploads.
    #[arg(long, env = "FLOTILLA_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible service (MinIO, moto, ...); AWS when absent.
    #[arg(long, env = "FLOTILLA_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "FLOTILLA_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// An external MQTT broker instead of the embedded one, as `mqtts://host:port` (its
    /// listener for the server's service clients). Devices connect to that broker, which
    /// must verify them against this server's CA. Experimental: see docs/operations.md for
    /// what this mode does not do yet.
    #[arg(long, env = "FLOTILLA_BROKER_URL")]
    pub broker_url: Option<String>,
    /// PEM file of the CA that signed the external broker's certificate (default: this
    /// server's CA).
    #[arg(long, env = "FLOTILLA_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// A bearer token (at least 24 characters) that opens `GET /metrics` to a scraper (an
    /// admin's JWT opens it too). Environment only, so it stays out of process listings;
    /// never printed.
    #[arg(
        long,
        env = "FLOTILLA_METRICS_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub metrics_token: Option<Secret>,
    /// This server's name among replicas; its ingest session on an external broker is kept
    /// under it, so a restarted replica resumes the messages queued for it.
    #[arg(long, env = "FLOTILLA_REPLICA_ID", default_value = "main")]
    pub replica_id: String,
}

/// A secret setting: trimmed, never shown by `Debug` or `--print-config`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<set>")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Secret, String> {
        let s = s.trim();
        if s.len() < crate::metrics::MIN_TOKEN_LEN {
            return Err(format!(
                "at least {} characters (a bearer secret no login limit protects)",
                crate::metrics::MIN_TOKEN_LEN
            ));
        }
        Ok(Secret(s.to_string()))
    }
}

/// Where an external broker is, from `--broker-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<BrokerUrl, String> {
        let rest = url
            .strip_prefix("mqtts://")
            .ok_or("the broker URL must start with mqtts:// (devices and replicas use TLS)")?;
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or("the broker URL needs a port, as in mqtts://broker:8883")?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(|| format!("not an IPv6 address in brackets: {host:?}"))?,
            None => host,
        };
        let name_like = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !name_like(host) && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("not a broker host: {host:?}"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("not a broker port: {port:?}"))?;
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
        })
    }
}

/// How long each kind of row is kept, and how often retention runs (`crate::retention`).
/// An age is a number with a unit, `s`, `m`, `h` or `d` (`30d`); `0` keeps rows forever.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RetentionConfig {
    /// Telemetry readings, by when they were received.
    #[arg(
        long = "retain-telemetry",
        env = "FLOTILLA_RETAIN_TELEMETRY",
        default_value = "30d"
    )]
    pub telemetry: Age,
    /// At most this many readings per device (its newest sequence numbers); 0: no cap.
    #[arg(
        long = "retain-telemetry-per-device",
        env = "FLOTILLA_RETAIN_TELEMETRY_PER_DEVICE",
        default_value_t = 1_000_000
    )]
    pub telemetry_per_device: u64,
    /// OTA status reports.
    #[arg(
        long = "retain-ota-events",
        env = "FLOTILLA_RETAIN_OTA_EVENTS",
        default_value = "180d"
    )]
    pub ota_events: Age,
    /// Succeeded, failed and expired commands, from when they finished.
    #[arg(
        long = "retain-commands",
        env = "FLOTILLA_RETAIN_COMMANDS",
        default_value = "30d"
    )]
    pub commands: Age,
    /// Provisioning tokens, from when they expired (used or not).
    #[arg(
        long = "retain-tokens",
        env = "FLOTILLA_RETAIN_TOKENS",
        default_value = "7d"
    )]
    pub tokens: Age,
    /// Device messages that could not be stored.
    #[arg(
        long = "retain-dead-letters",
        env = "FLOTILLA_RETAIN_DEAD_LETTERS",
        default_value = "30d"
    )]
    pub dead_letters: Age,
    /// Audit records, once exported (`flotilla audit export`); a signed checkpoint stands in
    /// for the ones removed.
    #[arg(
        long = "retain-audit",
        env = "FLOTILLA_RETAIN_AUDIT",
        default_value = "365d"
    )]
    pub audit: Age,
    /// Seconds between retention runs (the first one a minute after start, or sooner).
    #[arg(
        long = "retention-interval",
        env = "FLOTILLA_RETENTION_INTERVAL",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub interval_secs: u64,
    /// Rows one statement deletes: a batch is a short transaction, so ingest waits at most one.
    #[arg(
        long = "retention-batch",
        env = "FLOTILLA_RETENTION_BATCH",
        default_value_t = 2_000,
        value_parser = clap::value_parser!(i64).range(1..=100_000)
    )]
    pub batch: i64,
}

/// A retention age: `0` (keep forever) or a number with a unit, `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age(pub Option<Duration>);

impl std::str::FromStr for Age {
    type Err = String;

    fn from_str(s: &str) -> Result<Age, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Age(None));
        }
        let bad =
            || format!("not an age: {s:?} (a number and s, m, h or d, as in 30d; 0 keeps forever)");
        let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(unit_at);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let secs = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3_600),
            "d" => n.checked_mul(86_400),
            _ => None,
        }
        .filter(|secs| (1..=100 * 365 * 86_400).contains(secs))
        .ok_or_else(bad)?;
        Ok(Age(Some(Duration::from_secs(secs))))
    }
}

impl Serialize for Age {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str("0"),
            Some(d) => s.serialize_str(&format!("{}s", d.as_secs())),
        }
    }
}

impl ServerConfig {
    /// Host names for the server certificate, defaults first, without duplicates.
    pub fn certificate_hosts(&self) -> Vec<String> {
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        for h in &self.public_host {
            let h = h.trim();
            if !h.is_empty() && !hosts.iter().any(|x| x == h) {
                hosts.push(h.to_string());
            }
        }
        for addr in [self.mqtt_addr, self.device_addr, self.http_addr] {
            let ip = addr.ip();
            if !ip.is_unspecified() && !hosts.contains(&ip.to_string()) {
                hosts.push(ip.to_string());
            }
        }
        hosts
    }

    pub fn publish_limits(&self) -> crate::broker::limits::PublishLimits {
        crate::broker::limits::PublishLimits {
            rate: self.device_publish_rate.max(1),
            burst: self.device_publish_burst.max(1),
            max_payload: flotilla_proto::MAX_PAYLOAD,
        }
    }

    /// How the MQTT front door admits device connections.
    pub fn mqtt_admission(&self) -> crate::broker::front_door::Admission {
        use crate::broker::front_door::{Admission, RESERVED_FDS, device_connection_budget};
        let reserved = (self.http_max + self.device_listener_max) as u64 + RESERVED_FDS;
        let budget = device_connection_budget(reserved);
        let max_connections = match self.mqtt_max_connections {
            0 => budget,
            n => {
                if n > budget {
                    tracing::warn!(
                        asked = n,
                        budget,
                        "--mqtt-max-connections is above what the open-file limit and the loopback port range leave"
                    );
                }
                n
            }
        };
        // The demo fleet connects from this host at once.
        let per_address = self.mqtt_per_address.max(1).max(self.demo + 16);
        Admission {
            max_connections,
            per_address,
            deadline: Duration::from_secs(self.mqtt_handshake_timeout_secs.max(1)),
        }
    }

    pub fn device_cert_validity(&self) -> Duration {
        Duration::from_secs(self.device_cert_validity_secs)
    }

    pub fn service_cert_validity(&self) -> Duration {
        Duration::from_secs(self.service_cert_validity_secs)
    }

    pub fn server_cert_validity(&self) -> Duration {
        Duration::from_secs(self.server_cert_validity_secs)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.heartbeat_timeout_secs.max(1))
    }

    pub fn artifacts_path(&self) -> PathBuf {
        self.artifacts_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("artifacts"))
    }

    /// The external broker, if one is configured; an error names what is wrong with the URL.
    pub fn external_broker(&self) -> anyhow::Result<Option<BrokerUrl>> {
        let Some(url) = self.broker_url.as_deref() else {
            return Ok(None);
        };
        // The replica id names certificates and the broker's session: external mode only.
        let id = &self.replica_id;
        if id.is_empty()
            || id.len() > 32
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            anyhow::bail!("--replica-id: 1-32 letters, digits, '-' or '_', not {id:?}");
        }
        url.parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--broker-url: {e}"))
    }

    /// Which engines this configuration runs on, as `--print-config` shows it.
    pub fn mode(&self) -> serde_json::Value {
        let database = match self.database().map(|url| url.backend()) {
            Ok(flotilla_store::Backend::Sqlite) => "sqlite",
            Ok(flotilla_store::Backend::Postgres) => "postgres",
            Err(_) => "unusable database URL",
        };
        let broker = if self.broker_url.is_some() {
            "external"
        } else {
            "embedded"
        };
        serde_json::json!({ "database": database, "broker": broker })
    }

    /// The database to open: `--database-url`, or the SQLite file in the data dir. The error
    /// says what is wrong without the password.
    pub fn database(&self) -> anyhow::Result<flotilla_store::DatabaseUrl> {
        match &self.database_url {
            Some(arg) => arg
                .parse()
                .map_err(|e| anyhow::anyhow!("--database-url: {e}")),
            None => Ok(flotilla_store::DatabaseUrl::Sqlite(
                self.data_dir.join("flotilla.db"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BrokerUrl, Secret};

    /// The server's settings as clap parses `args`.
    fn parsed(args: &[&str]) -> super::ServerConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: super::ServerConfig,
        }
        let argv = std::iter::once("flotilla-server").chain(args.iter().copied());
        Cli::try_parse_from(argv).unwrap().config
    }

    #[test]
    fn retention_ages_take_a_unit_and_zero_keeps_forever() {
        use super::Age;
        use std::time::Duration;
        let secs = |s: &str| s.parse::<Age>().map(|a| a.0.map(|d| d.as_secs()));
        assert_eq!(secs("0"), Ok(None));
        assert_eq!(secs("90s"), Ok(Some(90)));
        assert_eq!(secs("15m"), Ok(Some(900)));
        assert_eq!(secs("12h"), Ok(Some(43_200)));
        assert_eq!(secs("30d"), Ok(Some(2_592_000)));
        for bad in [
            "",
            "30",
            "d",
            "-1d",
            "1w",
            "0d",
            "1.5d",
            "99999999999999999999d",
            "36501d",
        ] {
            assert!(bad.parse::<Age>().is_err(), "{bad}");
        }
        let config = parsed(&["--retain-audit", "0", "--retain-telemetry", "2h"]);
        assert_eq!(config.retention.audit, Age(None));
        assert_eq!(
            config.retention.telemetry,
            Age(Some(Duration::from_secs(7_200)))
        );
        assert_eq!(
            config.retention.commands,
            Age(Some(Duration::from_secs(30 * 86_400)))
        );
    }

    #[test]
    fn the_mode_names_the_engines() {
        let mode = |args: &[&str]| parsed(args).mode();
        assert_eq!(
            mode(&[]),
            serde_json::json!({"database": "sqlite", "broker": "embedded"})
        );
        assert_eq!(
            mode(&[
                "--database-url",
                "postgres://u@db/fleet",
                "--broker-url",
                "mqtts://broker:8884"
            ]),
            serde_json::json!({"database": "postgres", "broker": "external"})
        );
    }

    #[test]
    fn a_refused_database_url_is_reported_without_its_password() {
        for url in [
            "postgres://u:hunter2@h:notaport/d",
            "postgres://u@h/d?password=hunter2&sslmode=nonsense",
            "mysql://u:hunter2@h/d",
        ] {
            // clap takes any value (it would print a refused one whole)...
            let config = parsed(&["--database-url", url]);
            // ...and the refusal, the config dump and Debug leave the password out.
            let error = format!("{:#}", config.database().unwrap_err());
            let dump = serde_json::to_string(&config).unwrap();
            let debug = format!("{:?}", config);
            for text in [&error, &dump, &debug] {
                assert!(!text.contains("hunter2"), "{url}: {text}");
            }
            assert!(error.starts_with("--database-url: "), "{error}");
        }
    }

    #[test]
    fn a_secret_is_trimmed_long_enough_and_never_shown() {
        let s: Secret = " 0123456789abcdef01234567\n".parse().unwrap();
        assert_eq!(s.expose(), "0123456789abcdef01234567");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<set>\"");
        assert!("short".parse::<Secret>().is_err());
    }

    #[test]
    fn broker_urls_name_a_tls_host_and_port_or_say_what_is_wrong() {
        assert_eq!(
            "mqtts://broker.example:8883".parse::<BrokerUrl>(),
            Ok(BrokerUrl {
                host: "broker.example".into(),
                port: 8883
            })
        );
        assert_eq!(
            "mqtts://[::1]:8884/".parse::<BrokerUrl>().unwrap().host,
            "::1"
        );
        for bad in [
            "mqtt://broker:1883",
            "mqtts://broker",
            "mqtts://:8883",
            "mqtts://broker:0",
            "mqtts://broker:99999",
            "mqtts://user@broker:8883",
            "mqtts://[broker:1",
            "mqtts://a:b:1",
            "mqtts://bro ker:1",
            "mqtts://[::1:1",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }
}
