//! Ingest: every message a device sends upward is decoded here and stored by the one
//! [`writer::Writer`], which says when each message is durable.
//!
//! In the embedded mode the broker's publish hook hands messages to the writer and holds the
//! device's PUBACK until they are committed (`crate::broker`), so the broker never acknowledges
//! what is not on disk.

pub mod handover;
pub mod link;
pub mod writer;

use flotilla_proto::{
    Channel, CommandReply, DeviceId, Heartbeat, OtaStatus, Status, Telemetry, Topic, decode,
};

use flotilla_store::DeviceUpdate;

/// A decoded upward message.
#[derive(Debug)]
pub(crate) enum Item {
    Update(DeviceId, DeviceUpdate),
    Reply(DeviceId, CommandReply),
    Ota(DeviceId, OtaStatus),
}

/// Why a message was dropped unread.
pub(crate) fn decode_item(topic: &str, payload: &[u8]) -> Result<Item, String> {
    let (device, channel) = Topic::parse(topic).map_err(|e| e.to_string())?;
    let err = |e: flotilla_proto::DecodeError| e.to_string();
    Ok(match channel {
        Channel::Health => Item::Update(
            device,
            DeviceUpdate::Heartbeat(decode::<Heartbeat>(payload).map_err(err)?),
        ),
        Channel::Status => Item::Update(
            device,
            DeviceUpdate::Status(decode::<Status>(payload).map_err(err)?),
        ),
        Channel::Telemetry => {
            let t: Telemetry = decode(payload).map_err(err)?;
            if t.seq > i64::MAX as u64 || t.temp.is_some_and(|v| !v.is_finite()) {
                return Err("telemetry value out of range".into());
            }
            Item::Update(device, DeviceUpdate::Telemetry(t))
        }
        Channel::Reply => {
            let r: CommandReply = decode(payload).map_err(err)?;
            if r.id.len() > 64 {
                return Err("command id too long".into());
            }
            Item::Reply(device, r)
        }
        Channel::OtaStatus => Item::Ota(device, decode::<OtaStatus>(payload).map_err(err)?),
        Channel::Command | Channel::Ota | Channel::Config => return Err("downward channel".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        assert!(decode_item("devices/a/health", b"{").is_err());
        assert!(decode_item("devices/a/health", &vec![b' '; 5000]).is_err());
        assert!(decode_item("devices/a/command", b"{}").is_err());
        assert!(decode_item("devices/a/telemetry", br#"{"seq":18446744073709551615}"#).is_err());
        assert!(
            decode_item(
                "devices/a/reply",
                format!(r#"{{"id":"{}","status":"succeeded"}}"#, "x".repeat(65)).as_bytes()
            )
            .is_err()
        );
        assert!(decode_item("devices/a/health", br#"{"heap":18000,"fw":"1.0.0"}"#).is_ok());
    }
}
