//! The topic rules, as pure functions so they are tested without a broker.
//!
//! A device publishes only to its own upward channels and subscribes only to its own
//! downward channels, by exact name: no wildcards, no `$share`, no `$SYS`. The server's
//! service identity subscribes to upward channels through shared subscriptions and
//! publishes to downward channels.

use flotilla_pki::SERVICE_PREFIX;
use flotilla_proto::{Channel, DeviceId, Direction, Topic};

/// An authenticated MQTT identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(DeviceId),
    Service(String),
}

impl Identity {
    /// Identity from a certificate CN and the client id the client chose: they must agree.
    pub fn from_certificate(cn: &str, client_id: &str) -> Option<Identity> {
        if let Some(service) = cn.strip_prefix(SERVICE_PREFIX) {
            let ok = !service.is_empty()
                && (client_id == cn
                    || client_id
                        .strip_prefix(cn)
                        .is_some_and(|r| r.starts_with('-')));
            return ok.then(|| Identity::Service(service.to_string()));
        }
        let id = DeviceId::parse(cn).ok()?;
        (client_id == cn).then_some(Identity::Device(id))
    }

    pub fn from_client_id(client_id: &str) -> Identity {
        match DeviceId::parse(client_id) {
            Ok(id) => Identity::Device(id),
            Err(_) => Identity::Service(client_id.to_string()),
        }
    }
}

pub fn may_publish(who: &Identity, topic: &str) -> bool {
    let Ok((device, channel)) = Topic::parse(topic) else {
        return false;
    };
    match who {
        Identity::Device(own) => device == *own && channel.direction() == Direction::Up,
        Identity::Service(_) => channel.direction() == Direction::Down,
    }
}

/// `filter` is the topic filter without any `$share/<group>/` prefix; `shared` says whether
/// it had one.
pub fn may_subscribe(who: &Identity, filter: &str, shared: bool) -> bool {
    match who {
        Identity::Device(own) => {
            !shared
                && Topic::parse(filter).is_ok_and(|(device, channel)| {
                    device == *own && channel.direction() == Direction::Down
                })
        }
        Identity::Service(_) => {
            shared
                && Channel::ALL
                    .iter()
                    .any(|c| c.direction() == Direction::Up && *filter == c.all_devices_filter())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str) -> Identity {
        Identity::Device(DeviceId::parse(id).unwrap())
    }

    #[test]
    fn identity_requires_client_id_to_match_cn() {
        assert_eq!(
            Identity::from_certificate("dev-a", "dev-a"),
            Some(dev("dev-a"))
        );
        assert_eq!(Identity::from_certificate("dev-a", "dev-b"), None);
        assert_eq!(
            Identity::from_certificate("svc:ingest", "svc:ingest-2"),
            Some(Identity::Service("ingest".into()))
        );
        assert_eq!(
            Identity::from_certificate("svc:ingest", "svc:ingestX"),
            None
        );
        assert_eq!(Identity::from_certificate("a/b", "a/b"), None);
    }

    #[test]
    fn device_publishes_only_its_own_upward_channels() {
        let a = dev("dev-a");
        assert!(may_publish(&a, "devices/dev-a/health"));
        assert!(may_publish(&a, "devices/dev-a/ota/status"));
        for t in [
            "devices/dev-b/health",
            "devices/dev-a/command",
            "devices/+/health",
            "devices/#",
            "$SYS/x",
            "other",
        ] {
            assert!(!may_publish(&a, t), "{t}");
        }
    }

    #[test]
    fn device_subscribes_only_its_own_downward_channels_by_exact_name() {
        let a = dev("dev-a");
        assert!(may_subscribe(&a, "devices/dev-a/command", false));
        assert!(!may_subscribe(&a, "devices/dev-a/command", true));
        for f in [
            "devices/dev-b/command",
            "devices/+/command",
            "devices/#",
            "#",
            "devices/dev-a/#",
            "devices/dev-a/health",
            "$SYS/#",
        ] {
            assert!(!may_subscribe(&a, f, false), "{f}");
        }
    }

    #[test]
    fn service_reads_upward_through_shared_subscriptions_and_writes_downward() {
        let s = Identity::Service("ingest".into());
        assert!(may_subscribe(&s, "devices/+/telemetry", true));
        assert!(!may_subscribe(&s, "devices/+/telemetry", false));
        assert!(!may_subscribe(&s, "#", true));
        assert!(may_publish(&s, "devices/dev-a/command"));
        assert!(!may_publish(&s, "devices/dev-a/health"));
    }
}
