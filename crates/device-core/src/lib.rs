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
//! ```
//! use flotilla_device_core::{Action, Config, Device, State, Stored};
//!
//! let mut device = Device::new(Config::default(), 42);
//! device.handle_boot(0, Stored::default());
//! assert_eq!(device.state(), State::ApMode);
//! let actions: Vec<Action> = std::iter::from_fn(|| device.poll_action()).collect();
//! assert!(actions.contains(&Action::StartAccessPoint));
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
