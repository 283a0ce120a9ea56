//! The broker's access rules, as pure functions so they are tested without a broker.
//!
//! Authentication turns a certificate into an [`Identity`] once, at CONNECT; every later
//! decision (publish, subscribe, retain, presence) takes that identity, never the client id.
//! What does not fit a known shape is refused.
//!
//! A device publishes only to its own upward channels, may set retain only on its `status`,
//! may leave a will only on its own `status`, subscribes only to its own downward channels by
//! exact name (no wildcards, no `$share`, no `$SYS`) and connects only on the device listener.
//! A service (`svc:` certificate, issued by the server to itself) connects only on the
//! internal listener, reads upward channels through shared subscriptions and writes downward,
//! retaining only desired config.

use flotilla_pki::SERVICE_PREFIX;
use flotilla_proto::{Channel, DeviceId, Direction, Topic};

/// An authenticated MQTT identity, derived from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(DeviceId),
    Service(String),
}

/// Which broker listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Devices,
    Internal,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("no client certificate CN")]
    NoCertificate,
    #[error("certificate CN is not a device id or service name")]
    UnknownIdentityShape,
    #[error("client id differs from the certificate CN")]
    ClientIdMismatch,
    #[error("service identity on the device listener")]
    ServiceOnDeviceListener,
    #[error("device identity on the internal listener")]
    DeviceOnInternalListener,
    #[error("last will outside the device's own status topic")]
    WillNotOwnStatus,
    #[error("service clients may not leave a last will")]
    ServiceWill,
}

/// Decides who a connecting client is. `cn` is the verified client certificate's common name.
pub fn authenticate(
    cn: Option<&str>,
    client_id: &str,
    listener: Listener,
    will_topic: Option<&str>,
) -> Result<Identity, ConnectRefusal> {
    let cn = cn.ok_or(ConnectRefusal::NoCertificate)?;
    let who = identity_from_certificate(cn, client_id)?;
    match (&who, listener) {
        (Identity::Service(_), Listener::Devices) => {
            return Err(ConnectRefusal::ServiceOnDeviceListener);
        }
        (Identity::Device(_), Listener::Internal) => {
            return Err(ConnectRefusal::DeviceOnInternalListener);
        }
        _ => {}
    }
    if let Some(will_topic) = will_topic {
        match &who {
            Identity::Service(_) => return Err(ConnectRefusal::ServiceWill),
            Identity::Device(own) => {
                let ok =
                    Topic::parse(will_topic).is_ok_and(|(d, c)| d == *own && c == Channel::Status);
                if !ok {
                    return Err(ConnectRefusal::WillNotOwnStatus);
                }
            }
        }
    }
    Ok(who)
}

/// Identity from a certificate CN and the client id the client chose: they must agree. A
/// service may add `-<suffix>` to its name so several clients of one service can connect.
fn identity_from_certificate(cn: &str, client_id: &str) -> Result<Identity, ConnectRefusal> {
    if let Some(service) = cn.strip_prefix(SERVICE_PREFIX) {
        if service.is_empty()
            || !service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ConnectRefusal::UnknownIdentityShape);
        }
        let ok = client_id == cn
            || client_id
                .strip_prefix(cn)
                .is_some_and(|r| r.len() > 1 && r.starts_with('-'));
        return if ok {
            Ok(Identity::Service(service.to_string()))
        } else {
            Err(ConnectRefusal::ClientIdMismatch)
        };
    }
    let id = DeviceId::parse(cn).map_err(|_| ConnectRefusal::UnknownIdentityShape)?;
    if client_id == cn {
        Ok(Identity::Device(id))
    } else {
        Err(ConnectRefusal::ClientIdMismatch)
    }
}

