//! Rollout parameters as the API takes them (camelCase JSON), validated, and stored with the
//! rollout; [`Settings::planner_config`] turns them into the planner's.

use flotilla_rollout::{Config, HealthGate, OnFailure, Window};
use serde::{Deserialize, Serialize};

/// Rollout parameters as the API takes them (camelCase JSON), stored with the rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Cumulative percentages of the targets, increasing, ending at 100.
    #[serde(default = "default_phases")]
    pub phases: Vec<f64>,
    #[serde(default = "default_success")]
    pub success_threshold: f64,
    #[serde(default = "default_failure")]
    pub failure_threshold: f64,
    #[serde(default = "default_min_failures")]
    pub min_failures: usize,
    #[serde(default = "default_timeout")]
    pub device_timeout_secs: u64,
    /// How long after its phase started a target may stay offline before it is skipped.
    #[serde(default = "default_wait")]
    pub wait_timeout_secs: u64,
    /// What crossing `failureThreshold` does: `stop` (the default) or `pause`.
    #[serde(default)]
    pub on_failure: FailureAction,
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    /// Unix milliseconds; nothing is offered before.
    #[serde(default)]
    pub start_at: Option<u64>,
    /// Instead of `phases`: start at `startPercent` and multiply by `factor` each phase.
    #[serde(default)]
    pub exponential: Option<Exponential>,
    /// Offer only inside this daily UTC window, e.g. `{"start":"23:00","end":"01:00"}`.
    #[serde(default)]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Stop (or pause, with `onFailure`) when devices on the new version crash or reboot
    /// more, or heartbeat less, than devices on the old one.
    #[serde(default)]
    pub health: Option<HealthSettings>,
}

/// The health gate's thresholds (`flotilla_rollout::HealthGate`); a ratio left out is not
/// judged. A finished phase waits (at most `waitTimeoutSecs`) until the new version has
/// been observed for `minObservedSecs` of device-time before the next phase starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthSettings {
    pub max_crash_ratio: Option<f64>,
    pub max_reboot_ratio: Option<f64>,
    pub min_heartbeat_ratio: Option<f64>,
    #[serde(default = "default_observed")]
    pub min_observed_secs: u64,
    #[serde(default = "default_events")]
    pub min_events: u64,
}

fn default_observed() -> u64 {
    3600
}
fn default_events() -> u64 {
    3
}

