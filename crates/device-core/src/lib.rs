//! The sans-IO brain of a Flotilla device, shared by the ESP32-C3 firmware and the Linux agent.
//!
//! It runs seed 004's provisioning state machine (INIT -> CHECK_PROVISIONING -> AP_MODE ->
//! WIFI_CONNECTING -> WIFI_CONNECTED -> CHECK_CERTIFICATES -> SUBMIT_CSR -> MQTT_CONNECTING ->
//! MQTT_CONNECTED), reconnects with capped exponential backoff and full jitter, publishes
//! heartbeats and telemetry, and executes commands from a bounded queue at most once each.
//!
//! What it does not do: any I/O. It never touches a socket, flash, a clock or an RNG; the
//! shell performs the [`Action`]s it asks for and reports back through `handle_*` calls.
//!
//! It knows what was delivered: a [`Publish`] that must arrive (a final command reply, a final
//! OTA report) carries a [`Token`], and the shell reports its PUBACK with
//! [`Device::handle_published`] (or an error reason with [`Device::handle_publish_refused`]).
//! Until then the core keeps it, sends it again after a reconnect, and holds back what depends
//! on it: recording an OTA outcome as reported, the restart a `reboot` command asked for.
//!
//! # Its parts
//!
//! Behind the [`Device`] façade: the link (provisioning, Wi-Fi, CSR, broker session and
//! reconnect backoff; in `device.rs`), the reporter (heartbeat and telemetry timers, the
//! telemetry sequence), the executor (the command queue, at-most-once ids, the LED), the OTA
//! flow (offers, download, activation, confirmation; `device/ota_flow.rs`, not yet a part of
//! its own) and the outbox (what must arrive, until its PUBACK). Pure parts a shell uses
//! directly: [`ota`] (checking an offer), [`download`] (the download policy), [`install`]
//! (writing and checking a slot),
//! [`otadata`] and [`slots`] (ESP-IDF's slot selection), [`app_image`], [`renewal`].
//!
//! # Driving it from a new shell
//!
//! 1. At power-on, read what NVS holds into a [`Stored`] and call [`Device::handle_boot`].
//! 2. Turn every event into its `handle_*` call, with `now` in milliseconds from a monotonic
//!    clock: the SoftAP's `POST /provision`, Wi-Fi up or lost, the `/sign-csr` answer
//!    ([`CsrFailure::from_status`]), the broker's CONNACK and the connection's loss
//!    ([`Device::handle_mqtt_disconnected`]: the core then reconnects with backoff), each
//!    message, each PUBACK ([`Device::handle_published`], with the [`Token`] the [`Publish`]
//!    carried, or [`Device::handle_publish_refused`] for an error reason), the download's
//!    progress and end, sensor readings, heap and RSSI
//!    ([`Device::handle_platform_stats`]), the wall clock once known.
//! 3. After each call, drain [`Device::poll_action`] and perform every [`Action`] in the
//!    order given ([`Action::Persist`] before what follows it: a reboot comes after the write
//!    that makes it safe).
//! 4. Sleep until [`Device::poll_timeout`] (or the next event) and call
//!    [`Device::handle_timeout`]. Timers due at once are merged in this order: the link's
//!    retry, the stable-connection mark, the heartbeat, telemetry, the next command, the OTA
//!    confirmation, the OTA deadline, a reboot's wait for its reply's PUBACK, then the
//!    outbox's re-sends.
//!
//! ```
//! use flotilla_device_core::{Action, Config, Device, ProvisionRequest, State, Stored};
//!
//! let mut device = Device::new(Config::default(), 42);
//! let mut now = 0;
//! device.handle_boot(now, Stored::default());
//! let mut actions = Vec::new();
//! let mut drain = |d: &mut Device, out: &mut Vec<Action>| {
//!     out.extend(std::iter::from_fn(|| d.poll_action()))
//! };
//! drain(&mut device, &mut actions);
//! assert!(actions.contains(&Action::StartAccessPoint));
//!
//! // The phone app posts the Wi-Fi credentials and a provisioning token.
//! let request = ProvisionRequest {
//!     ssid: "shop-floor".into(),
//!     password: "secret-pass".into(),
//!     device_id: "pump-7".into(),
//!     provisioning_token: "tok".into(),
//! };
//! device.handle_provision(now, request, None).unwrap();
//! device.handle_wifi_connected(now);
//! device.handle_csr_result(now, Ok(()));
//! device.handle_mqtt_connected(now);
//! assert_eq!(device.state(), State::MqttConnected);
//!
//! // A command arrives; the executor runs it at its next timeout and replies.
//! device.handle_message(
//!     now,
//!     "devices/pump-7/command",
//!     br#"{"id":"c1","name":"ping","expires_at":4000000000}"#,
//! );
//! now += 1;
//! device.handle_timeout(now);
//! actions.clear();
//! drain(&mut device, &mut actions);
//! let reply = actions
//!     .iter()
//!     .find_map(|a| match a {
//!         Action::Publish(p) if p.topic == "devices/pump-7/reply" && p.token.is_some() => Some(p),
//!         _ => None,
//!     })
//!     .expect("the final reply, which must arrive");
//! // The shell publishes it at QoS 1 and reports the PUBACK: the outbox forgets it.
//! let before = device.unacknowledged();
//! device.handle_published(now, reply.token.unwrap());
//! assert_eq!(device.unacknowledged(), before - 1);
//! ```
#![no_std]

extern crate alloc;

pub mod app_image;
mod backoff;
mod commands;
mod device;
pub mod download;
pub mod install;
pub mod ota;
pub mod otadata;
mod outbox;
mod provisioning;
pub mod renewal;
mod rng;
pub mod slots;

pub use backoff::{Backoff, BackoffConfig};
pub use commands::{CommandQueue, Refusal};
pub use device::{
    Action, Awaiting, BootedImage, COMMANDS_DONE_KEPT, Config, CsrFailure, Device, Millis, Persist,
    Publish, SensorValues, State, Stored,
};
pub use outbox::{RETRY_MS, Token};
pub use provisioning::{ProvisionError, ProvisionRequest, Provisioning};
pub use rng::Rng;
