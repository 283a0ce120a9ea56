//! Drives staged rollouts: one task owns every active [`flotilla_rollout::Rollout`] planner,
//! feeds it what happens (devices coming online, updates finishing, time passing, operator
//! controls) and carries out what it decides (offers, state transitions — each audited).
//!
//! Planners live in memory; the database holds each rollout's parameters, targets, state and
//! every offer with its outcome, so a restart rebuilds them: offers the planner makes again
//! for devices whose outcome is already known are answered from the database instead of
//! being sent twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_rollout::{Action, Config, DeviceState, Outcome, Rollout, State, Window};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::ota::OtaService;
use flotilla_store::{
    AuditRecord, Finished, ReleaseRow, RolloutRow, RolloutState, Store, UpdateState, now_ms,
};

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
        if self.max_concurrent == 0 {
            return Err("maxConcurrent must be at least 1".into());
        }
        Ok(())
    }

    fn planner_config(&self) -> Config {
        Config {
            phases: self.phases.clone(),
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
            min_failures: self.min_failures,
            device_timeout_ms: self.device_timeout_secs * 1000,
            max_concurrent: self.max_concurrent,
            start_at_ms: self.start_at.unwrap_or(0),
            window: self
                .maintenance_window
                .as_ref()
                .and_then(|w| w.window().ok()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

/// Live progress of an active rollout.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub state: &'static str,
    pub phase: Option<usize>,
    pub waiting: usize,
    pub in_flight: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub timed_out: usize,
}

#[derive(Debug)]
pub enum Event {
    /// A rollout was created.
    Start(String),
    DeviceOnline(String),
    Finished(Finished),
    Control {
        id: String,
        op: Control,
        actor: String,
        reply: oneshot::Sender<Result<&'static str, String>>,
    },
    Progress {
        id: String,
        reply: oneshot::Sender<Option<Progress>>,
    },
    ReleaseBlocked(String),
}

pub fn rollout_state(s: State) -> RolloutState {
    match s {
        State::Scheduled => RolloutState::Scheduled,
        State::Running { .. } => RolloutState::Running,
        State::Paused { .. } => RolloutState::Paused,
        State::Stopped { .. } => RolloutState::Stopped,
        State::Aborted => RolloutState::Aborted,
        State::Completed => RolloutState::Completed,
    }
}

fn phase_of(s: State) -> Option<usize> {
    match s {
        State::Running { phase } | State::Paused { phase } | State::Stopped { phase } => {
            Some(phase)
        }
        _ => None,
    }
}

struct Active {
    planner: Rollout,
    release: ReleaseRow,
    created_by: Option<i64>,
    /// What the database knows of each target's offer (to answer a rebuilt planner).
    known: HashMap<String, UpdateState>,
}

impl Active {
    /// Devices the planner timed out that the database still has in flight; from now on they
    /// are known as failed.
    fn take_timed_out(&mut self) -> Vec<String> {
        let planner = &self.planner;
        let ids: Vec<String> = self
            .known
            .iter()
            .filter(|(id, state)| {
                !state.is_final() && planner.device(id) == Some(DeviceState::TimedOut)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.known.insert(id.clone(), UpdateState::Failed);
        }
        ids
    }
}

struct Manager {
    store: Store,
    ota: Arc<OtaService>,
    active: HashMap<String, Active>,
}

/// Starts the rollout task; returns where to send it events.
pub fn spawn(store: Store, ota: Arc<OtaService>) -> mpsc::Sender<Event> {
    let (tx, rx) = mpsc::channel(4096);
    let manager = Manager {
        store,
        ota,
        active: HashMap::new(),
    };
    tokio::spawn(manager.run(rx));
    tx
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        match self.store.rollouts().await {
            Ok(rows) => {
                for row in rows.iter().filter(|r| r.state.is_open()) {
                    self.load(row).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "loading rollouts failed"),
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    let now = now_ms() as u64;
                    let mut timed_out = Vec::new();
                    for (id, a) in self.active.iter_mut() {
                        if a.planner.poll_timeout().is_some_and(|t| t <= now) {
                            a.planner.handle_timeout(now);
                            timed_out.extend(a.take_timed_out().into_iter().map(|d| (id.clone(), d)));
                        }
                    }
                    for (rollout, device) in timed_out {
                        let Ok(id) = flotilla_proto::DeviceId::parse(&device) else {
                            tracing::error!(rollout, device, "not a device id; timeout not recorded");
                            continue;
                        };
                        if let Err(e) = self.store.time_out_update(&rollout, &id).await {
                            tracing::error!(error = %e, rollout, device, "recording a timeout failed");
                        }
                    }
                    // Presence changes arrive as events; a periodic look at who is online
                    // also catches offline transitions and anything missed.
                    if ticks.is_multiple_of(4) {
                        self.resync_online().await;
                    }
                }
            }
            self.drain().await;
        }
    }

    async fn handle(&mut self, event: Event) {
        let now = now_ms() as u64;
        match event {
            Event::Start(id) => match self.store.rollout(&id).await {
                Ok(Some(row)) => self.load(&row).await,
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, rollout = %id, "loading rollout failed"),
            },
            Event::DeviceOnline(device) => {
                for a in self.active.values_mut() {
                    a.planner.handle_online(now, &device);
                }
            }
            Event::Finished(f) => {
                let Some(a) = f.rollout_id.as_ref().and_then(|id| self.active.get_mut(id)) else {
                    return;
                };
                a.known.insert(f.device_id.to_string(), f.state);
                if let Some(outcome) = outcome_of(f.state) {
                    a.planner.handle_outcome(now, f.device_id.as_str(), outcome);
                }
            }
            Event::Control {
                id,
                op,
                actor,
                reply,
            } => {
                let result = match self.active.get_mut(&id) {
                    None => Err("rollout is not active".to_string()),
                    Some(a) => {
                        match op {
                            Control::Pause => a.planner.pause(),
                            Control::Resume => a.planner.resume(now),
                            Control::Abort => a.planner.abort(),
                        }
                        Ok(rollout_state(a.planner.state()).as_str())
                    }
                };
                // Carry out (and record) the transition before answering.
                self.drain().await;
                self.store
                    .audit(AuditRecord {
                        actor: &actor,
                        action: match op {
                            Control::Pause => "rollout.pause",
                            Control::Resume => "rollout.resume",
                            Control::Abort => "rollout.abort",
                        },
                        target: Some(&id),
                        result: if result.is_ok() { "success" } else { "refused" },
                        detail: result.as_ref().err().cloned(),
                    })
                    .await;
                let _ = reply.send(result);
            }
            Event::Progress { id, reply } => {
                let progress = self.active.get(&id).map(|a| {
                    let c = a.planner.counts();
                    Progress {
                        state: rollout_state(a.planner.state()).as_str(),
                        phase: phase_of(a.planner.state()),
                        waiting: c.waiting,
                        in_flight: c.in_flight,
                        succeeded: c.succeeded,
                        failed: c.failed,
                        timed_out: c.timed_out,
                    }
                });
                let _ = reply.send(progress);
            }
            Event::ReleaseBlocked(version) => {
                for a in self
                    .active
                    .values_mut()
                    .filter(|a| a.release.version == version)
                {
                    a.release.blocked = true;
                    a.planner.abort();
                }
            }
        }
    }

    /// Builds the planner of a stored rollout and replays what is known.
    async fn load(&mut self, row: &RolloutRow) {
        let settings: Settings = match serde_json::from_value(row.config.clone()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, rollout = %row.id, "stored rollout settings unreadable");
                return;
            }
        };
        let release = match self.store.release(&row.version).await {
            Ok(Some(r)) => r,
            _ => {
                tracing::error!(rollout = %row.id, version = %row.version, "rollout release missing");
                return;
            }
        };
        let known = match self.store.rollout_outcomes(&row.id).await {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = %e, rollout = %row.id, "loading rollout outcomes failed");
                return;
            }
        };
        let now = now_ms() as u64;
        let mut planner = Rollout::new(settings.planner_config(), row.targets.clone(), now);
        if row.state == RolloutState::Paused {
            planner.pause();
        }
        let online = self.store.online_devices().await.unwrap_or_default();
        for device in &online {
            planner.handle_online(now, device);
        }
        self.active.insert(
            row.id.clone(),
            Active {
                planner,
                release,
                created_by: row.created_by,
                known,
            },
        );
    }

    async fn resync_online(&mut self) {
        if self.active.is_empty() {
            return;
        }
        let Ok(online) = self.store.online_devices().await else {
            return;
        };
        let online: std::collections::HashSet<String> = online.into_iter().collect();
        let now = now_ms() as u64;
        for a in self.active.values_mut() {
            for target in a.planner.targets().to_vec() {
                if online.contains(&target) {
                    a.planner.handle_online(now, &target);
                } else {
                    a.planner.handle_offline(&target);
                }
            }
        }
    }

    /// Carries out every planner's decisions.
    async fn drain(&mut self) {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            while let Some(action) = self
                .active
                .get_mut(&id)
                .and_then(|a| a.planner.poll_action())
            {
                match action {
                    Action::Notify(device) => self.notify(&id, &device).await,
                    Action::Transition(state) => self.transition(&id, state).await,
                }
            }
            let finished = self.active.get(&id).is_some_and(|a| {
                matches!(
                    a.planner.state(),
                    State::Stopped { .. } | State::Aborted | State::Completed
                )
            });
            if finished {
                self.active.remove(&id);
            }
        }
    }

    async fn notify(&mut self, rollout: &str, device: &str) {
        let Some(a) = self.active.get_mut(rollout) else {
            return;
        };
        let now = now_ms() as u64;
        match a.known.get(device).copied() {
            // Rebuilt after a restart: the outcome is already known.
            Some(state) if state.is_final() => {
                if let Some(outcome) = outcome_of(state) {
                    a.planner.handle_outcome(now, device, outcome);
                }
            }
            // Offered before the restart and still open: it is in flight already.
            Some(_) => {}
            None if a.release.blocked => {}
            None => {
                // The planner's ids are the targets the store gave it, device ids all.
                let Ok(id) = flotilla_proto::DeviceId::parse(device) else {
                    tracing::error!(rollout, device, "not a device id; not offered");
                    return;
                };
                let (release, created_by) = (a.release.clone(), a.created_by);
                a.known.insert(device.to_string(), UpdateState::Offered);
                if let Err(e) = self
                    .ota
                    .offer(&id, &release, false, Some(rollout), created_by)
                    .await
                {
                    tracing::error!(error = %e, rollout, device, "recording rollout offer failed");
                }
            }
        }
    }

    async fn transition(&mut self, rollout: &str, state: State) {
        let stored = rollout_state(state);
        let name = stored.as_str();
        if let Err(e) = self
            .store
            .set_rollout_state(rollout, stored, phase_of(state))
            .await
        {
            tracing::error!(error = %e, rollout, "saving rollout state failed");
        }
        let counts = self.active.get(rollout).map(|a| a.planner.counts());
        let blocked = self.active.get(rollout).is_some_and(|a| a.release.blocked);
        let detail = match (state, counts) {
            (State::Stopped { phase }, Some(c)) => format!(
                "stopped itself in phase {}: {} failed, {} timed out, {} succeeded",
                phase + 1,
                c.failed,
                c.timed_out,
                c.succeeded
            ),
            (State::Aborted, _) if blocked => "aborted: release blocked".to_string(),
            (State::Running { phase }, _) => format!("phase {} running", phase + 1),
            _ => name.to_string(),
        };
        tracing::info!(rollout, state = name, %detail, "rollout transition");
        self.store
            .audit(AuditRecord {
                actor: "system:rollouts",
                action: "rollout.transition",
                target: Some(rollout),
                result: name,
                detail: Some(detail),
            })
            .await;
        if matches!(state, State::Stopped { .. } | State::Aborted)
            && let Err(e) = self
                .store
                .cancel_rollout_updates(rollout, &format!("rollout {name}"))
                .await
        {
            tracing::error!(error = %e, rollout, "cancelling offers failed");
        }
    }
}

fn outcome_of(state: UpdateState) -> Option<Outcome> {
    match state {
        UpdateState::Succeeded => Some(Outcome::Succeeded),
        UpdateState::Failed => Some(Outcome::Failed),
        UpdateState::RolledBack => Some(Outcome::RolledBack),
        _ => None,
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
            serde_json::json!({"surprise": true}),
        ] {
            assert!(settings(bad.clone()).is_err(), "{bad}");
        }
    }
}
