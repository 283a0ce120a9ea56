//! The device state machine.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use flotilla_proto::{
    Channel, Command, CommandReply, CommandStatus, DesiredConfig, DeviceId, Heartbeat, LedState,
    SensorKind, SessionOrder, Status, Telemetry, Topic, decode, encode,
};

use crate::backoff::{Backoff, BackoffConfig};
use crate::outbox::{Outbox, Then, Token};
use crate::provisioning::{ProvisionError, ProvisionRequest, Provisioning};
use crate::rng::Rng;

mod executor;
mod ota_flow;
mod reporter;
use executor::{Effect, Executor};
use flotilla_proto::{FirmwareManifest, OtaOffer, OtaStatus};
use ota_flow::OtaFlow;
pub use ota_flow::{Awaiting, BootedImage};
use p256::ecdsa::VerifyingKey;
use reporter::Reporter;

/// Milliseconds on a monotonic clock chosen by the shell.
pub type Millis = u64;

/// The provisioning and connection states of seed 004, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Init,
    CheckProvisioning,
    ApMode,
    WifiConnecting,
    WifiConnected,
    CheckCertificates,
    SubmitCsr,
    MqttConnecting,
    MqttConnected,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Init => "INIT",
            State::CheckProvisioning => "CHECK_PROVISIONING",
            State::ApMode => "AP_MODE",
            State::WifiConnecting => "WIFI_CONNECTING",
            State::WifiConnected => "WIFI_CONNECTED",
            State::CheckCertificates => "CHECK_CERTIFICATES",
            State::SubmitCsr => "SUBMIT_CSR",
            State::MqttConnecting => "MQTT_CONNECTING",
            State::MqttConnected => "MQTT_CONNECTED",
        }
    }
}

/// Tunables, fixed at construction.
#[derive(Debug, Clone)]
pub struct Config {
    pub firmware_version: String,
    pub heartbeat_ms: Millis,
    pub telemetry_ms: Millis,
    pub backoff: BackoffConfig,
    pub command_queue: usize,
    /// How many telemetry sequence numbers to reserve per NVS write.
    pub seq_reservation: u64,
    /// Hardware/product this build runs on; release manifests must name it.
    pub hardware: String,
    /// Anti-rollback counter of the running image.
    pub security_counter: u32,
    /// Release public keys baked into the firmware (several during a key rotation).
    pub trusted_keys: Vec<VerifyingKey>,
    /// Size of an image slot: larger images are refused before download.
    pub slot_size: u64,
    /// How long a new image must stay connected before it is confirmed.
    pub ota_confirm_ms: Millis,
    /// A new image not confirmed this long after boot reboots (and counts as unstable).
    pub ota_verify_deadline_ms: Millis,
    /// How many messages that must arrive are kept until acknowledged.
    pub outbox_capacity: usize,
    /// How long a reboot command waits for its reply to be acknowledged before it restarts
    /// anyway (its id is persisted, so it never runs twice).
    pub reboot_wait_ms: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            firmware_version: "0.1.0".to_string(),
            heartbeat_ms: 30_000,
            telemetry_ms: 10_000,
            backoff: BackoffConfig::default(),
            command_queue: 8,
            seq_reservation: 1000,
            hardware: "esp32c3".to_string(),
            security_counter: 0,
            trusted_keys: Vec::new(),
            slot_size: 1_920 * 1024,
            ota_confirm_ms: 30_000,
            ota_verify_deadline_ms: 300_000,
            outbox_capacity: 16,
            reboot_wait_ms: 30_000,
        }
    }
}

/// What the shell read from non-volatile storage at boot.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub provisioning: Option<Provisioning>,
    pub has_certificate: bool,
    /// Boots since the last one that reached a stable connection.
    pub unstable_boots: u32,
    /// Telemetry sequence numbers below this were possibly used before the reboot.
    pub seq_high_water: u64,
    pub led: Option<LedState>,
    pub brightness: Option<u8>,
    /// An accepted offer whose download had not finished.
    pub ota_job: Option<OtaOffer>,
    /// An installed update whose outcome is not reported yet.
    pub ota_awaiting: Option<Awaiting>,
    /// What the bootloader made of the running image.
    pub booted: BootedImage,
    /// The outcome of an update that ended (FAILED, ROLLED_BACK), not yet acknowledged by
    /// the broker.
    pub ota_outcome: Option<OtaStatus>,
    /// The final replies of the last [`COMMANDS_DONE_KEPT`] commands that must not run twice
    /// (a reboot), so a redelivery after the restart is answered, not run.
    pub commands_done: Vec<CommandReply>,
}

