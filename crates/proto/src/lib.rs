//! The Flotilla wire contract: MQTT topic names and the JSON payloads that travel on them.
//!
//! This crate is shared by every party that speaks the protocol — the ESP32 firmware, the
//! Linux agent, the server and the gateway — so it is `#![no_std]` with `alloc` and performs
//! no I/O. `docs/protocol.md` is the human-readable form of the same contract.
//!
//! What it does not do: connect, retry, or decide anything. It names and (de)serialises.
//!
//! ```
//! use flotilla_proto::{Heartbeat, Topic, Channel, DeviceId};
//!
//! let (id, channel) = Topic::parse("devices/ABC123/health").unwrap();
//! assert_eq!(id.as_str(), "ABC123");
//! assert_eq!(channel, Channel::Health);
//! // The backend seed's own example payload parses.
//! let hb: Heartbeat = flotilla_proto::decode(br#"{"heap":18000,"fw":"1.0.0"}"#).unwrap();
//! assert_eq!(hb.heap, 18000);
//! assert_eq!(Topic::new(&DeviceId::parse("ABC123").unwrap(), Channel::Command).as_str(), "devices/ABC123/command");
//! ```
#![no_std]

extern crate alloc;

mod device_command;
mod device_id;
mod manifest;
mod messages;
mod order;
mod topic;
mod version;

pub use device_command::{COMMAND_NAMES, DeviceCommand, MAX_COMMAND_ARGS};
pub use device_id::{DeviceId, DeviceIdError};
pub use manifest::{FirmwareManifest, OtaCancel, OtaOffer, SignedManifest};
pub use messages::{
    Command, CommandReply, CommandStatus, DesiredConfig, Heartbeat, LedState, MAX_INTERVAL_S,
    OtaPhase, OtaStatus, SensorKind, Status, Telemetry,
};
pub use order::{ORDER_N_BITS, SessionOrder, WILL_N, order_key};
pub use topic::{Channel, Direction, Topic, TopicError};
pub use version::{FirmwareVersion, VersionError};

/// Largest payload accepted on any device topic, in bytes. Larger messages are dropped unread.
pub const MAX_PAYLOAD: usize = 4096;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload exceeds [`MAX_PAYLOAD`].
    TooLarge { len: usize },
    /// The payload is not the JSON this topic carries.
    Invalid,
    /// A string in the payload holds a NUL character (`\u0000`), which no field needs and
    /// PostgreSQL's text type cannot store.
    NulCharacter,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::TooLarge { len } => {
                write!(
                    f,
                    "payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                )
            }
            DecodeError::Invalid => f.write_str("payload is not valid JSON for this topic"),
            DecodeError::NulCharacter => f.write_str("payload holds a NUL character in a string"),
        }
    }
}

/// Decodes an untrusted payload, refusing oversized input before parsing it.
pub fn decode<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge { len: payload.len() });
    }
    let value = serde_json::from_slice(payload).map_err(|_| DecodeError::Invalid)?;
    // Checked on valid JSON only, where a raw NUL cannot occur (control characters must be
    // escaped), so the escape is the only way in.
    if has_escaped_nul(payload) {
        return Err(DecodeError::NulCharacter);
    }
    Ok(value)
}

/// Whether JSON text holds the escape `\u0000` (an odd run of backslashes before `u0000`:
/// `\\u0000` is a backslash followed by the text `u0000`).
pub fn has_escaped_nul(json: &[u8]) -> bool {
    json.windows(5).enumerate().any(|(i, w)| {
        w == b"u0000" && {
            let slashes = json[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            slashes % 2 == 1
        }
    })
}

/// The first `max` characters of `s`, for log lines and error texts that quote untrusted input.
pub fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Encodes a message as compact JSON.
pub fn encode<T: serde::Serialize>(message: &T) -> alloc::vec::Vec<u8> {
    // INVARIANT: every message type here is plain data with string keys; serde_json cannot fail on it.
    serde_json::to_vec(message).unwrap_or_default()
}
