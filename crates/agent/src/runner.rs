//! The tokio shell around the device brain: one task owns the [`Device`], performs the actions
//! it asks for, and feeds back what happened. [`DeviceHandle`]s (the SoftAP server, the
//! simulator) talk to it through a channel.

use std::time::Duration;

use flotilla_device_core::otadata::Layout;
use flotilla_device_core::slots::OtaSlots;
use flotilla_device_core::{Action, Config, CsrFailure, Device, Publish, State, Stored, Token};
use flotilla_device_core::{ProvisionRequest, SensorValues};
use flotilla_proto::{FirmwareManifest, OtaOffer};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::delivery::{Acks, Delivery, Handed};
use crate::download::{self, Start};
use crate::flash::{self, FLASH_FILE};
use crate::image::{Behaviour, ImageHeader};
use crate::nvs::{CA_FILE, Nvs};
use crate::renew::RenewFailure;
use crate::sensors::SimulatedBoard;
use crate::{boot, csr, renew};
use flotilla_device_core::download::DownloadPolicy;
use flotilla_device_core::renewal::{Renewal, RenewalPolicy, RenewalRetry};

/// A simulated Wi-Fi network visible to the device.
#[derive(Debug, Clone, Serialize)]
pub struct Network {
    pub ssid: String,
    pub rssi: i16,
    pub channel: u8,
    pub secure: bool,
}

/// Everything about the device's surroundings that does not change while it runs.
#[derive(Debug, Clone)]
pub struct DeviceEnv {
    pub backend_url: String,
    pub broker_host: String,
    pub broker_port: u16,
    /// The CA baked into the firmware: trusted for /sign-csr and the broker.
    pub server_ca_pem: String,
    pub networks: Vec<Network>,
    pub config: Config,
    pub http: reqwest::Client,
    /// Size of each firmware slot in the flash file.
    pub slot_len: usize,
    /// The image this build was flashed with at the factory (slot 0 before any update).
    pub factory: ImageHeader,
    /// When the device certificate is renewed.
    pub renewal: RenewalPolicy,
}

/// How a run of the device ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Reboot,
    Shutdown,
}

/// Broker connections this process's devices lost while connected (any the device did not
/// close itself for a reboot or a shutdown: keep-alive timeouts, resets), for `sim`'s
/// progress report.
pub static LINKS_LOST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    pub status: &'static str,
    pub state: &'static str,
    pub ip: Option<String>,
    pub device_id: Option<String>,
}

enum Input {
    Provision {
        request: ProvisionRequest,
        bearer: Option<String>,
        reply: oneshot::Sender<Result<(), ProvisionRefusal>>,
    },
    Status {
        reply: oneshot::Sender<StatusSnapshot>,
    },
    Wifi {
        connected: bool,
    },
    Csr(Result<(), CsrFailure>),
    /// Bytes received by download number `.0`.
    OtaProgress(u64, u64),
    /// How download number `.0` ended; one cancelled since is ignored.
    OtaFinished(u64, Result<(), String>),
    Renewed(Result<(), RenewFailure>),
    /// What the server said of a renewed pair the device holds but did not connect with:
    /// valid (now current) or refused; `None` if it could not be asked.
    NextChecked(Option<bool>),
    Mqtt {
        generation: u64,
        event: MqttEvent,
    },
    Shutdown,
}

enum MqttEvent {
    Connected,
    Disconnected,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The broker's PUBACK for a publish that must arrive.
    Acknowledged(Delivery),
}

/// One broker connection: the client, and the tokens of what was handed to it.
struct Link {
    client: AsyncClient,
    handed: Handed,
}

impl Link {
    /// Hands a QoS 1 publish to the connection; `false` if the connection is gone.
    async fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        token: Option<Token>,
    ) -> bool {
        self.handed.push(token);
        let sent = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .is_ok();
        if !sent {
            self.handed.forget_last();
        }
        sent
    }
}

/// Why `/provision` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionRefusal {
    AlreadyProvisioned,
    Invalid(String),
    DeviceGone,
}

/// A cheap, cloneable way to talk to a running device; [`DeviceHandle::follow`] keeps it
/// talking to the device after a reboot (a new [`Runner`]).
#[derive(Debug, Clone)]
pub struct DeviceHandle {
    tx: std::sync::Arc<std::sync::Mutex<mpsc::Sender<Input>>>,
}

