//! The device twin on the server: the desired configuration goes out retained on
//! `devices/{id}/config` (the broker keeps it for a device that is offline; the embedded
//! broker's copy survives a restart), and again whenever a device's session starts while what it
//! reports differs, meant to repair a publish the downlink could not take
//! (`crates/e2e/tests/device_config.rs` shows the resend and its absence when in sync).

use flotilla_proto::{Channel, DesiredConfig, DeviceId, Topic, encode};
use flotilla_store::Store;

use crate::commands::Dispatcher;

/// The fields the device does not (yet) run as desired; empty when in sync. A field the
/// desired configuration leaves out is the device's own business.
pub fn differences(desired: &DesiredConfig, reported: Option<&DesiredConfig>) -> Vec<&'static str> {
    fn differs<T: PartialEq>(wanted: Option<T>, has: Option<T>) -> bool {
        wanted.is_some() && wanted != has
    }
    let empty = DesiredConfig::default();
    let r = reported.unwrap_or(&empty);
    let d = desired;
    [
        (
            "telemetry_interval_s",
            differs(d.telemetry_interval_s, r.telemetry_interval_s),
        ),
        (
            "heartbeat_interval_s",
            differs(d.heartbeat_interval_s, r.heartbeat_interval_s),
        ),
        ("pot", differs(d.pot, r.pot)),
        ("switch", differs(d.switch, r.switch)),
        ("temp", differs(d.temp, r.temp)),
    ]
    .into_iter()
    .filter_map(|(name, differ)| differ.then_some(name))
    .collect()
}

/// Publishes `config` retained for `device_id`; whether the downlink took it.
pub fn publish(dispatcher: &Dispatcher, device_id: &DeviceId, config: &DesiredConfig) -> bool {
    let Some(downlink) = dispatcher.downlink() else {
        return false;
    };
    let topic = Topic::new(device_id, Channel::Config);
    match downlink.publish(topic.as_str(), encode(config), true) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(device_id = %device_id, error = %e, "desired config not published now; it is at the device's next session");
            false
        }
    }
}

/// A device's session started: if it does not run as desired, publish the desired
/// configuration again.
pub async fn resend_if_out_of_sync(store: &Store, dispatcher: &Dispatcher, device_id: &DeviceId) {
    match store.device_config(device_id).await {
        Ok(Some(row)) => {
            if let Some(desired) = &row.desired
                && !differences(desired, row.reported.as_ref()).is_empty()
            {
                publish(dispatcher, device_id, desired);
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(device_id = %device_id, error = %e, "reading the desired config failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fields_asked_for_count() {
        let desired = DesiredConfig {
            telemetry_interval_s: Some(5),
            temp: Some(false),
            ..DesiredConfig::default()
        };
        assert_eq!(
            differences(&desired, None),
            ["telemetry_interval_s", "temp"]
        );
        let reported = DesiredConfig {
            telemetry_interval_s: Some(5),
            heartbeat_interval_s: Some(30),
            pot: Some(true),
            switch: Some(true),
            temp: Some(true),
        };
        assert_eq!(differences(&desired, Some(&reported)), ["temp"]);
        let in_sync = DesiredConfig {
            temp: Some(false),
            ..reported
        };
        assert!(differences(&desired, Some(&in_sync)).is_empty());
        assert!(differences(&DesiredConfig::default(), None).is_empty());
    }
}