impl Stored {
    /// What the chip keeps after the shell performed `p`: the meaning of each [`Persist`],
    /// for a shell that stores the record whole (the agent) and for tests that model NVS.
    pub fn apply(&mut self, p: &Persist) {
        match p {
            Persist::Provisioning(prov) => self.provisioning = Some(prov.clone()),
            Persist::ClearProvisioning => {
                self.provisioning = None;
                self.has_certificate = false;
            }
            Persist::UnstableBoots(n) => self.unstable_boots = *n,
            Persist::SeqHighWater(n) => self.seq_high_water = *n,
            Persist::Led { state, brightness } => {
                self.led = Some(*state);
                self.brightness = Some(*brightness);
            }
            Persist::OtaJob(job) => self.ota_job = job.clone(),
            Persist::OtaInstalled(awaiting) => {
                self.ota_job = None;
                self.ota_awaiting = Some(awaiting.clone());
            }
            Persist::OtaOutcome(outcome) => {
                self.ota_job = None;
                self.ota_awaiting
                    .take_if(|a| outcome.id.as_ref() == Some(&a.id));
                self.ota_outcome = Some(outcome.clone());
            }
            Persist::OtaReported { id } => {
                self.ota_awaiting.take_if(|a| a.id == *id);
                self.ota_outcome.take_if(|o| o.id.as_ref() == Some(id));
            }
            Persist::CommandsDone(done) => self.commands_done = done.clone(),
        }
    }
}

/// How many executed commands that must not run twice are remembered across reboots.
pub const COMMANDS_DONE_KEPT: usize = 8;

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Set on a message that must arrive: publish it at QoS 1 and report its PUBACK with
    /// [`Device::handle_published`] (or [`Device::handle_publish_refused`] for an error
    /// reason). `None`: QoS 1 without a report; lost with the connection.
    pub token: Option<Token>,
}

/// A value to write to non-volatile storage.
// Not `Eq`: a command reply's result is JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    Provisioning(Provisioning),
    /// Forget the provisioning data and certificate: the token was refused.
    ClearProvisioning,
    UnstableBoots(u32),
    SeqHighWater(u64),
    Led {
        state: LedState,
        brightness: u8,
    },
    /// The offer being downloaded (`None` once it finished or failed).
    OtaJob(Option<OtaOffer>),
    /// The image is written and verified: forget the job, remember what to report after the
    /// reboot. One write, so a power cut leaves one or the other.
    OtaInstalled(Awaiting),
    /// An update ended (FAILED without installing, or ROLLED_BACK): forget its job, and its
    /// [`Awaiting`] if it has this outcome's id, and keep this outcome until it was delivered.
    /// One write.
    OtaOutcome(OtaStatus),
    /// The broker acknowledged the outcome of update `id`: forget the [`Awaiting`] and the
    /// [`Persist::OtaOutcome`] of that id (not those of another update).
    OtaReported {
        id: String,
    },
    /// The final replies of the commands that must not run twice, newest last, at most
    /// [`COMMANDS_DONE_KEPT`]: replaces what was stored.
    CommandsDone(Vec<CommandReply>),
}

/// Platform effects the shell performs, in the order they are polled.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    StartAccessPoint,
    ConnectWifi {
        ssid: String,
        password: String,
    },
    /// Make (or reuse) the device key, send a CSR to `/sign-csr` with the token, store the
    /// certificate and CA, then report with [`Device::handle_csr_result`].
    SubmitCsr {
        device_id: DeviceId,
        token: String,
    },
    /// Connect with the stored certificate; `client_id` must equal its CN.
    ConnectMqtt {
        client_id: DeviceId,
        will: Publish,
    },
    Subscribe(String),
    Publish(Publish),
    SetLed {
        state: LedState,
        brightness: u8,
    },
    Persist(Persist),
    /// Stream the image at `offer.url` (client certificate, HTTP Range) into the inactive slot,
    /// checking it against `manifest`; report with [`Device::handle_ota_progress`] and
    /// [`Device::handle_ota_finished`]. `resume` continues from the persisted offset.
    Download {
        offer: OtaOffer,
        manifest: FirmwareManifest,
        resume: bool,
    },
    /// Stop the download [`Action::Download`] started and forget its result: the server
    /// withdrew the update. What was written stays in the inactive slot, never activated.
    CancelDownload,
    /// Mark the freshly written inactive slot to boot next (otadata NEW).
    ActivateImage,
    /// The running image passed its health check: mark it VALID.
    ConfirmImage,
    Reboot,
}

