//! Who may connect: an in-memory mirror of the devices table's blocked flags and current
//! certificate serials, consulted by the broker on every CONNECT without a database query.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use flotilla_pki::normalize_serial;

#[derive(Debug, Default)]
pub struct DeviceGate {
    blocked: RwLock<HashSet<String>>,
    /// device id -> serial of the only certificate it may use (re-provisioning revokes the old one).
    serials: RwLock<HashMap<String, String>>,
}

/// Why a device was refused at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownDevice,
    Blocked,
    RevokedCertificate,
}

impl DeviceGate {
    pub fn load(rows: Vec<(String, bool, Option<String>)>) -> DeviceGate {
        let gate = DeviceGate::default();
        for (id, blocked, serial) in rows {
            gate.set_blocked(&id, blocked);
            if let Some(s) = serial {
                gate.set_serial(&id, &s);
            }
        }
        gate
    }

    /// Takes the database's view whole (replicas: what another replica blocked, revoked or
    /// provisioned reaches this one's gate).
    pub fn replace(&self, rows: Vec<(String, bool, Option<String>)>) {
        let fresh = DeviceGate::load(rows);
        let blocked = fresh
            .blocked
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let serials = fresh
            .serials
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        *self.blocked.write().unwrap_or_else(|p| p.into_inner()) = blocked;
        *self.serials.write().unwrap_or_else(|p| p.into_inner()) = serials;
    }

    pub fn set_blocked(&self, device_id: &str, blocked: bool) {
        let mut set = self.blocked.write().unwrap_or_else(|p| p.into_inner());
        if blocked {
            set.insert(device_id.to_string());
        } else {
            set.remove(device_id);
        }
    }

    pub fn set_serial(&self, device_id: &str, serial_hex: &str) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(device_id.to_string(), normalize_serial(serial_hex));
    }

    /// The device holds no valid certificate any more (revoked): refused until it is issued one.
    pub fn forget_serial(&self, device_id: &str) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device_id);
    }

    pub fn is_blocked(&self, device_id: &str) -> bool {
        self.blocked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(device_id)
    }

    pub fn check(&self, device_id: &str, serial_hex: Option<&str>) -> Result<(), Refusal> {
        let serials = self.serials.read().unwrap_or_else(|p| p.into_inner());
        let current = serials.get(device_id).ok_or(Refusal::UnknownDevice)?;
        if self.is_blocked(device_id) {
            return Err(Refusal::Blocked);
        }
        match serial_hex {
            Some(s) if normalize_serial(s) == *current => Ok(()),
            _ => Err(Refusal::RevokedCertificate),
        }
    }
}
