//! What the SoftAP's `POST /provision` carries (seed 004), and its validation.

use alloc::string::String;
use core::fmt;

use flotilla_proto::{DeviceId, DeviceIdError};
use serde::{Deserialize, Serialize};

/// The body of `POST /provision`. The `Authorization: Bearer` header travels separately and
/// lands in [`Provisioning::bearer_token`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProvisionRequest {
    pub ssid: String,
    #[serde(default)]
    pub password: String,
    pub device_id: String,
    pub provisioning_token: String,
}

/// Provisioning data the device keeps in NVS.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provisioning {
    pub ssid: String,
    pub password: String,
    pub device_id: DeviceId,
    /// One-time token for `POST /sign-csr`.
    pub provisioning_token: String,
    /// The user's token for calls on their behalf (seed 004); stored apart from the above.
    pub bearer_token: Option<String>,
}

impl fmt::Debug for Provisioning {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioning")
            .field("ssid", &self.ssid)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Why a provisioning request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionError {
    /// The device is not in AP mode (already provisioned).
    NotInApMode,
    BadSsid,
    BadPassword,
    BadDeviceId(DeviceIdError),
    BadToken,
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProvisionError::NotInApMode => f.write_str("device is already provisioned"),
            ProvisionError::BadSsid => f.write_str("ssid must be 1 to 32 bytes"),
            ProvisionError::BadPassword => {
                f.write_str("password must be empty (open network) or 8 to 63 bytes")
            }
            ProvisionError::BadDeviceId(e) => write!(f, "device_id: {e}"),
            ProvisionError::BadToken => f.write_str("provisioning_token must be 1 to 512 bytes"),
        }
    }
}

pub(crate) const MAX_TOKEN_LEN: usize = 512;

impl ProvisionRequest {
    /// Checks every field against what 802.11 and our protocol allow.
    pub fn validate(self, bearer_token: Option<String>) -> Result<Provisioning, ProvisionError> {
        if self.ssid.is_empty() || self.ssid.len() > 32 {
            return Err(ProvisionError::BadSsid);
        }
        if !(self.password.is_empty() || (8..=63).contains(&self.password.len())) {
            return Err(ProvisionError::BadPassword);
        }
        let device_id = DeviceId::parse(&self.device_id).map_err(ProvisionError::BadDeviceId)?;
        if self.provisioning_token.is_empty() || self.provisioning_token.len() > MAX_TOKEN_LEN {
            return Err(ProvisionError::BadToken);
        }
        let bearer_token = bearer_token.filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN);
        Ok(Provisioning {
            ssid: self.ssid,
            password: self.password,
            device_id,
            provisioning_token: self.provisioning_token,
            bearer_token,
        })
    }
}