/// Why the CSR step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrFailure {
    /// The server refused the token (used, expired, unknown): provisioning must start over.
    Refused,
    /// Network or server trouble: retry later.
    Transient,
}

impl CsrFailure {
    /// What a `/sign-csr` answer's HTTP status means for provisioning; `None` on success.
    /// Only the token's own refusals start provisioning over: 401 (token unknown, used or
    /// expired), 403 (bound to another device id) and 409 (the id belongs to another account).
    /// Anything else (429 rate limited, 413, 400, 5xx) is retried later, so a busy or
    /// misconfigured server never wipes a device's Wi-Fi and token.
    pub fn from_status(status: u16) -> Option<CsrFailure> {
        match status {
            200..=299 => None,
            401 | 403 | 409 => Some(CsrFailure::Refused),
            _ => Some(CsrFailure::Transient),
        }
    }
}

/// Latest sensor values, written by the shell's drivers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SensorValues {
    pub pot: Option<u16>,
    pub switch: Option<bool>,
    pub temp: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timers {
    retry: Option<Millis>,
    stable: Option<Millis>,
    ota_confirm: Option<Millis>,
    ota_deadline: Option<Millis>,
}

/// The sans-IO device brain.
///
/// # Driving it
/// Feed inputs with the `handle_*` methods, then drain [`Device::poll_action`] until it
/// returns `None`, perform each action in order, and call [`Device::handle_timeout`] no
/// later than [`Device::poll_timeout`]. A [`Publish`] with a token is answered with
/// [`Device::handle_published`] when its PUBACK arrives. The core reads no clock and draws no randomness of
/// its own: `now` comes with every input and the jitter RNG is seeded at construction.
#[derive(Debug)]
pub struct Device {
    config: Config,
    state: State,
    rng: Rng,
    provisioning: Option<Provisioning>,
    has_certificate: bool,
    unstable_boots: u32,
    /// The order keys of the broker session now open or being opened.
    order: SessionOrder,
    reporter: Reporter,
    executor: Executor,
    backoff: Backoff,
    connected_at: Option<Millis>,
    timers: Timers,
    outbox: Outbox,
    ota: OtaFlow,
    actions: VecDeque<Action>,
    transitions: VecDeque<State>,
}

/// A status that says the device is offline and why, and nothing of its own state.
fn offline_status(reason: &str, ord: u64) -> Status {
    Status {
        online: false,
        led: None,
        brightness: None,
        fw: None,
        hw: None,
        reason: Some(reason.to_string()),
        config: None,
        ord: Some(ord),
    }
}

impl Device {
    pub fn new(config: Config, rng_seed: u64) -> Self {
        Device {
            backoff: Backoff::new(config.backoff),
            outbox: Outbox::new(config.outbox_capacity),
            reporter: Reporter::new(&config),
            executor: Executor::new(&config),
            config,
            state: State::Init,
            rng: Rng::new(rng_seed),
            provisioning: None,
            has_certificate: false,
            unstable_boots: 0,
            order: SessionOrder::default(),
            connected_at: None,
            timers: Timers {
                retry: None,
                stable: None,
                ota_confirm: None,
                ota_deadline: None,
            },
            ota: OtaFlow::default(),
            actions: VecDeque::new(),
            transitions: VecDeque::new(),
        }
    }

    // ----- queries -----

    pub fn state(&self) -> State {
        self.state
    }

    pub fn device_id(&self) -> Option<&DeviceId> {
        self.provisioning.as_ref().map(|p| &p.device_id)
    }

    pub fn led(&self) -> (LedState, u8) {
        self.executor.led()
    }