impl DeviceHandle {
    fn new(tx: mpsc::Sender<Input>) -> DeviceHandle {
        DeviceHandle {
            tx: std::sync::Arc::new(std::sync::Mutex::new(tx)),
        }
    }

    fn sender(&self) -> mpsc::Sender<Input> {
        // A panic while holding it leaves a sender still worth using.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The device rebooted into the runner `next` belongs to: this handle (and every clone
    /// of it) talks to that one from now on.
    pub fn follow(&self, next: &DeviceHandle) {
        let next = next.sender();
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = next;
    }

    pub async fn provision(
        &self,
        request: ProvisionRequest,
        bearer: Option<String>,
    ) -> Result<(), ProvisionRefusal> {
        let (reply, rx) = oneshot::channel();
        self.sender()
            .send(Input::Provision {
                request,
                bearer,
                reply,
            })
            .await
            .map_err(|_| ProvisionRefusal::DeviceGone)?;
        rx.await.map_err(|_| ProvisionRefusal::DeviceGone)?
    }

    pub async fn status(&self) -> Option<StatusSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.sender().send(Input::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    pub async fn shutdown(&self) {
        let _ = self.sender().send(Input::Shutdown).await;
    }
}

pub struct Runner {
    device: Device,
    env: DeviceEnv,
    nvs: Nvs,
    board: SimulatedBoard,
    epoch: Instant,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    mqtt: Option<Link>,
    generation: u64,
    rssi: Option<i16>,
    label: String,
    stored: Option<Stored>,
    layout: Layout,
    behaviour: Behaviour,
    download: Option<tokio::task::JoinHandle<()>>,
    /// A cancelled download, until it has stopped: the next one waits for it, so the two never
    /// write the slot at once.
    cancelled: Option<tokio::task::JoinHandle<()>>,
    /// Numbers downloads, so the progress and result of a cancelled one are told apart from
    /// the next one's.
    download_number: u64,
    renewal: RenewalState,
}

/// Where the certificate renewal stands, in the shell.
struct RenewalState {
    /// When to look at the certificate's age again; `None` until connected.
    check_at: Option<Instant>,
    /// A `/renew` request is out.
    in_flight: bool,
    retry: RenewalRetry,
    rng: flotilla_device_core::Rng,
    /// The next connection tries the renewed certificate, if there is one.
    try_next: bool,
    /// The current connection was made with the renewed certificate.
    connection_uses_next: bool,
    /// The current connection reached CONNACK.
    connected: bool,
}

/// Runs blocking storage work (fsync'd NVS writes, otadata, the bootloader's reads) on
/// tokio's blocking pool: thousands of simulated devices share one runtime, and a device
/// waiting for its disk must not hold up the others' keep-alives.
pub(crate) async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Runner {
    /// Powers the device on (the bootloader reads flash and NVS) off the async runtime.
    pub async fn power_on(
        env: DeviceEnv,
        nvs: Nvs,
        label: String,
    ) -> anyhow::Result<(Runner, DeviceHandle)> {
        off_runtime(move || Runner::new(env, nvs, label)).await
    }

    /// Powers the device on: the bootloader picks the image, whose header sets what runs.
    fn new(env: DeviceEnv, nvs: Nvs, label: String) -> anyhow::Result<(Runner, DeviceHandle)> {
        let (tx, rx) = mpsc::channel(64);
        let layout = flash::layout(env.slot_len);
        let booted = boot::power_on(&nvs, &layout, &env.factory)?;
        let header = booted.header;
        tracing::info!(device = %label, slot = booted.slot, version = %header.version, behaviour = ?header.behaviour, "booted");
        let config = Config {
            firmware_version: header.version.clone(),
            hardware: header.hardware.clone(),
            security_counter: header.security_counter,
            slot_size: layout.slot_len as u64,
            ..env.config.clone()
        };
        let device = Device::new(config, rand::random());
        let runner = Runner {
            device,
            env,
            nvs,
            board: SimulatedBoard::new(),
            epoch: Instant::now(),
            rx,
            tx: tx.clone(),
            mqtt: None,
            generation: 0,
            rssi: None,
            label,
            stored: Some(booted.stored),
            layout,
            behaviour: header.behaviour,
            download: None,
            cancelled: None,
            download_number: 0,
            renewal: RenewalState {
                check_at: None,
                in_flight: false,
                retry: RenewalRetry::default(),
                rng: flotilla_device_core::Rng::new(rand::random()),
                try_next: true,
                connection_uses_next: false,
                connected: false,
            },
        };
        Ok((runner, DeviceHandle::new(tx)))
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Boots the device and runs it until it reboots or is shut down.
    pub async fn run(mut self) -> Exit {
        let exit = self.run_until_exit().await;
        if let Some(task) = self.download.take() {
            task.abort();
        }
        exit
    }

    async fn run_until_exit(&mut self) -> Exit {
        let now = self.now();
        let stored = self.stored.take().unwrap_or_else(|| self.nvs.load());
        self.device.handle_boot(now, stored);
        self.device.handle_wall_clock(now, unix_ms().max(0) as u64);
        if self.behaviour == Behaviour::CrashAtBoot {
            // Let the boot's NVS writes (the crash counter) land, then "crash".
            let _ = self.perform_actions().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            tracing::error!(device = %self.label, "simulated crash at boot");
            return Exit::Reboot;
        }
        loop {
            if let Some(exit) = self.perform_actions().await {
                self.disconnect(None).await;
                return exit;
            }
            let deadline = self
                .device
                .poll_timeout()
                .map(|t| self.epoch + Duration::from_millis(t));
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(Input::Shutdown) | None => {
                        self.disconnect(Some("shutdown")).await;
                        return Exit::Shutdown;
                    }
                    Some(Input::Renewed(result)) => self.renewed(result).await,
                    Some(Input::NextChecked(valid)) => self.next_checked(valid).await,
                    Some(input) => self.handle(input),
                },
                _ = sleep_until(self.renewal.check_at) => self.check_renewal(),
                _ = sleep_until(deadline) => {
                    let values: SensorValues = self.board.sample();
                    self.device.handle_sensor_values(values);
                    self.device.handle_platform_stats(simulated_heap(), self.rssi);
                    let now = self.now();
                    self.device.handle_timeout(now);
                }
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Provision {
                request,
                bearer,
                reply,
            } => {
                let result =
                    self.device
                        .handle_provision(now, request, bearer)
                        .map_err(|e| match e {
                            flotilla_device_core::ProvisionError::NotInApMode => {
                                ProvisionRefusal::AlreadyProvisioned
                            }
                            other => ProvisionRefusal::Invalid(other.to_string()),
                        });
                let _ = reply.send(result);
            }
            Input::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Input::Wifi { connected: true } => self.device.handle_wifi_connected(now),
            Input::Wifi { connected: false } => self.device.handle_wifi_lost(now),
            Input::Csr(result) => self.device.handle_csr_result(now, result),
            Input::OtaProgress(number, received) => {
                if number == self.download_number {
                    self.device.handle_ota_progress(now, received)
                }
            }
            Input::OtaFinished(number, _) if number != self.download_number => {}
            Input::OtaFinished(_, result) => {
                self.download = None;
                if let Err(e) = &result {
                    tracing::warn!(device = %self.label, error = %e, "update failed");
                }
                self.device.handle_ota_finished(now, result)
            }
            Input::Mqtt { generation, event } if generation == self.generation => match event {
                MqttEvent::Connected => {
                    self.connected_with_credentials();
                    self.device.handle_mqtt_connected(now)
                }
                MqttEvent::Disconnected => {
                    if self.device.state() == State::MqttConnected {
                        LINKS_LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.mqtt = None;
                    self.connection_lost();
                    self.device.handle_mqtt_disconnected(now);
                }
                MqttEvent::Message { topic, payload } => {
                    self.device.handle_message(now, &topic, &payload)
                }
                MqttEvent::Acknowledged(Delivery::Delivered(token)) => {
                    self.device.handle_published(now, token)
                }
                MqttEvent::Acknowledged(Delivery::Refused(token)) => {
                    tracing::warn!(device = %self.label, token = token.get(), "the broker refused a report; retrying");
                    self.device.handle_publish_refused(now, token)
                }
            },
            Input::Mqtt { .. } => {} // from a connection we already dropped
            Input::Shutdown | Input::Renewed(_) | Input::NextChecked(_) => {}
        }
    }

    fn snapshot(&self) -> StatusSnapshot {
        let connected = matches!(
            self.device.state(),
            State::WifiConnected
                | State::CheckCertificates
                | State::SubmitCsr
                | State::MqttConnecting
                | State::MqttConnected
        );
        StatusSnapshot {
            status: self.device.status_word(),
            state: self.device.state().name(),
            ip: connected.then(|| "192.168.1.100".to_string()),
            device_id: self.device.device_id().map(|d| d.to_string()),
        }
    }

    async fn perform_actions(&mut self) -> Option<Exit> {
        while let Some(action) = self.device.poll_action() {
            match action {
                Action::StartAccessPoint => {
                    tracing::info!(device = %self.label, "AP mode: waiting for POST /provision")
                }
                Action::ConnectWifi { ssid, .. } => {
                    let network = self.env.networks.iter().find(|n| n.ssid == ssid);
                    self.rssi = network.map(|n| n.rssi);
                    // The first heartbeat goes out on connect, before any timer: give it real values.
                    self.device
                        .handle_platform_stats(simulated_heap(), self.rssi);
                    let known = network.is_some();
                    if !known {
                        tracing::warn!(device = %self.label, %ssid, "Wi-Fi network not found");
                    }
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = tx.send(Input::Wifi { connected: known }).await;
                    });
                }
                Action::SubmitCsr { device_id, token } => {
                    let (env, nvs, tx) = (self.env.clone(), self.nvs.clone(), self.tx.clone());
                    tokio::spawn(async move {
                        let result = csr::submit(&env, &nvs, device_id.as_str(), &token).await;
                        let _ = tx.send(Input::Csr(result)).await;
                    });
                }
                Action::ConnectMqtt { client_id, will } => {
                    self.connect(client_id.as_str(), will).await
                }
                Action::Subscribe(topic) => {
                    if let Some(link) = &self.mqtt {
                        let _ = link.client.subscribe(topic, QoS::AtLeastOnce).await;
                    }
                }
                Action::Publish(p) => {
                    let handed = match &self.mqtt {
                        Some(link) => link.publish(p.topic, p.retain, p.payload, p.token).await,
                        None => false,
                    };
                    if !handed && let Some(token) = p.token {
                        // Kept by the core: tried again later.
                        let now = self.now();
                        self.device.handle_publish_refused(now, token);
                    }
                }
                Action::SetLed { state, brightness } => {
                    tracing::debug!(device = %self.label, led = state.as_str(), brightness, "LED")
                }
                Action::Persist(p) => {
                    // Awaited: what follows (a reply, a reboot) may rely on it being stored.
                    let nvs = self.nvs.clone();
                    if let Err(e) = off_runtime(move || nvs.apply(&p)).await {
                        // What follows may rely on it (a sequence reservation, an executed
                        // command's id): restart from what NVS holds, as a power cut before
                        // the write would (tests/nvs_power_loss.rs), rather than go on.
                        tracing::error!(device = %self.label, error = %e, "NVS write failed; restarting");
                        return Some(Exit::Reboot);
                    }
                }
                Action::Download {
                    offer,
                    manifest,
                    resume,
                } => self.start_download(offer, manifest, resume),
                Action::CancelDownload => {
                    if let Some(download) = self.download.take() {
                        download.abort();
                        self.cancelled = Some(download);
                    }
                    self.download_number += 1;
                }
                Action::ActivateImage => {
                    let (path, layout) = (self.nvs.path(FLASH_FILE), self.layout);
                    let result = off_runtime(move || {
                        let mut ota = flash::open_slots(&path, &layout)?;
                        let slot = ota.next_slot();
                        ota.activate_next().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        ota.flash().sync()?;
                        anyhow::Ok(slot)
                    })
                    .await;
                    match result {
                        Ok(slot) => {
                            tracing::info!(device = %self.label, slot, "new image activated")
                        }
                        Err(e) => {
                            tracing::error!(device = %self.label, error = %e, "activation failed")
                        }
                    }
                }
                Action::ConfirmImage => {
                    let (path, layout) = (self.nvs.path(FLASH_FILE), self.layout);
                    let result = off_runtime(move || {
                        let mut ota = flash::open_slots(&path, &layout)?;
                        ota.confirm().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        anyhow::Ok(ota.flash().sync()?)
                    })
                    .await;
                    match result {
                        Ok(()) => tracing::info!(device = %self.label, "image confirmed"),
                        Err(e) => {
                            tracing::error!(device = %self.label, error = %e, "confirm failed")
                        }
                    }
                }
                Action::Reboot => return Some(Exit::Reboot),
            }
        }
        None
    }

    async fn connect(&mut self, client_id: &str, will: Publish) {
        self.disconnect(None).await;
        self.generation += 1;
        let next = match self.renewal.try_next {
            true => self.nvs.next_credentials(),
            false => None,
        };
        self.renewal.connection_uses_next = next.is_some();
        self.renewal.connected = false;
        let (Some(credentials), Some(ca)) = (
            next.or_else(|| self.nvs.credentials()),
            self.nvs.read_string(CA_FILE),
        ) else {
            tracing::error!(device = %self.label, "certificate files missing");
            let _ = self
                .tx
                .send(Input::Mqtt {
                    generation: self.generation,
                    event: MqttEvent::Disconnected,
                })
                .await;
            return;
        };
        // A build that "never connects" dials a port where nothing listens.
        let port = if self.behaviour == Behaviour::NeverConnects {
            1
        } else {
            self.env.broker_port
        };
        let mut options = MqttOptions::new(client_id, &self.env.broker_host, port);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_clean_start(true);
        options.set_connection_timeout(10);
        // Without TCP_NODELAY, Nagle and delayed ACKs stall small MQTT packets by ~40 ms.
        let mut net = options.network_options();
        net.set_tcp_nodelay(true);
        options.set_network_options(net);
        // rumqttc otherwise sizes its in-flight table for 65,535 publishes: ~10 MB per device,
        // which a simulated fleet of thousands cannot afford.
        options.set_outgoing_inflight_upper_limit(16);
        options.set_last_will(LastWill::new(
            will.topic,
            will.payload,
            QoS::AtLeastOnce,
            will.retain,
            None,
        ));
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: ca.into_bytes(),
            alpn: None,
            client_auth: Some((credentials.cert.into_bytes(), credentials.key.into_bytes())),
        }));
        let (client, eventloop) = AsyncClient::new(options, 64);
        let handed = Handed::default();
        let acks = Acks::new(handed.clone());
        self.mqtt = Some(Link { client, handed });
        tokio::spawn(pump(self.generation, eventloop, acks, self.tx.clone()));
    }

    /// Closes the broker connection; with a reason, first says goodbye on the status topic so
    /// the server marks the device offline at once instead of waiting for a timeout.
    async fn disconnect(&mut self, reason: Option<&str>) {
        let Some(link) = self.mqtt.take() else {
            return;
        };
        if let Some(goodbye) = reason.and_then(|r| self.device.goodbye(r)) {
            link.publish(goodbye.topic, goodbye.retain, goodbye.payload, None)
                .await;
            // Best effort: give the connection task a moment to write the goodbye before the
            // process exits; a lost goodbye only delays offline until the will or the timeout.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = link.client.disconnect().await;
    }
}