/// Whether `who` may publish to `topic` with the given retain flag.
pub fn may_publish(who: &Identity, topic: &str, retain: bool) -> bool {
    let Ok((device, channel)) = Topic::parse(topic) else {
        return false;
    };
    match who {
        Identity::Device(own) => {
            device == *own
                && channel.direction() == Direction::Up
                && (!retain || channel == Channel::Status)
        }
        // Only desired config is retained: a retained command or offer would be replayed to
        // the device at every subscribe.
        Identity::Service(_) => {
            channel.direction() == Direction::Down && (!retain || channel == Channel::Config)
        }
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

    fn auth(cn: &str, client_id: &str, l: Listener) -> Result<Identity, ConnectRefusal> {
        authenticate(Some(cn), client_id, l, None)
    }

    #[test]
    fn identity_requires_client_id_to_match_cn() {
        assert_eq!(auth("dev-a", "dev-a", Listener::Devices), Ok(dev("dev-a")));
        assert_eq!(
            auth("dev-a", "dev-b", Listener::Devices),
            Err(ConnectRefusal::ClientIdMismatch)
        );
        assert_eq!(
            auth("svc:ingest", "svc:ingest-2", Listener::Internal),
            Ok(Identity::Service("ingest".into()))
        );
        for client_id in ["svc:ingestX", "svc:ingest-", "dev-a"] {
            assert_eq!(
                auth("svc:ingest", client_id, Listener::Internal),
                Err(ConnectRefusal::ClientIdMismatch),
                "{client_id}"
            );
        }
        assert_eq!(
            authenticate(None, "dev-a", Listener::Devices, None),
            Err(ConnectRefusal::NoCertificate)
        );
    }

    #[test]
    fn identities_of_unknown_shape_are_refused() {
        for cn in ["a/b", "", "svc:", "svc:a/b", "svc:a b", "dev+", "#"] {
            assert_eq!(
                auth(cn, cn, Listener::Devices),
                Err(ConnectRefusal::UnknownIdentityShape),
                "{cn:?}"
            );
        }
    }

    #[test]
    fn each_identity_kind_connects_only_on_its_own_listener() {
        assert_eq!(
            auth("svc:ingest", "svc:ingest", Listener::Devices),
            Err(ConnectRefusal::ServiceOnDeviceListener)
        );
        assert_eq!(
            auth("dev-a", "dev-a", Listener::Internal),
            Err(ConnectRefusal::DeviceOnInternalListener)
        );
    }

    #[test]
    fn a_will_is_accepted_only_on_the_devices_own_status_topic() {
        let a = |w| authenticate(Some("dev-a"), "dev-a", Listener::Devices, Some(w));
        assert_eq!(a("devices/dev-a/status"), Ok(dev("dev-a")));
        for topic in [
            "devices/dev-b/command",
            "devices/dev-b/status",
            "devices/dev-a/command",
            "devices/dev-a/health",
            "devices/dev-a/telemetry",
            "devices/+/status",
            "devices/dev-a/status/x",
            "$SYS/x",
            "",
        ] {
            assert_eq!(a(topic), Err(ConnectRefusal::WillNotOwnStatus), "{topic}");
        }
        assert_eq!(
            authenticate(
                Some("svc:ingest"),
                "svc:ingest",
                Listener::Internal,
                Some("devices/dev-a/command")
            ),
            Err(ConnectRefusal::ServiceWill)
        );
    }

    #[test]
    fn device_publishes_only_its_own_upward_channels() {
        let a = dev("dev-a");
        assert!(may_publish(&a, "devices/dev-a/health", false));
        assert!(may_publish(&a, "devices/dev-a/ota/status", false));
        for t in [
            "devices/dev-b/health",
            "devices/dev-a/command",
            "devices/+/health",
            "devices/#",
            "$SYS/x",
            "other",
        ] {
            assert!(!may_publish(&a, t, false), "{t}");
        }
    }

    #[test]
    fn a_device_may_retain_only_its_status() {
        let a = dev("dev-a");
        assert!(may_publish(&a, "devices/dev-a/status", true));
        for t in [
            "devices/dev-a/health",
            "devices/dev-a/telemetry",
            "devices/dev-a/reply",
            "devices/dev-a/ota/status",
        ] {
            assert!(!may_publish(&a, t, true), "{t}");
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
        assert!(may_publish(&s, "devices/dev-a/command", false));
        assert!(may_publish(&s, "devices/dev-a/config", true));
        assert!(!may_publish(&s, "devices/dev-a/command", true));
        assert!(!may_publish(&s, "devices/dev-a/ota", true));
        assert!(!may_publish(&s, "devices/dev-a/health", false));
    }
}
