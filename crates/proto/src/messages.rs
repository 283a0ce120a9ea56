//! Payload types, one per channel. Optional fields are omitted when absent, and unknown fields
//! are ignored so that older peers keep working when a newer one adds information.

use alloc::string::String;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// LED state, spelled as in the backend seed (`{"state":"ON"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedState {
    #[serde(rename = "ON")]
    On,
    #[serde(rename = "OFF")]
    Off,
}

impl LedState {
    pub fn as_str(self) -> &'static str {
        match self {
            LedState::On => "ON",
            LedState::Off => "OFF",
        }
    }
}

/// `devices/{id}/health`: the heartbeat. Only `heap` and `fw` are required, as in the seed's
/// `{"heap":18000,"fw":"1.0.0"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Free heap in bytes.
    pub heap: u32,
    /// Seconds since boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime: Option<u64>,
    /// Running firmware version.
    pub fw: String,
    /// Wi-Fi signal strength in dBm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i16>,
    /// Boots that ended in a crash since the last clean start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crashes: Option<u32>,
    /// Where this message stands in what the device said ([`crate::order_key`]); absent from
    /// devices that do not number their messages, which are ordered by when they were taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ord: Option<u64>,
}

/// `devices/{id}/status`: retained; the device's last will publishes `{"online":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub led: Option<LedState>,
    /// LED brightness, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brightness: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw: Option<String>,
    /// Hardware/product the running image was built for (matches release manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hw: Option<String>,
    /// Why the device went offline, when it knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The configuration the device runs with now (every field set), after applying the
    /// desired configuration it was sent: the "reported" half of the device twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<DesiredConfig>,
    /// Where this message stands in what the device said ([`crate::order_key`]); absent from
    /// devices that do not number their messages, which are ordered by when they were taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ord: Option<u64>,
}

/// `devices/{id}/telemetry`: one reading of the enabled sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// Per-device sequence number, increasing across reboots; the server deduplicates on it.
    pub seq: u64,
    /// Device time of the reading in Unix milliseconds, when the device knows the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// Potentiometer, raw ADC 0-4095.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pot: Option<u16>,
    /// Tactile switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<bool>,
    /// Temperature in degrees Celsius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp: Option<f32>,
    /// Where this message stands in what the device said ([`crate::order_key`]); absent from
    /// devices that do not number their messages, which are ordered by when they were taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ord: Option<u64>,
}

/// The simulated or real sensors a device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    Pot,
    Switch,
    Temp,
}

impl SensorKind {
    pub const ALL: [SensorKind; 3] = [SensorKind::Pot, SensorKind::Switch, SensorKind::Temp];
}

/// `devices/{id}/command`: something for the device to do.
///
/// Known names: `led` `{"state":"ON"|"OFF"}`, `led_brightness` `{"value":0..=100}`,
/// `sensor` `{"sensor":"pot"|"switch"|"temp","enabled":bool}`, `reboot`, `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id chosen by the server; the device executes an id at most once.
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub args: Value,
    /// Unix seconds after which the command must not run.
    pub expires_at: u64,
}

/// Outcome of a command as reported by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Received and queued; the server marks the command delivered.
    Accepted,
    Succeeded,
    Failed,
}

/// `devices/{id}/reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    pub id: String,
    pub status: CommandStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// OTA phases, spelled as in the backend seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OtaPhase {
    Started,
    InProgress,
    Success,
    Failed,
    RolledBack,
}

/// `devices/{id}/ota/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaStatus {
    pub status: OtaPhase,
    /// The offer this report is about (`OtaOffer::id`); absent from seed-era devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Download progress in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest telemetry or heartbeat interval a desired configuration may ask for (a day).
pub const MAX_INTERVAL_S: u32 = 86_400;

/// `devices/{id}/config`: retained desired configuration. Absent fields leave the device's
/// current setting unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredConfig {
    /// Seconds between telemetry readings; 1 to [`MAX_INTERVAL_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval_s: Option<u32>,
    /// Seconds between heartbeats; 1 to [`MAX_INTERVAL_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp: Option<bool>,
}