impl Runner {
    /// Streams the image into the inactive slot in the background; the device hears back
    /// through `OtaProgress` and `OtaFinished`.
    fn start_download(&mut self, offer: OtaOffer, manifest: FirmwareManifest, resume: bool) {
        let (nvs, layout, tx) = (self.nvs.clone(), self.layout, self.tx.clone());
        let url = resolve_url(&self.env.backend_url, &offer.url);
        let client = self.download_client();
        let label = self.label.clone();
        self.download_number += 1;
        let number = self.download_number;
        tracing::info!(device = %label, %url, version = %manifest.version, resume, "downloading update");
        let cancelled = self.cancelled.take();
        self.download = Some(tokio::spawn(async move {
            if let Some(previous) = cancelled {
                let _ = previous.await;
            }
            let result = async {
                let client = client.map_err(|e| format!("TLS client: {e:#}"))?;
                let path = nvs.path(FLASH_FILE);
                let slots = off_runtime(move || flash::open_slots(&path, &layout))
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let mut slots = flash::BlockingIo(slots);
                let start = if resume {
                    Start::Resume(nvs.ota_offset())
                } else {
                    Start::Fresh
                };
                let mut progress = AgentProgress {
                    nvs: nvs.clone(),
                    sync: std::sync::Arc::new(
                        slots.0.flash().sync_handle().map_err(|e| e.to_string())?,
                    ),
                    tx: tx.clone(),
                    number,
                };
                let mut source = download::Https { client, url };
                let plan = download::Plan {
                    manifest: &manifest,
                    start,
                    policy: DownloadPolicy::default(),
                    seed: rand::random(),
                };
                download::install(&mut source, &mut slots, plan, &mut progress).await?;
                let flash = slots.0.into_flash();
                off_runtime(move || flash.sync().map_err(|e| e.to_string())).await
            }
            .await;
            let _ = tx.send(Input::OtaFinished(number, result)).await;
        }));
    }