impl HealthSettings {
    fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("health.maxCrashRatio", self.max_crash_ratio),
            ("health.maxRebootRatio", self.max_reboot_ratio),
            ("health.minHeartbeatRatio", self.min_heartbeat_ratio),
        ] {
            if v.is_some_and(|r| !r.is_finite() || r <= 0.0 || r > 1000.0) {
                return Err(format!("{name} must be in (0, 1000]"));
            }
        }
        if self.max_crash_ratio.is_none()
            && self.max_reboot_ratio.is_none()
            && self.min_heartbeat_ratio.is_none()
        {
            return Err(
                "health needs at least one of maxCrashRatio, maxRebootRatio, minHeartbeatRatio"
                    .into(),
            );
        }
        if self.min_observed_secs == 0 || self.min_observed_secs > 30 * 24 * 3600 {
            return Err("health.minObservedSecs must be 1 to 2592000".into());
        }
        Ok(())
    }

    fn gate(&self) -> HealthGate {
        HealthGate {
            max_crash_ratio: self.max_crash_ratio,
            max_reboot_ratio: self.max_reboot_ratio,
            min_heartbeat_ratio: self.min_heartbeat_ratio,
            min_observed_ms: self.min_observed_secs * 1000,
            min_events: self.min_events,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Stop,
    Pause,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exponential {
    pub start_percent: f64,
    pub factor: f64,
}

impl Exponential {
    /// 1, 2, 4, ... capped at 100 (at most 20 phases).
    fn phases(&self) -> Result<Vec<f64>, String> {
        let valid = self.start_percent > 0.0 && self.start_percent <= 100.0 && self.factor > 1.0;
        if !valid {
            return Err("exponential needs startPercent in (0, 100] and factor > 1".into());
        }
        let mut p = vec![self.start_percent];
        while p.len() < 19 && p[p.len() - 1] * self.factor < 100.0 {
            p.push(p[p.len() - 1] * self.factor);
        }
        if p[p.len() - 1] < 100.0 {
            p.push(100.0);
        }
        Ok(p)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// `HH:MM`, UTC.
    pub start: String,
    pub end: String,
}

impl MaintenanceWindow {
    fn window(&self) -> Result<Window, String> {
        let parse = |s: &str| -> Result<u64, String> {
            let (h, m) = s
                .split_once(':')
                .ok_or_else(|| format!("maintenanceWindow: '{s}' is not HH:MM"))?;
            let (h, m): (u64, u64) = (
                h.parse()
                    .map_err(|_| format!("maintenanceWindow: bad hour in '{s}'"))?,
                m.parse()
                    .map_err(|_| format!("maintenanceWindow: bad minute in '{s}'"))?,
            );
            if h > 23 || m > 59 {
                return Err(format!("maintenanceWindow: '{s}' is not a time of day"));
            }
            Ok((h * 60 + m) * 60_000)
        };
        let (start_ms, end_ms) = (parse(&self.start)?, parse(&self.end)?);
        if start_ms == end_ms {
            return Err("maintenanceWindow: start and end must differ".into());
        }
        Ok(Window { start_ms, end_ms })
    }
}

fn default_phases() -> Vec<f64> {
    vec![1.0, 10.0, 50.0, 100.0]
}
fn default_success() -> f64 {
    0.95
}
fn default_failure() -> f64 {
    0.2
}
fn default_min_failures() -> usize {
    1
}
fn default_timeout() -> u64 {
    1800
}
fn default_wait() -> u64 {
    3600
}
fn default_concurrency() -> usize {
    100
}

impl Settings {
    /// Refuses parameters that would make a rollout that never finishes or never stops.
    pub fn validate(&mut self) -> Result<(), String> {
        if let Some(e) = &self.exponential {
            self.phases = e.phases()?;
        }
        if let Some(w) = &self.maintenance_window {
            w.window()?;
        }
        let p = &self.phases;
        if p.is_empty() || p.len() > 20 {
            return Err("phases must list 1 to 20 cumulative percentages".into());
        }
        if p.iter().any(|x| !x.is_finite() || *x <= 0.0 || *x > 100.0)
            || p.windows(2).any(|w| w[0] >= w[1])
            || p.last() != Some(&100.0)
        {
            return Err("phases must increase, each in (0, 100], and end at 100".into());
        }
        for (name, v) in [
            ("successThreshold", self.success_threshold),
            ("failureThreshold", self.failure_threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        if self.device_timeout_secs == 0 || self.device_timeout_secs > 7 * 24 * 3600 {
            return Err("deviceTimeoutSecs must be 1 to 604800".into());
        }
        if self.wait_timeout_secs == 0 || self.wait_timeout_secs > 30 * 24 * 3600 {
            return Err("waitTimeoutSecs must be 1 to 2592000".into());
        }
        if self.max_concurrent == 0 {
            return Err("maxConcurrent must be at least 1".into());
        }
        if let Some(h) = &self.health {
            h.validate()?;
        }
        Ok(())
    }

    pub fn planner_config(&self) -> Config {
        Config {
            phases: self.phases.clone(),
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
            min_failures: self.min_failures,
            device_timeout_ms: self.device_timeout_secs * 1000,
            wait_timeout_ms: self.wait_timeout_secs * 1000,
            on_failure: match self.on_failure {
                FailureAction::Stop => OnFailure::Stop,
                FailureAction::Pause => OnFailure::Pause,
            },
            max_concurrent: self.max_concurrent,
            start_at_ms: self.start_at.unwrap_or(0),
            window: self
                .maintenance_window
                .as_ref()
                .and_then(|w| w.window().ok()),
            health: self
                .health
                .as_ref()
                .map_or_else(HealthGate::default, HealthSettings::gate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: serde_json::Value) -> Result<Settings, String> {
        let mut s: Settings = serde_json::from_value(json).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn health_thresholds_are_checked_and_reach_the_planner() {
        let ok = settings(serde_json::json!({
            "health": { "maxCrashRatio": 2.0, "minHeartbeatRatio": 0.5, "minObservedSecs": 600 }
        }))
        .unwrap();
        let gate = ok.planner_config().health;
        assert_eq!(
            (
                gate.max_crash_ratio,
                gate.max_reboot_ratio,
                gate.min_heartbeat_ratio
            ),
            (Some(2.0), None, Some(0.5))
        );
        assert_eq!((gate.min_observed_ms, gate.min_events), (600_000, 3));
        assert!(
            !settings(serde_json::json!({}))
                .unwrap()
                .planner_config()
                .health
                .is_enabled()
        );
        for bad in [
            serde_json::json!({ "health": {} }),
            serde_json::json!({ "health": { "maxCrashRatio": 0 } }),
            serde_json::json!({ "health": { "maxCrashRatio": -1 } }),
            serde_json::json!({ "health": { "maxRebootRatio": 2, "minObservedSecs": 0 } }),
            serde_json::json!({ "health": { "maxCrashRatio": 2, "bakeSecs": 5 } }),
        ] {
            assert!(settings(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn exponential_phases_double_up_to_everything() {
        let s =
            settings(serde_json::json!({"exponential": {"startPercent": 1, "factor": 2}})).unwrap();
        assert_eq!(s.phases, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0]);
        assert!(
            settings(serde_json::json!({"exponential": {"startPercent": 1, "factor": 1}})).is_err()
        );
    }

    #[test]
    fn windows_and_phases_are_validated() {
        let s =
            settings(serde_json::json!({"maintenanceWindow": {"start": "23:00", "end": "01:30"}}))
                .unwrap();
        assert_eq!(
            s.planner_config().window,
            Some(Window {
                start_ms: 23 * 3_600_000,
                end_ms: 90 * 60_000
            })
        );
        for bad in [
            serde_json::json!({"maintenanceWindow": {"start": "24:00", "end": "01:00"}}),
            serde_json::json!({"maintenanceWindow": {"start": "1am", "end": "01:00"}}),
            serde_json::json!({"phases": [10, 5, 100]}),
            serde_json::json!({"phases": [10, 50]}),
            serde_json::json!({"successThreshold": 1.5}),
            serde_json::json!({"maxConcurrent": 0}),
            serde_json::json!({"waitTimeoutSecs": 0}),
            serde_json::json!({"onFailure": "explode"}),
            serde_json::json!({"surprise": true}),
        ] {
            assert!(settings(bad.clone()).is_err(), "{bad}");
        }
    }
}