    pub fn is_enabled(&self, sensor: SensorKind) -> bool {
        self.reporter.is_enabled(sensor)
    }

    /// Boots that did not reach a stable connection before this one.
    pub fn unstable_boots(&self) -> u32 {
        self.unstable_boots
    }

    pub fn queued_commands(&self) -> usize {
        self.executor.queued()
    }

    /// Messages that must arrive and were not acknowledged yet.
    pub fn unacknowledged(&self) -> usize {
        self.outbox.len()
    }

    /// The seed 004 `GET /status` word.
    pub fn status_word(&self) -> &'static str {
        match self.state {
            State::Init | State::CheckProvisioning | State::ApMode => "provisioning",
            State::MqttConnected => "connected",
            _ => "disconnected",
        }
    }

    // ----- inputs -----

    /// First input after power-on: what non-volatile storage holds.
    pub fn handle_boot(&mut self, now: Millis, stored: Stored) {
        self.reporter.boot(now, stored.seq_high_water);
        self.unstable_boots = stored.unstable_boots;
        self.persist(Persist::UnstableBoots(
            stored.unstable_boots.saturating_add(1),
        ));
        let mut effects = Vec::new();
        self.executor.boot(
            stored.led,
            stored.brightness,
            stored.commands_done,
            &mut effects,
        );
        let (state, brightness) = self.executor.led();
        self.actions.push_back(Action::SetLed { state, brightness });
        self.has_certificate = stored.has_certificate;
        self.provisioning = stored.provisioning;
        self.apply_effects(effects);
        self.ota_boot(now, stored.ota_job, stored.ota_awaiting, stored.booted);
        if let Some(outcome) = stored.ota_outcome {
            self.send_ota_outcome(outcome);
        }
        self.enter(State::CheckProvisioning);
        self.after_provisioning_check();
    }

    /// `POST /provision` on the SoftAP.
    pub fn handle_provision(
        &mut self,
        _now: Millis,
        request: ProvisionRequest,
        bearer_token: Option<String>,
    ) -> Result<(), ProvisionError> {
        if self.state != State::ApMode {
            return Err(ProvisionError::NotInApMode);
        }
        let provisioning = request.validate(bearer_token)?;
        self.persist(Persist::Provisioning(provisioning.clone()));
        self.has_certificate = false;
        self.provisioning = Some(provisioning);
        self.backoff.reset();
        self.connect_wifi();
        Ok(())
    }

    pub fn handle_wifi_connected(&mut self, _now: Millis) {
        if self.state != State::WifiConnecting {
            return;
        }
        self.enter(State::WifiConnected);
        self.backoff.reset();
        self.enter(State::CheckCertificates);
        if self.has_certificate {
            self.connect_mqtt();
        } else {
            self.submit_csr();
        }
    }

    /// The station failed to join, or lost, the network.
    pub fn handle_wifi_lost(&mut self, now: Millis) {
        if self.provisioning.is_none() || self.state == State::ApMode {
            return;
        }
        self.end_session();
        self.enter(State::WifiConnecting);
        self.schedule_retry(now);
    }

    pub fn handle_csr_result(&mut self, now: Millis, result: Result<(), CsrFailure>) {
        if self.state != State::SubmitCsr {
            return;
        }
        match result {
            Ok(()) => {
                self.has_certificate = true;
                self.backoff.reset();
                self.connect_mqtt();
            }
            Err(CsrFailure::Refused) => {
                self.provisioning = None;
                self.persist(Persist::ClearProvisioning);
                self.enter(State::ApMode);
                self.actions.push_back(Action::StartAccessPoint);
            }
            Err(CsrFailure::Transient) => self.schedule_retry(now),
        }
    }

    pub fn handle_mqtt_connected(&mut self, now: Millis) {
        if self.state != State::MqttConnecting {
            return;
        }
        let Some(id) = self.device_id().cloned() else {
            return;
        };
        self.enter(State::MqttConnected);
        self.connected_at = Some(now);
        for channel in [Channel::Command, Channel::Config, Channel::Ota] {
            self.actions.push_back(Action::Subscribe(
                Topic::new(&id, channel).as_str().to_string(),
            ));
        }
        self.publish_status(true);
        self.publish_heartbeat(now);
        self.reporter.start(now);
        self.timers.stable = Some(now + self.backoff.stable_ms());
        // What waited for a connection goes first, oldest first.
        self.flush_outbox(now);
        self.ota_connected(now);
    }

    /// The broker acknowledged the message `token` was given to (PUBACK, success).
    pub fn handle_published(&mut self, _now: Millis, token: Token) {
        match self.outbox.acknowledged(token) {
            Some(Then::OtaReported(id)) => self.persist(Persist::OtaReported { id }),
            Some(Then::Reboot) => {
                let mut effects = Vec::new();
                self.executor.reboot_acknowledged(&mut effects);
                self.apply_effects(effects);
            }
            Some(Then::Nothing) | None => {}
        }
    }

    /// The broker answered the message `token` was given to with an error reason (or the
    /// shell could not hand it over): it is sent again between [`crate::outbox::RETRY_MS`]
    /// and one and a half times that later, drawn at random.
    pub fn handle_publish_refused(&mut self, now: Millis, token: Token) {
        let retry = crate::outbox::RETRY_MS;
        let retry_at = now + retry + self.rng.below(retry / 2 + 1);
        self.outbox.refused(token, retry_at);
    }

    /// The broker connection dropped or was refused.
    pub fn handle_mqtt_disconnected(&mut self, now: Millis) {
        if !matches!(self.state, State::MqttConnected | State::MqttConnecting) {
            return;
        }
        if self
            .connected_at
            .is_some_and(|at| now.saturating_sub(at) >= self.backoff.stable_ms())
        {
            self.backoff.reset();
        }
        self.end_session();
        self.enter(State::MqttConnecting);
        self.schedule_retry(now);
    }

    /// A message arrived on a subscribed topic. Untrusted: malformed input is dropped.
    pub fn handle_message(&mut self, now: Millis, topic: &str, payload: &[u8]) {
        let Some(own) = self.device_id() else { return };
        let Ok((id, channel)) = Topic::parse(topic) else {
            return;
        };
        if &id != own {
            return;
        }
        match channel {
            Channel::Command => match decode::<Command>(payload) {
                Ok(command) => self.offer_command(now, command),
                Err(_) => {
                    // A command we cannot parse may still carry an id worth answering.
                    if let Some(id) = command_id_of(payload) {
                        let mut effects = Vec::new();
                        self.executor.malformed(id, &mut effects);
                        self.apply_effects(effects);
                    }
                }
            },
            Channel::Config => {
                if let Ok(config) = decode::<DesiredConfig>(payload) {
                    self.apply_config(now, &config);
                }
            }
            Channel::Ota => {
                if let Ok(offer) = decode::<OtaOffer>(payload) {
                    self.ota_offer(now, offer);
                } else if let Ok(cancel) = decode::<flotilla_proto::OtaCancel>(payload) {
                    self.ota_cancel(&cancel.cancel);
                }
            }
            _ => {}
        }
    }

    pub fn handle_sensor_values(&mut self, values: SensorValues) {
        self.reporter.handle_sensor_values(values);
    }

    pub fn handle_platform_stats(&mut self, heap: u32, rssi: Option<i16>) {
        self.reporter.handle_platform_stats(heap, rssi);
    }

    /// The shell learned the wall-clock time (SNTP on the chip, the system clock on Linux).
    pub fn handle_wall_clock(&mut self, now: Millis, unix_ms: u64) {
        self.reporter.handle_wall_clock(now, unix_ms);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        if take_due(&mut self.timers.retry, now) {
            match self.state {
                State::WifiConnecting => self.connect_wifi(),
                State::SubmitCsr => self.submit_csr(),
                State::MqttConnecting => self.connect_mqtt(),
                _ => {}
            }
        }
        if take_due(&mut self.timers.stable, now) {
            self.unstable_boots = 0;
            self.persist(Persist::UnstableBoots(0));
        }
        let due = self.reporter.due(now);
        if due.heartbeat {
            self.publish_heartbeat(now);
        }
        if due.telemetry {
            self.publish_telemetry(now);
        }
        let mut effects = Vec::new();
        self.executor
            .execute_due(now, self.unix_s(now), &mut effects);
        self.apply_effects(effects);
        if take_due(&mut self.timers.ota_confirm, now) {
            self.ota_confirm();
        }
        if take_due(&mut self.timers.ota_deadline, now) {
            self.ota_deadline_passed();
        }
        let mut effects = Vec::new();
        self.executor.reboot_due(now, &mut effects);
        self.apply_effects(effects);
        self.flush_outbox(now);
    }

    // ----- outputs -----

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// State changes since the last call, oldest first (for logs and the SoftAP status page).
    pub fn poll_transition(&mut self) -> Option<State> {
        self.transitions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        let t = self.timers;
        [
            t.retry,
            self.reporter.next_timeout(),
            t.stable,
            self.executor.next_timeout(),
            t.ota_confirm,
            t.ota_deadline,
            self.outbox.next_retry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- internals -----

    fn enter(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.transitions.push_back(state);
        }
    }

    fn persist(&mut self, p: Persist) {
        self.actions.push_back(Action::Persist(p));
    }

    fn after_provisioning_check(&mut self) {
        if self.provisioning.is_some() {
            self.connect_wifi();
        } else {
            self.enter(State::ApMode);
            self.actions.push_back(Action::StartAccessPoint);
        }
    }

    fn connect_wifi(&mut self) {
        let Some(p) = &self.provisioning else { return };
        let action = Action::ConnectWifi {
            ssid: p.ssid.clone(),
            password: p.password.clone(),
        };
        self.enter(State::WifiConnecting);
        self.actions.push_back(action);
    }

    fn submit_csr(&mut self) {
        let Some(p) = &self.provisioning else { return };
        let action = Action::SubmitCsr {
            device_id: p.device_id.clone(),
            token: p.provisioning_token.clone(),
        };
        self.enter(State::SubmitCsr);
        self.actions.push_back(action);
    }

    fn connect_mqtt(&mut self) {
        let Some(id) = self.device_id().cloned() else {
            return;
        };
        // Each connection is a new session, numbered above every earlier one.
        self.order = SessionOrder::new(self.take_seq());
        let will = Publish {
            topic: Topic::new(&id, Channel::Status).as_str().to_string(),
            payload: encode(&offline_status("connection lost", self.order.will_key())),
            retain: true,
            token: None,
        };
        self.enter(State::MqttConnecting);
        self.actions.push_back(Action::ConnectMqtt {
            client_id: id,
            will,
        });
    }

    fn schedule_retry(&mut self, now: Millis) {
        let delay = self.backoff.next_delay_ms(&mut self.rng);
        self.timers.retry = Some(now + delay);
    }

    /// The connection is gone: its timers stop and nothing is in flight any more.
    fn end_session(&mut self) {
        self.outbox.disconnected();
        self.connected_at = None;
        self.reporter.stop();
        self.timers.stable = None;
        // The health check wants an unbroken connection.
        self.timers.ota_confirm = None;
    }

    fn publish(&mut self, channel: Channel, payload: Vec<u8>, retain: bool) {
        let Some(id) = self.device_id() else { return };
        let topic = Topic::new(id, channel).as_str().to_string();
        self.actions.push_back(Action::Publish(Publish {
            topic,
            payload,
            retain,
            token: None,
        }));
    }

    /// Publishes a message that must arrive: kept in the outbox, sent now if connected and
    /// again after every reconnect until acknowledged; `then` follows its acknowledgement.
    fn publish_reliably(&mut self, channel: Channel, payload: Vec<u8>, then: Then) {
        let Some(id) = self.device_id() else { return };
        let publish = Publish {
            topic: Topic::new(id, channel).as_str().to_string(),
            payload,
            retain: false,
            token: None,
        };
        let connected = self.state == State::MqttConnected;
        if let Some(now) = self.outbox.push(publish, then, connected) {
            self.actions.push_back(Action::Publish(now));
        }
    }

    /// Hands the shell what the outbox holds for a live connection.
    fn flush_outbox(&mut self, now: Millis) {
        if self.state != State::MqttConnected {
            return;
        }
        let due: Vec<Publish> = self.outbox.due(now).collect();
        self.actions.extend(due.into_iter().map(Action::Publish));
    }

    fn publish_status(&mut self, online: bool) {
        let status = Status {
            online,
            led: Some(self.executor.led().0),
            brightness: Some(self.executor.led().1),
            fw: Some(self.config.firmware_version.clone()),
            hw: Some(self.config.hardware.clone()),
            reason: None,
            config: Some(self.applied_config()),
            ord: Some(self.order.next_key()),
        };
        self.publish(Channel::Status, encode(&status), true);
    }

    /// What the device runs with now, every field set: the reported half of the twin.
    pub fn applied_config(&self) -> DesiredConfig {
        self.reporter.applied()
    }

    fn publish_heartbeat(&mut self, now: Millis) {
        let hb = Heartbeat {
            heap: self.reporter.heap(),
            uptime: Some(self.reporter.uptime_s(now)),
            fw: self.config.firmware_version.clone(),
            rssi: self.reporter.rssi(),
            crashes: Some(self.unstable_boots),
            ord: Some(self.order.next_key()),
        };
        self.publish(Channel::Health, encode(&hb), false);
    }

    fn publish_telemetry(&mut self, now: Millis) {
        let Some(reading) = self.reporter.reading() else {
            return;
        };
        let t = Telemetry {
            seq: self.take_seq(),
            ts: self.unix_ms(now),
            pot: reading.pot,
            switch: reading.switch,
            temp: reading.temp,
            ord: Some(self.order.next_key()),
        };
        self.publish(Channel::Telemetry, encode(&t), false);
    }

    /// The next number of the device's sequence; a new block's reservation is persisted
    /// before the number is used.
    fn take_seq(&mut self) -> u64 {
        let numbered = self.reporter.take_seq();
        if let Some(until) = numbered.reserve_until {
            self.persist(Persist::SeqHighWater(until));
        }
        numbered.seq
    }

    /// The goodbye a device publishes (retained, on its status topic) before it closes its
    /// connection on purpose, so the server marks it offline at once instead of waiting for
    /// the will or a timeout; `None` before it has an identity.
    pub fn goodbye(&mut self, reason: &str) -> Option<Publish> {
        let id = self.device_id()?;
        Some(Publish {
            topic: Topic::new(id, Channel::Status).as_str().to_string(),
            payload: encode(&offline_status(reason, self.order.next_key())),
            retain: true,
            token: None,
        })
    }

    fn unix_ms(&self, now: Millis) -> Option<u64> {
        self.reporter.unix_ms(now)
    }

    /// Wall-clock seconds at `now`, once the shell has told the time.
    fn unix_s(&self, now: Millis) -> Option<u64> {
        self.unix_ms(now).map(|ms| ms / 1000)
    }

    fn offer_command(&mut self, now: Millis, command: Command) {
        let mut effects = Vec::new();
        self.executor
            .offer(now, self.unix_s(now), command, &mut effects);
        self.apply_effects(effects);
    }

    /// Carries out what the executor asked for, in its order.
    fn apply_effects(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                // An ACCEPTED reply may be lost (a final one follows); a final one must arrive.
                Effect::Reply { reply, .. } if reply.status == CommandStatus::Accepted => {
                    self.publish(Channel::Reply, encode(&reply), false);
                }
                Effect::Reply {
                    reply,
                    reboot_after,
                } => {
                    let then = if reboot_after {
                        Then::Reboot
                    } else {
                        Then::Nothing
                    };
                    self.publish_reliably(Channel::Reply, encode(&reply), then);
                }
                Effect::Persist(p) => self.persist(p),
                Effect::SetLed { state, brightness } => {
                    self.actions.push_back(Action::SetLed { state, brightness });
                    self.persist(Persist::Led { state, brightness });
                    self.publish_status(true);
                }
                Effect::SetSensor { sensor, enabled } => self.reporter.set_enabled(sensor, enabled),
                Effect::Reboot => self.actions.push_back(Action::Reboot),
            }
        }
    }

    fn apply_config(&mut self, now: Millis, config: &DesiredConfig) {
        self.reporter.apply(now, config);
        self.publish_status(true);
    }
}

fn take_due(timer: &mut Option<Millis>, now: Millis) -> bool {
    if timer.is_some_and(|t| t <= now) {
        *timer = None;
        true
    } else {
        false
    }
}

fn command_id_of(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    decode::<IdOnly>(payload)
        .ok()
        .map(|x| x.id)
        .filter(|id| id.len() <= 64)
}