    /// HTTPS with the device certificate, trusting only the baked-in CA.
    fn download_client(&self) -> anyhow::Result<reqwest::Client> {
        let Some(credentials) = self.nvs.credentials() else {
            anyhow::bail!("no device certificate");
        };
        // No overall timeout: an image takes as long as it takes. How long a silent server
        // is given is the core's download policy (`stall_ms`).
        Ok(renew::mtls_builder(&self.env, &credentials)?.build()?)
    }
}

/// Certificate renewal: when to ask, and which certificate a connection uses.
impl Runner {
    /// A connection was accepted: a renewed certificate it used is now the device's own. If
    /// the old one got through while a renewed pair waits, the server is asked about the pair
    /// (another replica may have made it current already; or it was never recorded).
    fn connected_with_credentials(&mut self) {
        let r = &mut self.renewal;
        r.connected = true;
        r.try_next = true;
        if r.connection_uses_next {
            r.connection_uses_next = false;
            match self.nvs.promote_next() {
                Ok(()) => {
                    tracing::info!(device = %self.label, "connected with the renewed certificate")
                }
                Err(e) => {
                    tracing::error!(device = %self.label, error = %e, "keeping the renewed certificate failed")
                }
            }
        } else if let Some(next) = self.nvs.next_credentials() {
            let (env, tx) = (self.env.clone(), self.tx.clone());
            tokio::spawn(async move {
                let valid = renew::confirm_with(&env, &next).await.ok();
                let _ = tx.send(Input::NextChecked(valid)).await;
            });
        }
        self.confirm_if_pending();
        self.renewal.check_at = Some(Instant::now());
    }

