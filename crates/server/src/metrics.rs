//! `GET /metrics` in Prometheus text format: what ingest did (counters and a commit latency
//! histogram the writer updates as it goes) and the fleet's state, read from the database in
//! one read transaction at most every [`FLEET_TTL`] (devices online, commands and rollouts by
//! state, the nearest device certificate expiry).
//!
//! Readable by an admin's JWT, or by the static bearer token `FLOTILLA_METRICS_TOKEN` (a
//! scraper cannot log in), compared through SHA-256 so the comparison's time says nothing
//! about it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use flotilla_store::{FleetGauges, Store, now_ms};

/// What the ingest writer counts; cheap to clone (every field shares its value).
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Messages handed to the writer (QoS 0 ones included, wills too).
    pub received: Counter,
    /// Messages in a committed transaction (a duplicate reading, or one from an unknown or
    /// blocked device, is counted here though it adds no row).
    pub stored: Counter,
    /// Messages kept in `dead_letters` after the database refused them.
    pub dead_lettered: Counter,
    /// Messages that did not decode.
    pub malformed: Counter,
    /// QoS 0 messages dropped because the queue was full.
    pub dropped: Counter,
    /// Seconds per successful commit (the transaction, not the wait for it; refused attempts
    /// are not timed).
    pub commit_seconds: Histogram,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        IngestMetrics {
            received: Counter::default(),
            stored: Counter::default(),
            dead_lettered: Counter::default(),
            malformed: Counter::default(),
            dropped: Counter::default(),
            // 0.5 ms to ~16 s.
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// How long a read of the fleet's state serves scrapes: one scraper or many, the database
/// sees one read per interval.
pub const FLEET_TTL: Duration = Duration::from_secs(5);

/// Every metric the server exposes, registered once.
pub struct Metrics {
    registry: Registry,
    pub ingest: IngestMetrics,
    ingest_queued_bytes: Gauge,
    devices: Gauge,
    devices_online: Gauge,
    commands: Family<StateLabel, Gauge>,
    rollouts: Family<StateLabel, Gauge>,
    cert_expiry_horizon: Gauge<f64, AtomicU64>,
    device_certificates: Gauge,
    leader: Gauge,
    /// Held for a whole render: the gauges and families are shared between scrapes.
    rendering: Mutex<()>,
    /// The last read of the fleet's state, and when; one scrape reads, the others wait.
    fleet: tokio::sync::Mutex<Option<(Instant, FleetGauges)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let ingest = IngestMetrics::default();
        let mut m = Metrics {
            ingest: ingest.clone(),
            ingest_queued_bytes: Gauge::default(),
            devices: Gauge::default(),
            devices_online: Gauge::default(),
            commands: Family::default(),
            rollouts: Family::default(),
            cert_expiry_horizon: Gauge::default(),
            device_certificates: Gauge::default(),
            leader: Gauge::default(),
            rendering: Mutex::new(()),
            fleet: tokio::sync::Mutex::new(None),
            registry: Registry::with_prefix("flotilla"),
        };
        m.registry.register(
            "ingest_received",
            "Device messages handed to the ingest writer",
            ingest.received,
        );
        m.registry.register(
            "ingest_stored",
            "Device messages in a committed transaction (duplicates and messages of unknown or blocked devices included)",
            ingest.stored,
        );
        m.registry.register(
            "ingest_dead_lettered",
            "Device messages the database refused, kept in dead_letters",
            ingest.dead_lettered,
        );
        m.registry.register(
            "ingest_malformed",
            "Device messages that did not decode",
            ingest.malformed,
        );
        m.registry.register(
            "ingest_dropped",
            "QoS 0 device messages dropped on a full queue",
            ingest.dropped,
        );
        m.registry.register_with_unit(
            "ingest_commit",
            "Time per successful ingest commit",
            Unit::Seconds,
            ingest.commit_seconds,
        );
        m.registry.register_with_unit(
            "ingest_queued",
            "Device messages waiting for their commit (ingest lag)",
            Unit::Bytes,
            m.ingest_queued_bytes.clone(),
        );
        m.registry
            .register("devices", "Registered devices", m.devices.clone());
        m.registry.register(
            "devices_online",
            "Devices shown online",
            m.devices_online.clone(),
        );
        m.registry
            .register("commands", "Commands by state", m.commands.clone());
        m.registry
            .register("rollouts", "Rollouts by state", m.rollouts.clone());
        m.registry.register_with_unit(
            "certificate_expiry_horizon",
            "Until the first unblocked device certificate expires (negative: one has expired; 0 when there is none: see flotilla_device_certificates)",
            Unit::Seconds,
            m.cert_expiry_horizon.clone(),
        );
        m.registry.register(
            "device_certificates",
            "Unblocked devices holding a certificate",
            m.device_certificates.clone(),
        );
        m.registry.register(
            "leader",
            "1 while this server runs the background sweeps (always on SQLite; on PostgreSQL, while it holds the lease)",
            m.leader.clone(),
        );
        m
    }
}

