//! Drives staged rollouts. One task per server owns the [`flotilla_rollout::Rollout`] planners
//! of every open rollout while this server leads ([`crate::leader`]); it feeds them what
//! happens (devices coming online, updates finishing, time passing, operator controls) and
//! carries out what they decide.
//!
//! Every decision is saved before it is acted on, in one transaction fenced by the lease: the
//! rollout's state and timers, each target that changed, the offers it made (published after
//! the commit) and the audit records of its transitions. So a server that restarts, or takes over from a leader that
//! died, restores each planner where it was ([`restore`]) — same phase, same counts, same
//! timers — without replaying offers or writing transitions again.
//!
//! What other replicas see reaches the leader through the database, re-read every second:
//! new rollouts, operators' controls (a replica that does not lead leaves them on the rollout
//! row), outcomes ingested elsewhere, and who is online. Events from this server's own ingest
//! and API only make that quicker.

mod restore;
mod settings;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_rollout::{Action, DeviceState, Halt, Metric, Outcome, Rollout, State};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::leader::{Leadership, Sweep};
use crate::ota::OtaService;
use flotilla_store::{
    AuditRecord, Finished, NewOffer, ReleaseRow, RolloutRow, RolloutSave, RolloutState,
    SavedOffers, Store, StoreResult, TargetState, UpdateState,
};
use restore::{Clock, stored_halt, stored_target};
pub use restore::{phase_of, rollout_state};
pub use settings::Settings;

/// How far before the newest heartbeat seen the leader looks again for heartbeats committed
/// late (another replica's batch, a commit held up): those later still reach no health gate.
const HEARTBEAT_LOOKBACK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort => "abort",
        }
    }

    fn parse(s: &str) -> Option<Control> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// What became of an operator's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Carried out here (this server leads); the rollout's state now.
    Done(RolloutState),
    /// Left on the rollout for the leader.
    Requested,
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
        reply: oneshot::Sender<Result<Applied, String>>,
    },
    ReleaseBlocked(String),
}

struct Active {
    planner: Rollout,
    release: ReleaseRow,
    created_by: Option<i64>,
    /// The last transition in words, saved with the next decision.
    reason: Option<String>,
}

struct Manager {
    store: Store,
    ota: Arc<OtaService>,
    leadership: Leadership,
    clock: Clock,
    active: HashMap<String, Active>,
    /// Who was online at the last look, so only devices that came online since are fed as
    /// online (one a planner set aside as busy stays aside until it is seen coming back).
    seen_online: HashSet<String>,
    /// The receive time of the last heartbeat fed to the health gates, per device heard
    /// within [`HEARTBEAT_LOOKBACK`] of the newest (`heard_until`).
    heard: HashMap<String, i64>,
    heard_until: i64,
    /// The lease epoch the planners were restored under, while this server leads.
    led_under: Option<i64>,
}

/// Starts the rollout task; returns where to send it events.
pub fn spawn(store: Store, ota: Arc<OtaService>, leadership: Leadership) -> mpsc::Sender<Event> {
    let (tx, rx) = mpsc::channel(4096);
    let manager = Manager {
        store,
        ota,
        leadership,
        clock: Clock::new(),
        active: HashMap::new(),
        seen_online: HashSet::new(),
        heard: HashMap::new(),
        heard_until: flotilla_store::now_ms(),
        led_under: None,
    };
    tokio::spawn(manager.run(rx));
    tx
}

/// The decisions a drain turns into one save.
#[derive(Default)]
struct Decisions {
    offers: Vec<String>,
    transitions: Vec<State>,
}

