//! Which PUBACK answers which publish. rumqttc numbers QoS 1 publishes itself (the packet id)
//! and reports each number as it writes the packet, in the order the publishes were handed
//! to it: the runner notes each publish's token as it hands it over ([`Handed`]), and the
//! connection's pump pairs them with packet ids and acknowledgements ([`Acks`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use flotilla_device_core::Token;
use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// The tokens of the publishes handed to one connection and not yet written, in order
/// (`None` for a publish whose delivery nobody waits for).
#[derive(Debug, Clone, Default)]
pub struct Handed(Arc<Mutex<VecDeque<Option<Token>>>>);

impl Handed {
    /// Call before handing the publish to the client, so the pump always finds it.
    pub fn push(&self, token: Option<Token>) {
        self.queue().push_back(token);
    }

    /// The publish was not handed over after all (the client is gone).
    pub fn forget_last(&self) {
        self.queue().pop_back();
    }

    fn pop(&self) -> Option<Token> {
        self.queue().pop_front().flatten()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Option<Token>>> {
        // A panic while holding it leaves a queue still worth reading.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the broker said of a publish that must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered(Token),
    /// An error reason, or "no matching subscribers" (the broker took it, but no server
    /// heard it): worth sending again.
    Refused(Token),
}

/// One connection's publishes in flight, by packet id.
#[derive(Debug, Default)]
pub struct Acks {
    handed: Handed,
    in_flight: HashMap<u16, Token>,
    /// A publish rumqttc held back because its packet id was still in flight, with the
    /// token it was handed with; rumqttc writes it under that id once the id is acknowledged.
    collided: Option<(u16, Option<Token>)>,
    /// The held-back publish was written: its `Outgoing::Publish` takes no token of its own.
    resent: Option<u16>,
}

impl Acks {
    pub fn new(handed: Handed) -> Acks {
        Acks {
            handed,
            ..Acks::default()
        }
    }

    /// rumqttc wrote a publish under `pkid` (`Outgoing::Publish`).
    pub fn written(&mut self, pkid: u16) {
        if self.resent.take_if(|id| *id == pkid).is_some() {
            return;
        }
        match self.handed.pop() {
            Some(token) => self.in_flight.insert(pkid, token),
            None => self.in_flight.remove(&pkid),
        };
    }

    /// rumqttc held a publish back: `pkid` is still in flight (`Outgoing::AwaitAck`).
    pub fn collided(&mut self, pkid: u16) {
        self.collided = Some((pkid, self.handed.pop()));
    }

    /// The broker's PUBACK for `pkid`: what it means for a publish that must arrive.
    pub fn acknowledged(&mut self, pkid: u16, reason: PubAckReason) -> Option<Delivery> {
        let token = self.in_flight.remove(&pkid);
        // rumqttc releases a held-back publish on these two reasons only.
        let released = matches!(
            reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        );
        if released && let Some((_, held)) = self.collided.take_if(|(id, _)| *id == pkid) {
            if let Some(held) = held {
                self.in_flight.insert(pkid, held);
            }
            self.resent = Some(pkid);
        }
        token.map(|t| match reason {
            PubAckReason::Success => Delivery::Delivered(t),
            _ => Delivery::Refused(t),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_device_core::{Config, Device, Provisioning, Stored};

    /// Real tokens come only from a device's outbox: make `n` of them.
    fn tokens(n: usize) -> Vec<Token> {
        let mut device = Device::new(Config::default(), 1);
        device.handle_boot(
            0,
            Stored {
                provisioning: Some(Provisioning {
                    ssid: "lab".into(),
                    password: String::new(),
                    device_id: flotilla_proto::DeviceId::parse("d-1").unwrap(),
                    provisioning_token: "t".into(),
                    bearer_token: None,
                }),
                has_certificate: true,
                ..Stored::default()
            },
        );
        device.handle_wifi_connected(0);
        device.handle_mqtt_connected(0);
        for i in 0..n {
            let ping = flotilla_proto::Command {
                id: format!("c{i}"),
                name: "ping".into(),
                args: serde_json::json!({}),
                expires_at: u64::MAX,
            };
            device.handle_message(0, "devices/d-1/command", &flotilla_proto::encode(&ping));
            device.handle_timeout(0);
        }
        std::iter::from_fn(|| device.poll_action())
            .filter_map(|a| match a {
                flotilla_device_core::Action::Publish(p) => p.token,
                _ => None,
            })
            .collect()
    }

    #[test]
    fn acknowledgements_find_their_tokens_in_order_and_untracked_publishes_are_skipped() {
        let t = tokens(2);
        let handed = Handed::default();
        let mut acks = Acks::new(handed.clone());
        handed.push(Some(t[0]));
        handed.push(None);
        handed.push(Some(t[1]));
        acks.written(1);
        acks.written(2);
        acks.written(3);
        assert_eq!(acks.acknowledged(2, PubAckReason::Success), None);
        assert_eq!(
            acks.acknowledged(3, PubAckReason::NotAuthorized),
            Some(Delivery::Refused(t[1]))
        );
        assert_eq!(
            acks.acknowledged(1, PubAckReason::Success),
            Some(Delivery::Delivered(t[0]))
        );
        // A second PUBACK for the same id is nobody's.
        assert_eq!(acks.acknowledged(1, PubAckReason::Success), None);
    }

    #[test]
    fn a_publish_held_back_on_a_colliding_id_takes_that_id_once_it_is_released() {
        let t = tokens(2);
        let handed = Handed::default();
        let mut acks = Acks::new(handed.clone());
        handed.push(Some(t[0]));
        acks.written(7);
        handed.push(Some(t[1]));
        acks.collided(7);
        assert_eq!(
            acks.acknowledged(7, PubAckReason::Success),
            Some(Delivery::Delivered(t[0]))
        );
        // rumqttc now writes the held-back publish under 7.
        acks.written(7);
        assert_eq!(
            acks.acknowledged(7, PubAckReason::NoMatchingSubscribers),
            Some(Delivery::Refused(t[1]))
        );
    }
}