impl Metrics {
    /// The fleet's state, read at most every [`FLEET_TTL`] whoever asks.
    pub async fn fleet(&self, store: &Store) -> flotilla_store::StoreResult<FleetGauges> {
        let mut cached = self.fleet.lock().await;
        if let Some((at, fleet)) = cached.as_ref()
            && at.elapsed() < FLEET_TTL
        {
            return Ok(fleet.clone());
        }
        let fleet = store.fleet_gauges().await?;
        *cached = Some((Instant::now(), fleet.clone()));
        Ok(fleet)
    }

    /// The text exposition, with the fleet gauges set from `fleet`.
    pub fn render(&self, fleet: &FleetGauges, queued_bytes: usize, leader: bool) -> String {
        let _one_at_a_time = self.rendering.lock().unwrap_or_else(|p| p.into_inner());
        self.leader.set(i64::from(leader));
        self.ingest_queued_bytes
            .set(i64::try_from(queued_bytes).unwrap_or(i64::MAX));
        self.devices.set(fleet.devices);
        self.devices_online.set(fleet.online);
        self.cert_expiry_horizon.set(
            fleet
                .first_cert_expiry_ms
                .map_or(0.0, |at| (at - now_ms()) as f64 / 1000.0),
        );
        self.device_certificates.set(fleet.device_certificates);
        // A state with no rows now leaves the exposition instead of keeping its last count.
        for (family, rows) in [
            (&self.commands, &fleet.commands),
            (&self.rollouts, &fleet.rollouts),
        ] {
            family.clear();
            for (state, n) in rows {
                family
                    .get_or_create(&StateLabel {
                        state: state.clone(),
                    })
                    .set(*n);
            }
        }
        let mut out = String::new();
        // INVARIANT: writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shortest scrape token accepted: it is a bearer secret without a login limiter behind it.
pub const MIN_TOKEN_LEN: usize = 24;

/// Whether `presented` is the configured scrape token.
pub fn token_matches(configured: Option<&str>, presented: &str) -> bool {
    use sha2::{Digest, Sha256};
    configured.is_some_and(|want| {
        !want.is_empty() && Sha256::digest(want.as_bytes()) == Sha256::digest(presented.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_and_drops_a_state_that_emptied() {
        let m = Metrics::default();
        m.ingest.stored.inc_by(3);
        m.ingest.commit_seconds.observe(0.002);
        let mut fleet = FleetGauges {
            devices: 2,
            online: 1,
            commands: vec![("queued".into(), 4)],
            rollouts: vec![("running".into(), 1)],
            first_cert_expiry_ms: Some(now_ms() + 3_600_000),
            device_certificates: 1,
        };
        let text = m.render(&fleet, 10, true);
        for line in [
            "flotilla_ingest_stored_total 3",
            "flotilla_ingest_commit_seconds_count 1",
            "flotilla_ingest_queued_bytes 10",
            "# UNIT flotilla_ingest_commit_seconds seconds",
            "flotilla_devices 2",
            "flotilla_devices_online 1",
            "flotilla_commands{state=\"queued\"} 4",
            "flotilla_rollouts{state=\"running\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let horizon = text
            .lines()
            .find_map(|l| l.strip_prefix("flotilla_certificate_expiry_horizon_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap();
        assert!((3590.0..=3600.0).contains(&horizon), "{horizon}");
        fleet.commands.clear();
        fleet.first_cert_expiry_ms = None;
        fleet.device_certificates = 0;
        let text = m.render(&fleet, 0, false);
        assert!(!text.contains("state=\"queued\""), "{text}");
        assert!(
            text.lines().any(|l| l == "flotilla_device_certificates 0"),
            "no certificate says so: {text}"
        );
    }

    #[test]
    fn only_the_configured_token_opens_the_metrics() {
        assert!(token_matches(Some("s3cret"), "s3cret"));
        assert!(!token_matches(Some("s3cret"), "s3cre"));
        assert!(!token_matches(None, ""));
        assert!(!token_matches(Some(""), ""));
    }
}
