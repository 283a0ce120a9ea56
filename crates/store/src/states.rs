//! The state columns as enums. Each is stored as its name and parsed back with `TryFrom`: a
//! name no variant has (a newer server's state, a hand-edited row) is an error that names it,
//! never read as some default state.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

/// A state column holding a name no variant has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

/// Reads a state column, refusing the row when the name is unknown.
pub(super) fn state<T>(row: &AnyRow, column: &str) -> sqlx::Result<T>
where
    T: for<'a> TryFrom<&'a str, Error = UnknownState>,
{
    let name: String = row.try_get(column)?;
    T::try_from(name.as_str()).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: Box::new(e),
    })
}

/// Reads a nullable state column: `None` for NULL, an error for an unknown name.
pub(super) fn optional_state<T>(row: &AnyRow, column: &str) -> sqlx::Result<Option<T>>
where
    T: for<'a> TryFrom<&'a str, Error = UnknownState>,
{
    let name: Option<String> = row.try_get(column)?;
    name.map(|n| {
        T::try_from(n.as_str()).map_err(|e| sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: Box::new(e),
        })
    })
    .transpose()
}

/// Declares a state enum stored by name: `as_str`, `TryFrom<&str>` and `Serialize` as the name.
macro_rules! stored_state {
    ($(#[$doc:meta])* $name:ident, $kind:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            #[cfg(test)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = UnknownState;

            fn try_from(s: &str) -> Result<$name, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownState {
                        kind: $kind,
                        value: flotilla_proto::truncate_chars(other, 40).to_string(),
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

stored_state!(
    /// Lifecycle of a command: queued -> delivered -> succeeded | failed, or expired.
    CommandState, "command state" {
        Queued => "queued",
        Delivered => "delivered",
        Succeeded => "succeeded",
        Failed => "failed",
        Expired => "expired",
    }
);

stored_state!(
    /// offered -> started -> in_progress -> succeeded | failed | rolled_back; or cancelled.
    UpdateState, "update state" {
        Offered => "offered",
        Started => "started",
        InProgress => "in_progress",
        Succeeded => "succeeded",
        Failed => "failed",
        RolledBack => "rolled_back",
        Cancelled => "cancelled",
    }
);

impl CommandState {
    /// Answered or expired: it changes no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded | CommandState::Failed | CommandState::Expired
        )
    }
}

impl UpdateState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpdateState::Succeeded
                | UpdateState::Failed
                | UpdateState::RolledBack
                | UpdateState::Cancelled
        )
    }
}

stored_state!(
    /// A rollout as last saved: scheduled -> running <-> paused -> completed | stopped | aborted.
    RolloutState, "rollout state" {
        Scheduled => "scheduled",
        Running => "running",
        Paused => "paused",
        Completed => "completed",
        Stopped => "stopped",
        Aborted => "aborted",
    }
);

impl RolloutState {
    /// Still to be driven by the planner (rebuilt at start-up).
    pub fn is_open(self) -> bool {
        matches!(
            self,
            RolloutState::Scheduled | RolloutState::Running | RolloutState::Paused
        )
    }
}

stored_state!(
    /// One target of a rollout: waiting -> in_flight -> succeeded | failed | timed_out; a
    /// target offline past its phase's waiting deadline is skipped (and may be offered later).
    TargetState, "rollout target state" {
        Waiting => "waiting",
        InFlight => "in_flight",
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Skipped => "skipped",
    }
);

stored_state!(
    /// Why a rollout halted itself.
    RolloutHalt, "rollout halt" {
        TooManyFailures => "too_many_failures",
        PhaseBelowSuccessThreshold => "phase_below_success_threshold",
        NoDeviceReached => "no_device_reached",
        UnhealthyCrashes => "unhealthy_crashes",
        UnhealthyReboots => "unhealthy_reboots",
        UnhealthyHeartbeats => "unhealthy_heartbeats",
    }
);

stored_state!(
    /// What an account may do.
    Role, "role" {
        Admin => "admin",
        Operator => "operator",
        Viewer => "viewer",
    }
);

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let name = String::deserialize(d)?;
        Role::try_from(name.as_str()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_as_itself_and_unknown_names_are_errors() {
        for s in CommandState::ALL {
            assert_eq!(CommandState::try_from(s.as_str()), Ok(*s));
        }
        for s in UpdateState::ALL {
            assert_eq!(UpdateState::try_from(s.as_str()), Ok(*s));
        }
        for s in RolloutState::ALL {
            assert_eq!(RolloutState::try_from(s.as_str()), Ok(*s));
        }
        for s in Role::ALL {
            assert_eq!(Role::try_from(s.as_str()), Ok(*s));
        }
        for s in TargetState::ALL {
            assert_eq!(TargetState::try_from(s.as_str()), Ok(*s));
        }
        for s in RolloutHalt::ALL {
            assert_eq!(RolloutHalt::try_from(s.as_str()), Ok(*s));
        }
        let e = UpdateState::try_from("half_done").unwrap_err();
        assert_eq!(e.to_string(), r#"unknown update state "half_done""#);
        assert!(CommandState::try_from("Queued").is_err());
        assert!(Role::try_from("").is_err());
        assert!(serde_json::from_str::<Role>(r#""god""#).is_err());
        assert_eq!(
            serde_json::to_string(&UpdateState::RolledBack).unwrap(),
            r#""rolled_back""#
        );
    }
}

stored_state!(
    /// Why a device certificate stopped being valid: the device was issued a new one
    /// (re-provisioned), or an admin revoked it.
    RevokeReason, "revoke reason" {
        Superseded => "superseded",
        Revoked => "revoked",
    }
);
