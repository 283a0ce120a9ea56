use alloc::format;
use alloc::string::String;
use core::fmt;

use crate::{DeviceId, DeviceIdError};

/// Topic root shared by every device topic.
pub const ROOT: &str = "devices";

/// Which way a channel flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to server.
    Up,
    /// Server to device.
    Down,
}

/// The per-device channels of the protocol (`devices/{id}/<channel>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Heartbeat: heap, uptime, firmware version, RSSI. QoS 1.
    Health,
    /// Online state and LED state; retained; also the device's last will. QoS 1.
    Status,
    /// Sensor readings with a per-device sequence number. QoS 1.
    Telemetry,
    /// Result of a command. QoS 1.
    Reply,
    /// OTA progress. QoS 1.
    OtaStatus,
    /// A command for the device. QoS 1.
    Command,
    /// An OTA offer (signed manifest + URL). QoS 1.
    Ota,
    /// Desired configuration; retained. QoS 1.
    Config,
}

impl Channel {
    pub const ALL: [Channel; 8] = [
        Channel::Health,
        Channel::Status,
        Channel::Telemetry,
        Channel::Reply,
        Channel::OtaStatus,
        Channel::Command,
        Channel::Ota,
        Channel::Config,
    ];

    /// The topic suffix after `devices/{id}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Channel::Health => "health",
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Reply => "reply",
            Channel::OtaStatus => "ota/status",
            Channel::Command => "command",
            Channel::Ota => "ota",
            Channel::Config => "config",
        }
    }

    pub fn direction(self) -> Direction {
        match self {
            Channel::Health
            | Channel::Status
            | Channel::Telemetry
            | Channel::Reply
            | Channel::OtaStatus => Direction::Up,
            Channel::Command | Channel::Ota | Channel::Config => Direction::Down,
        }
    }

    fn from_suffix(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.suffix() == s)
    }

    /// A filter matching this channel for every device, e.g. `devices/+/health`.
    pub fn all_devices_filter(self) -> String {
        format!("{ROOT}/+/{}", self.suffix())
    }
}

/// A concrete topic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic(String);

/// Why a topic name is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    NotADeviceTopic,
    BadDeviceId(DeviceIdError),
    UnknownChannel,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::NotADeviceTopic => f.write_str("topic does not start with devices/{id}/"),
            TopicError::BadDeviceId(e) => write!(f, "bad device id in topic: {e}"),
            TopicError::UnknownChannel => f.write_str("unknown channel"),
        }
    }
}

impl Topic {
    pub fn new(device: &DeviceId, channel: Channel) -> Topic {
        Topic(format!("{ROOT}/{}/{}", device.as_str(), channel.suffix()))
    }

    /// Splits a topic name into the device and channel it addresses.
    pub fn parse(topic: &str) -> Result<(DeviceId, Channel), TopicError> {
        let rest = topic
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::NotADeviceTopic)?;
        let (id, suffix) = rest.split_once('/').ok_or(TopicError::NotADeviceTopic)?;
        let id = DeviceId::parse(id).map_err(TopicError::BadDeviceId)?;
        let channel = Channel::from_suffix(suffix).ok_or(TopicError::UnknownChannel)?;
        Ok((id, channel))
    }

    /// The prefix under which a device may publish and subscribe: `devices/{id}/`.
    pub fn device_prefix(device: &DeviceId) -> String {
        format!("{ROOT}/{}/", device.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_round_trips_through_its_topic() {
        let id = DeviceId::parse("dev-1").unwrap();
        for c in Channel::ALL {
            let t = Topic::new(&id, c);
            assert_eq!(Topic::parse(t.as_str()), Ok((id.clone(), c)));
        }
    }

    #[test]
    fn rejects_foreign_and_malformed_topics() {
        assert_eq!(
            Topic::parse("sensors/led/set"),
            Err(TopicError::NotADeviceTopic)
        );
        assert_eq!(Topic::parse("devices/x"), Err(TopicError::NotADeviceTopic));
        assert_eq!(
            Topic::parse("devices/x/nope"),
            Err(TopicError::UnknownChannel)
        );
        assert!(matches!(
            Topic::parse("devices/+/health"),
            Err(TopicError::BadDeviceId(_))
        ));
    }
}
