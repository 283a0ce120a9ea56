//! `GET /metrics` in Prometheus text format: what ingest did (counters and a commit latency
//! histogram the writer updates as it goes) and the fleet's state, read from the database
//! at each scrape (connected devices, commands and rollouts by state, the nearest device
//! certificate expiry).
//!
//! Readable by an admin's JWT, or by the static bearer token `--metrics-token` (a scraper
//! cannot log in), compared through SHA-256 so the comparison's time says nothing about it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::{FleetGauges, now_ms};

/// What the ingest writer counts; cheap to clone (every field shares its value).
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Messages handed to the writer (QoS 0 ones included, wills too).
    pub received: Counter,
    /// Messages committed.
    pub stored: Counter,
    /// Messages kept in `dead_letters` after the database refused them.
    pub dead_lettered: Counter,
    /// Messages that did not decode.
    pub malformed: Counter,
    /// QoS 0 messages dropped because the queue was full.
    pub dropped: Counter,
    /// Seconds per successful commit (the transaction, not the wait for it).
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

/// Every metric the server exposes, registered once.
pub struct Metrics {
    registry: Registry,
    pub ingest: IngestMetrics,
    ingest_queued_bytes: Gauge,
    devices: Gauge,
    devices_online: Gauge,
    commands: Family<StateLabel, Gauge>,
    rollouts: Family<StateLabel, Gauge>,
    cert_expiry_horizon: Gauge,
    leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let ingest = IngestMetrics::default();
        let m = Metrics {
            ingest: ingest.clone(),
            ingest_queued_bytes: Gauge::default(),
            devices: Gauge::default(),
            devices_online: Gauge::default(),
            commands: Family::default(),
            rollouts: Family::default(),
            cert_expiry_horizon: Gauge::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ingest_received",
            "Device messages handed to the ingest writer",
            ingest.received,
        );
        registry.register("ingest_stored", "Device messages committed", ingest.stored);
        registry.register(
            "ingest_dead_lettered",
            "Device messages the database refused, kept in dead_letters",
            ingest.dead_lettered,
        );
        registry.register(
            "ingest_malformed",
            "Device messages that did not decode",
            ingest.malformed,
        );
        registry.register(
            "ingest_dropped",
            "QoS 0 device messages dropped on a full queue",
            ingest.dropped,
        );
        registry.register(
            "ingest_commit_seconds",
            "Time per ingest commit",
            ingest.commit_seconds,
        );
        registry.register(
            "ingest_queued_bytes",
            "Bytes of device messages waiting for their commit (ingest lag)",
            m.ingest_queued_bytes.clone(),
        );
        registry.register("devices", "Registered devices", m.devices.clone());
        registry.register(
            "devices_online",
            "Devices shown online",
            m.devices_online.clone(),
        );
        registry.register("commands", "Commands by state", m.commands.clone());
        registry.register("rollouts", "Rollouts by state", m.rollouts.clone());
        registry.register(
            "certificate_expiry_horizon_seconds",
            "Seconds until the first unblocked device certificate expires (negative: expired)",
            m.cert_expiry_horizon.clone(),
        );
        registry.register(
            "leader",
            "1 when this server runs the background work (always, with one server)",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition, with the fleet gauges set from `fleet`.
    pub fn render(&self, fleet: &FleetGauges, queued_bytes: usize) -> String {
        self.ingest_queued_bytes
            .set(i64::try_from(queued_bytes).unwrap_or(i64::MAX));
        self.devices.set(fleet.devices);
        self.devices_online.set(fleet.online);
        self.leader.set(1);
        self.cert_expiry_horizon.set(
            fleet
                .first_cert_expiry_ms
                .map_or(0, |at| (at - now_ms()) / 1000),
        );
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
        };
        let text = m.render(&fleet, 10);
        for line in [
            "flotilla_ingest_stored_total 3",
            "flotilla_ingest_commit_seconds_count 1",
            "flotilla_ingest_queued_bytes 10",
            "flotilla_devices 2",
            "flotilla_devices_online 1",
            "flotilla_commands{state=\"queued\"} 4",
            "flotilla_rollouts{state=\"running\"} 1",
            "flotilla_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let horizon = text
            .lines()
            .find_map(|l| l.strip_prefix("flotilla_certificate_expiry_horizon_seconds "))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap();
        assert!((3590..=3600).contains(&horizon), "{horizon}");
        fleet.commands.clear();
        let text = m.render(&fleet, 0);
        assert!(!text.contains("state=\"queued\""), "{text}");
    }

    #[test]
    fn only_the_configured_token_opens_the_metrics() {
        assert!(token_matches(Some("s3cret"), "s3cret"));
        assert!(!token_matches(Some("s3cret"), "s3cre"));
        assert!(!token_matches(None, ""));
        assert!(!token_matches(Some(""), ""));
    }
}
