//! Who may connect: an in-memory mirror of the devices table's blocked flags and valid
//! certificate serials, consulted by the broker on every CONNECT without a database query.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use flotilla_pki::normalize_serial;
use flotilla_proto::DeviceId;
use flotilla_store::{GateEntry, Store, StoreResult};

/// The certificates a device may connect with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Serials {
    current: String,
    /// Issued by renewal and not used yet: valid beside the current one until it is used.
    pending: Option<String>,
}

#[derive(Debug, Default)]
pub struct DeviceGate {
    blocked: RwLock<HashSet<String>>,
    /// device id -> the serials it may use (re-provisioning and renewal revoke the others).
    serials: RwLock<HashMap<String, Serials>>,
    /// Held from reading a device's row to writing it here ([`DeviceGate::refresh`]), so of
    /// two changes the later read is the one that stays.
    refreshing: tokio::sync::Mutex<()>,
}

/// Why a device was refused at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownDevice,
    Blocked,
    RevokedCertificate,
}

/// Which of its certificates a device connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    Current,
    /// The pending one, by this serial: the renewal is complete once it is promoted.
    Pending(String),
}

impl DeviceGate {
    pub fn load(rows: Vec<GateEntry>) -> DeviceGate {
        let gate = DeviceGate::default();
        for row in rows {
            gate.set_blocked(&row.device_id, row.blocked);
            if let Some(current) = row.serial {
                gate.set_serial(&row.device_id, &current);
                if let Some(pending) = row.pending_serial {
                    gate.set_pending(&row.device_id, &pending);
                }
            }
        }
        gate
    }

    /// Takes the database's view whole (replicas: what another replica blocked, revoked or
    /// provisioned reaches this one's gate).
    pub fn replace(&self, rows: Vec<GateEntry>) {
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

    /// After a change to a device's row has committed: takes the row as it is now (one
    /// indexed read), rather than applying the change itself, so a concurrent change (a
    /// revocation during a renewal) can never be undone by the slower of the two.
    pub async fn refresh(&self, store: &Store, device_id: &DeviceId) -> StoreResult<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let entry = store.gate_entry(device_id).await?;
        let id = device_id.as_str();
        self.set_blocked(id, entry.as_ref().is_some_and(|e| e.blocked));
        match entry.and_then(|e| e.serial.map(|s| (s, e.pending_serial))) {
            Some((current, pending)) => {
                self.set_serial(id, &current);
                if let Some(p) = pending {
                    self.set_pending(id, &p);
                }
            }
            None => self.forget_serial(id),
        }
        Ok(())
    }

    pub fn set_blocked(&self, device_id: &str, blocked: bool) {
        let mut set = self.blocked.write().unwrap_or_else(|p| p.into_inner());
        if blocked {
            set.insert(device_id.to_string());
        } else {
            set.remove(device_id);
        }
    }

    /// The device's only valid certificate is now `serial_hex` (provisioned, or a renewal
    /// promoted): any other it held is refused from now on.
    pub fn set_serial(&self, device_id: &str, serial_hex: &str) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                device_id.to_string(),
                Serials {
                    current: normalize_serial(serial_hex),
                    pending: None,
                },
            );
    }

    /// The device was issued `serial_hex` by renewal: valid beside its current certificate.
    pub fn set_pending(&self, device_id: &str, serial_hex: &str) {
        if let Some(s) = self
            .serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(device_id)
        {
            s.pending = Some(normalize_serial(serial_hex));
        }
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

    pub fn check(&self, device_id: &str, serial_hex: Option<&str>) -> Result<Admitted, Refusal> {
        let serials = self.serials.read().unwrap_or_else(|p| p.into_inner());
        let valid = serials.get(device_id).ok_or(Refusal::UnknownDevice)?;
        if self.is_blocked(device_id) {
            return Err(Refusal::Blocked);
        }
        let Some(presented) = serial_hex.map(normalize_serial) else {
            return Err(Refusal::RevokedCertificate);
        };
        if presented == valid.current {
            Ok(Admitted::Current)
        } else if valid.pending.as_ref() == Some(&presented) {
            Ok(Admitted::Pending(presented))
        } else {
            Err(Refusal::RevokedCertificate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, serial: Option<&str>, pending: Option<&str>) -> GateEntry {
        GateEntry {
            device_id: id.into(),
            blocked: false,
            serial: serial.map(String::from),
            pending_serial: pending.map(String::from),
        }
    }

    #[test]
    fn a_renewing_device_may_use_either_certificate_until_the_new_one_is_promoted() {
        let gate = DeviceGate::load(vec![entry("d", Some("1a"), Some("1b"))]);
        assert_eq!(gate.check("d", Some("1A")), Ok(Admitted::Current));
        assert_eq!(
            gate.check("d", Some("1b")),
            Ok(Admitted::Pending("1b".into()))
        );
        assert_eq!(
            gate.check("d", Some("1c")),
            Err(Refusal::RevokedCertificate)
        );
        assert_eq!(gate.check("d", None), Err(Refusal::RevokedCertificate));
        gate.set_serial("d", "1b");
        assert_eq!(gate.check("d", Some("1b")), Ok(Admitted::Current));
        assert_eq!(
            gate.check("d", Some("1a")),
            Err(Refusal::RevokedCertificate)
        );
        gate.set_blocked("d", true);
        assert_eq!(gate.check("d", Some("1b")), Err(Refusal::Blocked));
    }

    #[test]
    fn a_pending_serial_without_a_current_one_admits_nothing() {
        let gate = DeviceGate::load(vec![entry("d", None, Some("1b"))]);
        assert_eq!(gate.check("d", Some("1b")), Err(Refusal::UnknownDevice));
        gate.set_pending("e", "01");
        assert_eq!(gate.check("e", Some("01")), Err(Refusal::UnknownDevice));
    }
}
