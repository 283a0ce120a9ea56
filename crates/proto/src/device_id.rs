use alloc::string::{String, ToString};
use core::fmt;

/// A device's identity: the certificate CN, the MQTT client id and the `{id}` in its topics.
///
/// 1 to 64 characters of `A-Z a-z 0-9 _ -`, starting with a letter or digit. The restriction
/// keeps ids safe inside topic names (no `/`, `+`, `#`, `$`) and leaves characters such as `:`
/// free for the server's own service identities, which therefore can never collide with a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a string is not a valid [`DeviceId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIdError {
    Empty,
    TooLong,
    BadCharacter,
}

impl fmt::Display for DeviceIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceIdError::Empty => "device id is empty",
            DeviceIdError::TooLong => "device id is longer than 64 characters",
            DeviceIdError::BadCharacter => {
                "device id may contain only A-Z, a-z, 0-9, '_' and '-', and must start with a letter or digit"
            }
        })
    }
}

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, DeviceIdError> {
        if s.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(DeviceIdError::TooLong);
        }
        let ok_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        if !s.as_bytes()[0].is_ascii_alphanumeric() || !s.bytes().all(ok_char) {
            return Err(DeviceIdError::BadCharacter);
        }
        Ok(DeviceId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_seed_ids() {
        for id in ["0C5D32DD2568", "ABC123", "device_0070", "dev-1"] {
            assert!(DeviceId::parse(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_topic_metacharacters_and_service_names() {
        for id in [
            "",
            "a/b",
            "+",
            "#",
            "$SYS",
            "svc:ingest",
            "-lead",
            "a b",
            "é",
        ] {
            assert!(DeviceId::parse(id).is_err(), "{id}");
        }
        assert_eq!(
            DeviceId::parse(&"a".repeat(65)),
            Err(DeviceIdError::TooLong)
        );
    }
}