impl Manager {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) if self.led_under.is_some() => self.handle(event).await,
                    Some(event) => self.handle_as_follower(event).await,
                    None => return,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    self.follow_the_lease().await;
                    if self.led_under.is_none() {
                        // A new leader judges on heartbeats from its tenure on.
                        self.heard_until = flotilla_store::now_ms();
                        continue;
                    }
                    let (now, offset) = (self.clock.now(), self.clock.wall_offset());
                    for a in self.active.values_mut() {
                        a.planner.set_wall_offset(offset);
                        if a.planner.poll_timeout().is_some_and(|t| t <= now) {
                            a.planner.handle_timeout(now);
                        }
                    }
                    if ticks.is_multiple_of(2) {
                        self.read_shared().await;
                        self.read_heartbeats().await;
                    }
                    if ticks.is_multiple_of(4) {
                        self.resync_online().await;
                    }
                }
            }
            if self.led_under.is_some() {
                self.drain_all().await;
            }
        }
    }

    /// Starts leading (restoring every open rollout) or stops (dropping the planners) as the
    /// lease comes and goes. A new epoch is a new tenure — another server may have led in
    /// between — so the planners are restored afresh from what was saved.
    async fn follow_the_lease(&mut self) {
        let epoch = self.leadership.epoch();
        if epoch == self.led_under {
            return;
        }
        if self.led_under.is_some() {
            tracing::info!(
                rollouts = self.active.len(),
                "no longer leading under this epoch: planners dropped"
            );
            self.stop_leading();
        }
        if let Some(epoch) = epoch {
            tracing::info!(epoch, "leading: restoring open rollouts");
            self.led_under = Some(epoch);
            self.load_open().await;
        }
    }

    fn stop_leading(&mut self) {
        self.led_under = None;
        self.active.clear();
    }

    async fn handle(&mut self, event: Event) {
        let now = self.clock.now();
        match event {
            Event::Start(id) => {
                if let Ok(Some(row)) = self.store.rollout(&id).await {
                    self.load(&row).await;
                }
            }
            Event::DeviceOnline(device) => {
                for a in self.active.values_mut() {
                    a.planner.handle_online(now, &device);
                }
            }
            Event::Finished(f) => {
                match (
                    f.rollout_id.as_ref().and_then(|id| self.active.get_mut(id)),
                    outcome_of(f.state),
                ) {
                    (Some(a), Some(outcome)) => {
                        a.planner.handle_outcome(now, f.device_id.as_str(), outcome)
                    }
                    (None, Some(_)) => self.record_late_outcome(&f).await,
                    _ => {}
                }
            }
            Event::Control {
                id,
                op,
                actor,
                reply,
            } => {
                let result = self.control(&id, op, &actor, None).await;
                let _ = reply.send(result.map(Applied::Done));
            }
            Event::ReleaseBlocked(version) => self.release_blocked(&version),
        }
    }

    /// Another server leads: what must reach it goes through the database.
    async fn handle_as_follower(&mut self, event: Event) {
        match event {
            Event::Control {
                id,
                op,
                actor,
                reply,
            } => {
                let result = match self
                    .store
                    .request_rollout_control(&id, op.as_str(), &actor)
                    .await
                {
                    Ok(true) => Ok(Applied::Requested),
                    Ok(false) => Err("no such rollout".to_string()),
                    Err(e) => Err(format!("the request was not saved: {e}")),
                };
                // Recorded here under who asked; the leader audits what became of it.
                self.store
                    .audit(AuditRecord {
                        actor: &actor,
                        action: control_action(op),
                        target: Some(&id),
                        result: if result.is_ok() {
                            "requested"
                        } else {
                            "refused"
                        },
                        detail: result.as_ref().err().cloned(),
                    })
                    .await;
                let _ = reply.send(result);
            }
            Event::ReleaseBlocked(version) => {
                // The leader aborts them when it next reads the release; ask at once as well.
                if let Ok(rows) = self.store.open_rollouts().await {
                    for row in rows.iter().filter(|r| r.version == version) {
                        if let Err(e) = self
                            .store
                            .request_rollout_control(&row.id, "abort", "system:release-blocked")
                            .await
                        {
                            tracing::warn!(error = %e, rollout = %row.id, "abort request not saved");
                        }
                    }
                }
            }
            Event::Finished(f) => self.record_late_outcome(&f).await,
            // The leader reads these from the database.
            Event::Start(_) | Event::DeviceOnline(_) => {}
        }
    }

    /// An update of a rollout no planner drives ended (a late offer, or one started before the
    /// rollout stopped): its target row says so; the store leaves open rollouts alone.
    async fn record_late_outcome(&self, f: &Finished) {
        let state = match f.state {
            UpdateState::Succeeded => TargetState::Succeeded,
            UpdateState::Failed | UpdateState::RolledBack => TargetState::Failed,
            _ => return,
        };
        if let Some(rollout) = &f.rollout_id
            && let Err(e) = self
                .store
                .record_late_outcome(rollout, f.device_id.as_str(), state)
                .await
        {
            tracing::warn!(error = %e, rollout, "recording a late outcome failed");
        }
    }

    fn release_blocked(&mut self, version: &str) {
        for a in self
            .active
            .values_mut()
            .filter(|a| a.release.version == version)
        {
            a.release.blocked = true;
            a.planner.abort();
        }
    }

    /// Applies an operator's control (here, or left on the row by another replica and
    /// `answering` it), saves the decision and audits it; the rollout's state after.
    async fn control(
        &mut self,
        id: &str,
        op: Control,
        actor: &str,
        answering: Option<&str>,
    ) -> Result<RolloutState, String> {
        let mut result = self.apply(id, op).await;
        if result.is_ok() && !self.drain(id, answering).await {
            result = Err("the decision was not saved (see the server log); try again".into());
            // Memory may be ahead of the database: restore from what was saved.
            self.active.remove(id);
        } else if result.is_err()
            && let Some(op) = answering
        {
            // Refused: the request is answered all the same.
            if let Err(e) = self.store.clear_rollout_control(id, op).await {
                tracing::warn!(error = %e, rollout = id, "clearing a refused request failed");
            }
        }
        let result = match result {
            Ok(()) => match self.store.rollout(id).await {
                Ok(Some(row)) => Ok(row.state),
                Ok(None) => Err("no such rollout".to_string()),
                Err(e) => Err(format!("reading the rollout back failed: {e}")),
            },
            Err(e) => Err(e),
        };
        self.store
            .audit(AuditRecord {
                actor,
                action: control_action(op),
                target: Some(id),
                result: if result.is_ok() { "success" } else { "refused" },
                detail: result.as_ref().err().cloned(),
            })
            .await;
        result
    }

    async fn apply(&mut self, id: &str, op: Control) -> Result<(), String> {
        if !self.active.contains_key(id) {
            // A rollout that stopped itself is not driven; an override or abort brings it back.
            let row = match self.store.rollout(id).await {
                Ok(Some(row)) => row,
                Ok(None) => return Err("no such rollout".into()),
                Err(e) => return Err(format!("loading the rollout failed: {e}")),
            };
            if !(row.state.is_open() || row.state == RolloutState::Stopped && op != Control::Pause)
            {
                return Err(format!("rollout is {}", row.state.as_str()));
            }
            self.load(&row).await;
        }
        let now = self.clock.now();
        let a = self
            .active
            .get_mut(id)
            .ok_or_else(|| "rollout could not be restored".to_string())?;
        let before = a.planner.state();
        match op {
            Control::Pause => a.planner.pause(),
            Control::Resume => a.planner.resume(now),
            Control::Abort => a.planner.abort(),
        }
        if a.planner.state() == before {
            return Err(format!(
                "cannot {} a {} rollout",
                op.as_str(),
                rollout_state(before).as_str()
            ));
        }
        Ok(())
    }

    async fn load_open(&mut self) {
        match self.store.open_rollouts().await {
            Ok(rows) => {
                for row in &rows {
                    if !self.active.contains_key(&row.id) {
                        self.load(row).await;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "loading rollouts failed"),
        }
    }

    /// Restores the planner of a stored rollout where its last saved decision left it.
    async fn load(&mut self, row: &RolloutRow) {
        if let Err(e) = self.try_load(row).await {
            tracing::error!(error = %e, rollout = %row.id, "rollout not restored");
        }
    }

    async fn try_load(&mut self, row: &RolloutRow) -> anyhow::Result<()> {
        let settings: Settings = serde_json::from_value(row.config.clone())?;
        let release = self
            .store
            .release(&row.version)
            .await?
            .ok_or_else(|| anyhow::anyhow!("release {} missing", row.version))?;
        let targets = self.store.rollout_targets(&row.id).await?;
        let config = settings.planner_config();
        let snapshot = restore::snapshot(row, &targets, &self.clock, config.wait_timeout_ms);
        // Offers saved but perhaps never sent (the last leader died between its commit and
        // its publish): sent again; a device ignores one it is already working on.
        let in_flight: Vec<flotilla_proto::DeviceId> = targets
            .iter()
            .filter(|t| t.state == TargetState::InFlight)
            .filter_map(|t| flotilla_proto::DeviceId::parse(&t.device_id).ok())
            .collect();
        let ids = targets.into_iter().map(|t| t.device_id).collect();
        let now = self.clock.now();
        let mut planner =
            Rollout::restore(config, ids, snapshot, now).map_err(|e| anyhow::anyhow!(e))?;
        planner.set_wall_offset(self.clock.wall_offset());
        for device in self.store.online_devices().await? {
            planner.handle_online(now, &device);
        }
        planner.handle_timeout(now);
        if release.blocked {
            planner.abort();
        }
        for device in &in_flight {
            self.ota.resend_offers(device).await;
        }
        self.active.insert(
            row.id.clone(),
            Active {
                planner,
                release,
                created_by: row.created_by,
                reason: None,
            },
        );
        Ok(())
    }

    /// What other replicas wrote: new rollouts, operators' requests, releases blocked, and
    /// outcomes of updates in flight.
    async fn read_shared(&mut self) {
        self.load_open().await;
        match self.store.rollout_controls().await {
            Ok(requests) => {
                for (id, op, actor) in requests {
                    match Control::parse(&op) {
                        Some(c) => {
                            let _ = self.control(&id, c, &actor, Some(&op)).await;
                        }
                        None => {
                            tracing::warn!(rollout = %id, op, actor, "unknown rollout control dropped");
                            let _ = self.store.clear_rollout_control(&id, &op).await;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading rollout controls failed"),
        }
        let now = self.clock.now();
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            let version = self.active[&id].release.version.clone();
            if let Ok(Some(r)) = self.store.release(&version).await
                && r.blocked
            {
                self.release_blocked(&version);
            }
            if self.active[&id].planner.counts().in_flight == 0 {
                continue;
            }
            match self.store.rollout_outcomes_in_flight(&id).await {
                Ok(ended) => {
                    let Some(a) = self.active.get_mut(&id) else {
                        continue;
                    };
                    for (position, state) in ended {
                        let device = usize::try_from(position)
                            .ok()
                            .and_then(|p| a.planner.targets().get(p).cloned());
                        match (device, outcome_of(state)) {
                            (Some(device), Some(outcome)) => {
                                a.planner.handle_outcome(now, &device, outcome)
                            }
                            // Replaced by another offer (an operator's): not a failure; the
                            // target waits, or is skipped past its deadline.
                            (Some(device), None) if state == UpdateState::Cancelled => {
                                a.planner.handle_offer_refused(now, &device)
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, rollout = %id, "reading outcomes failed"),
            }
        }
    }

    /// Feeds the health gates every heartbeat stored since the last look, whichever replica
    /// ingested it (the database holds each device's newest). The look reaches back
    /// [`HEARTBEAT_LOOKBACK`] before the newest heartbeat seen, for those committed late
    /// (another replica's batch), and each is fed once. Never further back than that from
    /// now (a first rollout after a quiet week judges on no week-old heartbeat), and a
    /// stamp from a replica whose clock runs ahead moves the look no further than now.
    async fn read_heartbeats(&mut self) {
        let wall = flotilla_store::now_ms();
        let lookback = HEARTBEAT_LOOKBACK.as_millis() as i64;
        if self.active.is_empty() {
            self.heard_until = wall;
            self.heard.clear();
            return;
        }
        let since = (self.heard_until - lookback).max(wall - lookback);
        let Ok(rows) = self.store.heartbeats_since(since).await else {
            return;
        };
        let now = self.clock.now();
        for row in rows {
            self.heard_until = self.heard_until.max(row.received_at.min(wall));
            let fed = self.heard.entry(row.device_id.clone()).or_insert(i64::MIN);
            if row.received_at <= *fed {
                continue;
            }
            *fed = row.received_at;
            let sample = flotilla_rollout::Sample {
                crashes: row.crashes,
                uptime_s: row.uptime_s,
            };
            for a in self.active.values_mut() {
                a.planner.handle_heartbeat(now, &row.device_id, sample);
            }
        }
        let oldest = self.heard_until - HEARTBEAT_LOOKBACK.as_millis() as i64;
        self.heard.retain(|_, at| *at > oldest);
    }

    /// Presence changes arrive as events; a periodic look at who is online also catches
    /// offline transitions and what other replicas saw.
    async fn resync_online(&mut self) {
        if self.active.is_empty() {
            return;
        }
        let Ok(online) = self.store.online_devices().await else {
            return;
        };
        let online: HashSet<String> = online.into_iter().collect();
        let now = self.clock.now();
        for a in self.active.values_mut() {
            for target in a.planner.targets().to_vec() {
                if !online.contains(&target) {
                    a.planner.handle_offline(now, &target);
                } else if !self.seen_online.contains(&target) {
                    a.planner.handle_online(now, &target);
                }
            }
        }
        self.seen_online = online;
    }

    async fn drain_all(&mut self) {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            self.drain(&id, None).await;
        }
    }

    /// Saves what a planner decided since the last drain (with the audit of its transitions),
    /// then carries it out: offers are published only once the save committed. Whether the decision
    /// is saved (true also when there was nothing to save).
    async fn drain(&mut self, id: &str, answering: Option<&str>) -> bool {
        let Some(epoch) = self.led_under else {
            return false;
        };
        let Some(a) = self.active.get_mut(id) else {
            return false;
        };
        let now = self.clock.now();
        let mut decided = Decisions::default();
        while let Some(action) = a.planner.poll_action() {
            match action {
                Action::Notify(device) => decided.offers.push(device),
                Action::Transition(state) => decided.transitions.push(state),
            }
        }
        let state = a.planner.state();
        if !matches!(state, State::Running { .. }) {
            // Decided before the rollout halted, paused or ended in the same batch of
            // events: not sent, the targets wait again.
            for device in decided.offers.drain(..) {
                a.planner.handle_offer_withdrawn(&device);
            }
        }
        let changes = a.planner.take_changes();
        if changes.is_empty()
            && decided.offers.is_empty()
            && decided.transitions.is_empty()
            && answering.is_none()
        {
            return true;
        }
        let ended = matches!(
            state,
            State::Completed | State::Stopped { .. } | State::Aborted
        );
        if let Some(&last) = decided.transitions.last() {
            a.reason = Some(describe(last, a, now));
        }
        let described: Vec<(State, String)> = decided
            .transitions
            .iter()
            .map(|&t| (t, describe(t, a, now)))
            .collect();
        // Devices skipped to the end get the release when they come back (the offer is
        // re-sent when their next session starts).
        let mut late: Vec<String> = Vec::new();
        if state == State::Completed && !a.release.blocked {
            late = a
                .planner
                .targets()
                .iter()
                .filter(|t| a.planner.device(t) == Some(DeviceState::Skipped))
                .cloned()
                .collect();
        }
        let offer_ids: Vec<(flotilla_proto::DeviceId, String)> = decided
            .offers
            .iter()
            .chain(late.iter())
            .filter_map(|d| flotilla_proto::DeviceId::parse(d).ok())
            .map(|d| {
                (
                    d,
                    format!("ota-{}", hex::encode(rand::random::<[u8; 12]>())),
                )
            })
            .collect();
        let actor = self.leadership.actor("rollouts", epoch);
        let cancel = matches!(state, State::Stopped { .. } | State::Aborted)
            .then(|| format!("rollout {}", rollout_state(state).as_str()));
        let save = RolloutSave {
            id,
            state: rollout_state(state),
            phase: phase_of(state),
            halt: a.planner.halt().map(stored_halt),
            reason: a.reason.as_deref(),
            wait_until: (a.planner.wait_until() < u64::MAX)
                .then(|| self.clock.wall_of(a.planner.wait_until())),
            forgiven_failed: a.planner.forgiven().failed as i64,
            forgiven_succeeded: a.planner.forgiven().succeeded as i64,
            overrides: a.planner.forgiven().overrides as i64,
            targets: changes
                .iter()
                .map(|&(i, d)| {
                    let (s, since) = stored_target(d, &self.clock);
                    (i as i64, s, since)
                })
                .collect(),
            offers: offer_ids
                .iter()
                .map(|(device_id, offer)| NewOffer {
                    id: offer,
                    device_id,
                    version: &a.release.version,
                    force: false,
                    rollout_id: Some(id),
                    created_by: a.created_by,
                    // A device working on an operator's update is not interrupted: the
                    // target waits until it is seen online again.
                    supersede_started: false,
                })
                .collect(),
            answered_control: answering,
            cancel_unstarted: cancel.as_deref(),
            audit: described
                .iter()
                .map(|(t, words)| AuditRecord {
                    actor: &actor,
                    action: "rollout.transition",
                    target: Some(id),
                    result: rollout_state(*t).as_str(),
                    detail: Some(words.clone()),
                })
                .collect(),
        };
        let saved = save_fenced(&self.store, &self.leadership, epoch, &save).await;
        let release = a.release.clone();
        match saved {
            Ok(Some(offers)) => {
                self.ota.withdraw(&offers.withdrawn);
                for offer in &offers.made {
                    self.ota.publish(offer, &release).await;
                }
                if let Some(a) = self.active.get_mut(id) {
                    let now = self.clock.now();
                    for device in &offers.busy {
                        a.planner.handle_offer_refused(now, device.as_str());
                    }
                }
                for (t, words) in &described {
                    let state = rollout_state(*t).as_str();
                    tracing::info!(rollout = id, state, reason = %words, "rollout transition");
                }
                if ended {
                    self.active.remove(id);
                }
                true
            }
            Ok(None) => {
                tracing::warn!(rollout = id, "lost the lease: decision not saved");
                self.stop_leading();
                false
            }
            Err(e) => {
                // Memory is ahead of the database now: restore from what was saved.
                tracing::error!(error = %e, rollout = id, "saving a rollout decision failed; restoring it");
                self.active.remove(id);
                false
            }
        }
    }
}

/// Saves under the lease: `None` if this server no longer holds it.
async fn save_fenced(
    store: &Store,
    leadership: &Leadership,
    epoch: i64,
    save: &RolloutSave<'_>,
) -> StoreResult<Option<SavedOffers>> {
    match leadership.sweep_under(store, epoch).await? {
        None => Ok(None),
        Some(Sweep::Alone(store)) => store.save_rollout(save).await.map(Some),
        Some(Sweep::Fenced(mut tx)) => {
            let offers = tx.save_rollout(save).await?;
            tx.commit().await?;
            Ok(Some(offers))
        }
    }
}

/// A transition in words, for the audit log and the rollout's progress.
fn describe(state: State, a: &Active, now: u64) -> String {
    let c = a.planner.counts();
    match state {
        State::Stopped { phase } | State::Paused { phase } if a.planner.halt().is_some() => {
            let health = |metric: Metric| {
                let f = a.planner.health(now);
                let (what, new, old) = match metric {
                    Metric::Crashes => ("crash", f.new.crashes, f.old.crashes),
                    Metric::Reboots => ("reboot", f.new.reboots, f.old.reboots),
                    Metric::Heartbeats => ("heartbeat", f.new.heartbeats, f.old.heartbeats),
                };
                format!(
                    "devices on {} {what} {:.2} times per device-hour, devices on the old version {:.2}",
                    a.release.version, new, old
                )
            };
            let why = match a.planner.halt() {
                Some(Halt::PhaseBelowSuccessThreshold) => "too few successes".to_string(),
                Some(Halt::NoDeviceReached) => {
                    "every device was skipped, none succeeded yet".to_string()
                }
                Some(Halt::Unhealthy(metric)) => health(metric),
                _ => "too many failures".to_string(),
            };
            let verb = if matches!(state, State::Stopped { .. }) {
                "stopped"
            } else {
                "paused"
            };
            format!(
                "{verb} itself in phase {}: {why} ({} failed, {} timed out, {} succeeded, {} skipped)",
                phase + 1,
                c.failed,
                c.timed_out,
                c.succeeded,
                c.skipped
            )
        }
        State::Aborted if a.release.blocked => "aborted: release blocked".to_string(),
        State::Running { phase } => format!("phase {} running", phase + 1),
        State::Completed if c.skipped > 0 => format!(
            "completed: {} succeeded, {} failed, {} timed out, {} skipped (offered when they return)",
            c.succeeded, c.failed, c.timed_out, c.skipped
        ),
        _ => rollout_state(state).as_str().to_string(),
    }
}

fn control_action(op: Control) -> &'static str {
    match op {
        Control::Pause => "rollout.pause",
        Control::Resume => "rollout.resume",
        Control::Abort => "rollout.abort",
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