    /// The server has not heard yet that the renewed certificate is in use: tell it.
    fn confirm_if_pending(&self) {
        if !self.nvs.confirm_pending() {
            return;
        }
        let (env, nvs, label) = (self.env.clone(), self.nvs.clone(), self.label.clone());
        tokio::spawn(async move {
            if let Err(e) = renew::confirm(&env, &nvs).await {
                // Tried again at the next renewal check and the next connection.
                tracing::warn!(device = %label, error = %format!("{e:#}"), "confirming the renewed certificate failed");
            }
        });
    }

    async fn next_checked(&mut self, valid: Option<bool>) {
        match valid {
            // Current now at the server (which revoked the old one): use it.
            Some(true) => {
                if let Err(e) = self.nvs.promote_next() {
                    tracing::error!(device = %self.label, error = %e, "keeping the renewed certificate failed");
                    return;
                }
                self.nvs.confirmed();
                self.reconnect().await;
            }
            Some(false) => self.nvs.discard_next(),
            None => {} // asked again at the next connection
        }
    }

    /// Drops the connection cleanly (no will) so the device connects again at once.
    async fn reconnect(&mut self) {
        self.disconnect(None).await;
        self.connection_lost();
        let now = self.now();
        self.device.handle_mqtt_disconnected(now);
    }

