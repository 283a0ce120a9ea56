//! Commands: validation of what the API accepts, delivery on `devices/{id}/command`, and
//! redelivery of commands that waited while the device was offline.
//!
//! A command is stored before it is published (the table is its outbox), so it survives a
//! restart; it is published when created, again at each session start of its device (its
//! SUBSCRIBE to the command topic, with the embedded broker; its first message after being
//! offline, with an external one), and by the leader's resender every [`RESEND_AFTER`] while
//! its device is online and has not accepted it (a publish lost with the replica that made
//! it, or one the broker had no subscriber for), until it is accepted or expires. The device
//! executes each id at most once, so redelivery is harmless.

use std::sync::OnceLock;
use std::time::Duration;

use flotilla_proto::{Channel, Command, DeviceCommand, DeviceId, MAX_COMMAND_ARGS, Topic, encode};
use serde_json::Value;

use crate::leader::{Leadership, Sweep};

use crate::downlink::Downlink;
use flotilla_store::{CommandRow, Store};

pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
pub const DEFAULT_TTL_SECS: u64 = 3600;

/// Checks a command's name and arguments against what devices understand (the same
/// [`DeviceCommand`] parse the device runs), so a mistake is reported to the caller now
/// rather than by the device later.
pub fn validate(name: &str, args: &Value) -> Result<(), String> {
    if args.to_string().len() > MAX_COMMAND_ARGS {
        return Err(format!(
            "args must be at most {MAX_COMMAND_ARGS} bytes of JSON"
        ));
    }
    DeviceCommand::parse(name, args).map(|_| ())
}

#[derive(Debug)]
pub struct Dispatcher {
    store: Store,
    downlink: OnceLock<Downlink>,
}

impl Dispatcher {
    pub fn new(store: Store) -> Self {
        Dispatcher {
            store,
            downlink: OnceLock::new(),
        }
    }

    pub fn attach(&self, downlink: Downlink) {
        let _ = self.downlink.set(downlink);
    }

    /// The server's MQTT client, once it is connected the first time.
    pub fn downlink(&self) -> Option<&Downlink> {
        self.downlink.get()
    }

    /// Publishes a command to its device (QoS 1) without waiting on the broker. If the
    /// device is offline or the downlink is busy, [`Dispatcher::flush_pending`] sends it again
    /// when the device's next session starts.
    pub async fn send(&self, command: &CommandRow) {
        let Some(downlink) = self.downlink.get() else {
            return;
        };
        let wire = Command {
            id: command.id.clone(),
            name: command.name.clone(),
            args: command.args.clone(),
            expires_at: (command.expires_at / 1000) as u64,
        };
        let topic = Topic::new(&command.device_id, Channel::Command);
        match downlink.publish(topic.as_str(), encode(&wire), false) {
            Ok(()) => {
                if let Err(e) = self.store.mark_command_sent(&command.id).await {
                    tracing::warn!(error = %e, "recording command send failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, command = %command.id, "command not sent now; it is sent when the device's next session starts")
            }
        }
    }

    /// Sends every command still queued for a device whose session just started.
    pub async fn flush_pending(&self, device_id: &DeviceId) {
        match self.store.pending_commands(device_id).await {
            Ok(commands) => {
                for c in &commands {
                    self.send(c).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, device_id = %device_id, "loading pending commands failed")
            }
        }
    }
}

/// How long a queued command of an online device waits for its ACCEPTED before the resender
/// publishes it again.
pub const RESEND_AFTER: Duration = Duration::from_secs(10);

/// The leader publishes again the queued commands of online devices not sent for
/// [`RESEND_AFTER`]. Not fenced: two replicas resending at a takeover only send a duplicate,
/// which the device answers without running it again.
pub fn spawn_resender(dispatcher: std::sync::Arc<Dispatcher>, leadership: Leadership) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RESEND_AFTER / 4);
        loop {
            tick.tick().await;
            if !leadership.is_leader() {
                continue;
            }
            let cutoff = flotilla_store::now_ms() - RESEND_AFTER.as_millis() as i64;
            match dispatcher.store.commands_to_resend(cutoff, 500).await {
                Ok(due) => {
                    for c in &due {
                        tracing::info!(command = %c.id, device_id = %c.device_id, "command not accepted yet; sending it again");
                        dispatcher.send(c).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "loading commands to resend failed"),
            }
        }
    });
}

/// Background upkeep: expire commands past their deadline and mark silent devices offline.
pub fn spawn_sweepers(store: Store, heartbeat_timeout: Duration, leadership: Leadership) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let cutoff = flotilla_store::now_ms() - heartbeat_timeout.as_millis() as i64;
            match sweep_once(&store, &leadership, cutoff).await {
                Ok(offline) => {
                    for id in offline {
                        tracing::info!(device_id = %id, "device offline: heartbeat timeout");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "sweep failed"),
            }
        }
    });
}

/// Expires commands and marks silent devices offline, if this server leads; the devices
/// marked offline.
async fn sweep_once(
    store: &Store,
    leadership: &Leadership,
    cutoff: i64,
) -> flotilla_store::StoreResult<Vec<String>> {
    Ok(match leadership.sweep(store).await? {
        None => Vec::new(),
        Some(Sweep::Alone(store)) => {
            store.expire_commands().await?;
            store.expire_silent_devices(cutoff).await?
        }
        Some(Sweep::Fenced(mut tx)) => {
            tx.expire_commands().await?;
            let offline = tx.expire_silent_devices(cutoff).await?;
            tx.commit().await?;
            offline
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_known_commands_and_refuses_the_rest_with_a_hint() {
        assert!(validate("led", &json!({"state":"ON"})).is_ok());
        assert!(validate("led", &json!({"state":"on"})).is_err());
        assert!(validate("led_brightness", &json!({"value":100})).is_ok());
        assert!(validate("led_brightness", &json!({"value":101})).is_err());
        assert!(validate("sensor", &json!({"sensor":"temp","enabled":false})).is_ok());
        assert!(validate("sensor", &json!({"sensor":"gps","enabled":false})).is_err());
        assert!(validate("reboot", &Value::Null).is_ok());
        assert!(validate("led", &json!([1])).is_err());
        assert!(
            validate("selfdestruct", &json!({}))
                .unwrap_err()
                .contains("known:")
        );
        assert!(validate("ping", &json!({"pad": "x".repeat(2000)})).is_err());
    }
}
