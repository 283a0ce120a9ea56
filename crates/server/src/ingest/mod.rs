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
    // An order key above what any device sends (flotilla_proto::order_key) is refused, not
    // read as "no key".
    let ord_in_range = |ord: Option<u64>| {
        if ord.is_some_and(|o| o > i64::MAX as u64) {
            return Err(String::from("order key out of range"));
        }
        Ok(())
    };
    Ok(match channel {
        Channel::Health => {
            let hb: Heartbeat = decode(payload).map_err(err)?;
            ord_in_range(hb.ord)?;
            Item::Update(device, DeviceUpdate::Heartbeat(hb))
        }
        Channel::Status => {
            let st: Status = decode(payload).map_err(err)?;
            ord_in_range(st.ord)?;
            Item::Update(device, DeviceUpdate::Status(st))
        }
        Channel::Telemetry => {
            let t: Telemetry = decode(payload).map_err(err)?;
            if t.seq > i64::MAX as u64 || t.temp.is_some_and(|v| !v.is_finite()) {
                return Err("telemetry value out of range".into());
            }
            ord_in_range(t.ord)?;
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
        let max = i64::MAX as u64;
        for (topic, body) in [
            ("health", r#""heap":1,"fw":"1.0.0""#),
            ("status", r#""online":true"#),
            ("telemetry", r#""seq":1"#),
        ] {
            let with = |ord: u64| format!(r#"{{{body},"ord":{ord}}}"#);
            let topic = format!("devices/a/{topic}");
            assert!(decode_item(&topic, with(max).as_bytes()).is_ok(), "{topic}");
            assert!(
                decode_item(&topic, with(max + 1).as_bytes()).is_err(),
                "{topic}"
            );
        }
    }
}