    /// A connection that never got through: if it tried one certificate while there are two,
    /// the next attempt tries the other.
    fn connection_lost(&mut self) {
        let r = &mut self.renewal;
        if !r.connected && self.nvs.next_credentials().is_some() {
            r.try_next = !r.connection_uses_next;
        }
        r.connected = false;
        r.check_at = None;
    }

    fn check_renewal(&mut self) {
        self.renewal.check_at = None;
        // Only while connected: a renewal then reconnects with the new certificate.
        if self.renewal.in_flight || self.device.state() != State::MqttConnected {
            return;
        }
        if self.nvs.confirm_pending() {
            // The certificate it holds is still pending at the server: confirm, not renew.
            self.confirm_if_pending();
            self.renewal.check_at = Some(Instant::now() + Duration::from_secs(60));
            return;
        }
        let Some(device_id) = self.device.device_id().map(|d| d.to_string()) else {
            return;
        };
        let Some(credentials) = self.nvs.credentials() else {
            return;
        };
        let Some((not_before, not_after)) = flotilla_pki::certificate_validity(&credentials.cert)
        else {
            tracing::error!(device = %self.label, "the device certificate cannot be read");
            return;
        };
        match self.env.renewal.decide(unix_ms(), not_before, not_after) {
            Renewal::NotYet { check_in_ms } => {
                self.renewal.check_at = Some(Instant::now() + Duration::from_millis(check_in_ms));
            }
            Renewal::Due => {
                self.renewal.in_flight = true;
                tracing::info!(device = %self.label, "renewing the device certificate");
                let (env, nvs, tx) = (self.env.clone(), self.nvs.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let result = renew::renew(&env, &nvs, &device_id).await;
                    let _ = tx.send(Input::Renewed(result)).await;
                });
            }
        }
    }

    async fn renewed(&mut self, result: Result<(), RenewFailure>) {
        self.renewal.in_flight = false;
        let at_least = match result {
            Ok(()) => {
                self.renewal.retry.succeeded();
                self.renewal.try_next = true;
                // A clean DISCONNECT (no will): the device is back before anyone marks it
                // offline, now with the new certificate.
                self.reconnect().await;
                return;
            }
            Err(RenewFailure::Later { retry_after }) => retry_after.unwrap_or_default(),
            Err(RenewFailure::Refused(why)) => {
                tracing::warn!(device = %self.label, why, "certificate renewal refused");
                Duration::from_secs(3600)
            }
        };
        let r = &mut self.renewal;
        let delay = r
            .retry
            .next_delay_ms(&mut r.rng, at_least.as_millis() as u64);
        r.check_at = Some(Instant::now() + Duration::from_millis(delay));
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An offer's URL is usually a path on the device listener the device already trusts.
fn resolve_url(backend: &str, url: &str) -> String {
    if url.starts_with('/') {
        format!("{}{url}", backend.trim_end_matches('/'))
    } else {
        url.to_string()
    }
}

struct AgentProgress {
    nvs: Nvs,
    sync: std::sync::Arc<std::fs::File>,
    tx: mpsc::Sender<Input>,
    /// Which download this is ([`Runner::download_number`]).
    number: u64,
}

impl download::Progress for AgentProgress {
    async fn flushed(&mut self, offset: u64) {
        let (sync, nvs) = (self.sync.clone(), self.nvs.clone());
        let persisted = off_runtime(move || {
            // The offset may only claim bytes that are on disk.
            sync.sync_data()?;
            nvs.set_ota_offset(offset)
        })
        .await;
        if let Err(e) = persisted {
            tracing::warn!(error = %e, "could not persist the download offset");
        }
    }

    fn received(&mut self, received: u64) {
        let _ = self.tx.try_send(Input::OtaProgress(self.number, received));
    }
}

/// Drives one MQTT connection until it ends, reporting to the runner. It never reconnects by
/// itself: the device core decides when, with backoff.
async fn pump(generation: u64, mut eventloop: EventLoop, mut acks: Acks, tx: mpsc::Sender<Input>) {
    let send = |event| {
        let tx = tx.clone();
        async move { tx.send(Input::Mqtt { generation, event }).await.is_ok() }
    };
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    tracing::warn!(code = ?ack.code, "broker refused the connection");
                    send(MqttEvent::Disconnected).await;
                    return;
                }
                if !send(MqttEvent::Connected).await {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if !send(MqttEvent::Message {
                    topic,
                    payload: p.payload.to_vec(),
                })
                .await
                {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => acks.written(pkid),
            Ok(Event::Outgoing(rumqttc::Outgoing::AwaitAck(pkid))) => acks.collided(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(delivery) = acks.acknowledged(ack.pkid, ack.reason)
                    && !send(MqttEvent::Acknowledged(delivery)).await
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(reason = ?d.reason_code, "broker closed the connection");
                send(MqttEvent::Disconnected).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "MQTT connection lost");
                send(MqttEvent::Disconnected).await;
                return;
            }
            Ok(_) => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A heap reading in the range an ESP32-C3 application shows.
fn simulated_heap() -> u32 {
    use rand::Rng;
    rand::rng().random_range(150_000..190_000)
}
