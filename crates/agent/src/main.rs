//! flotilla-agent: a Linux device that behaves like a Flotilla ESP32 — SoftAP provisioning,
//! on-device key and CSR, mTLS MQTT, heartbeats, telemetry, commands — and `sim`, a fleet of
//! such devices in one process.

mod boot;
mod csr;
mod delivery;
mod download;
mod flash;
mod image;
mod nvs;
mod partitions;
mod renew;
mod runner;
mod sensors;
mod sim;
mod softap;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flotilla_device_core::renewal::RenewalPolicy;
use flotilla_device_core::{BackoffConfig, Config};

use runner::{DeviceEnv, Exit, Network, Runner};

#[derive(Parser)]
#[command(
    name = "flotilla-agent",
    version,
    about = "A virtual ESP32 for Flotilla, and a fleet simulator",
    args_override_self = true
)]
struct Cli {
    #[command(flatten)]
    device: DeviceFlags,
    /// The SoftAP provisioning server (seed 004's 192.168.4.1:80).
    #[arg(
        long,
        env = "FLOTILLA_PROVISION_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    provision_addr: SocketAddr,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run many virtual devices in one process, provisioned in bulk through the API.
    Sim(sim::SimFlags),
    /// Build a firmware image for this agent (what a release contains when the chip is an agent).
    Image(ImageFlags),
}

#[derive(Args, Debug)]
struct ImageFlags {
    #[arg(long)]
    version: String,
    #[arg(long, default_value = "esp32c3")]
    hardware: String,
    #[arg(long, default_value_t = 0)]
    security_counter: u32,
    /// How the build behaves once booted (to exercise rollback with real images).
    #[arg(long, value_enum, default_value = "normal")]
    behaviour: image::Behaviour,
    /// Image size in bytes (filler after the header).
    #[arg(long, default_value_t = 1536 * 1024)]
    size: usize,
    /// Where to write the image.
    #[arg(long, short)]
    out: PathBuf,
}

/// What a device is built with: where its flash lives, the servers and CA baked in.
#[derive(Args, Clone, Debug)]
pub struct DeviceFlags {
    /// The device's NVS and flash, as files.
    #[arg(
        long,
        env = "FLOTILLA_AGENT_DATA_DIR",
        default_value = "./agent-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Base URL of the server's device listener (for /sign-csr).
    #[arg(
        long,
        env = "FLOTILLA_BACKEND_URL",
        default_value = "https://localhost:8443",
        global = true
    )]
    backend_url: String,
    /// The MQTT broker, mqtts://host:port.
    #[arg(
        long,
        env = "FLOTILLA_BROKER_URL",
        default_value = "mqtts://localhost:8883",
        global = true
    )]
    broker_url: String,
    /// The CA certificate baked into the device (the server's ca.pem).
    #[arg(
        long,
        env = "FLOTILLA_SERVER_CA",
        default_value = "./flotilla-data/ca.pem",
        global = true
    )]
    server_ca: PathBuf,
    /// Firmware version this build reports.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"), global = true)]
    fw_version: String,
    #[arg(long, default_value_t = 30, global = true)]
    heartbeat_secs: u64,
    #[arg(long, default_value_t = 10, global = true)]
    telemetry_secs: u64,
    /// Hardware/product of the factory image.
    #[arg(long, default_value = "esp32c3", global = true)]
    hardware: String,
    /// Anti-rollback counter of the factory image.
    #[arg(long, default_value_t = 0, global = true)]
    security_counter: u32,
    /// Release public keys (PEM) the firmware trusts; several during a key rotation.
    #[arg(
        long = "release-key",
        env = "FLOTILLA_RELEASE_KEYS",
        value_delimiter = ',',
        global = true
    )]
    release_keys: Vec<PathBuf>,
    /// Size of each of the two firmware slots.
    #[arg(long, default_value_t = 1_920 * 1024, global = true)]
    slot_size: usize,
    /// A new image is confirmed after staying connected this long.
    #[arg(long, default_value_t = 30, global = true)]
    ota_confirm_secs: u64,
    /// A new image not confirmed this long after boot restarts (and counts as a crash).
    #[arg(long, default_value_t = 300, global = true)]
    ota_deadline_secs: u64,
    /// Renew the device certificate once this share of its life has passed.
    #[arg(long, default_value_t = 0.667, value_parser = parse_share, global = true)]
    renew_at: f64,
    /// Simulated Wi-Fi networks in range, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "flotilla-lab,HomeNet,Statsnapp",
        global = true
    )]
    wifi: Vec<String>,
}

impl DeviceFlags {
    fn env(&self) -> anyhow::Result<DeviceEnv> {
        let server_ca_pem = std::fs::read_to_string(&self.server_ca)
            .with_context(|| format!("reading server CA {}", self.server_ca.display()))?;
        let (broker_host, broker_port) = parse_broker_url(&self.broker_url)?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(server_ca_pem.as_bytes())
                    .context("server CA is not PEM")?,
            )
            .timeout(Duration::from_secs(20))
            .build()?;
        let networks = self
            .wifi
            .iter()
            .enumerate()
            .map(|(i, ssid)| Network {
                ssid: ssid.clone(),
                rssi: -42 - 7 * i as i16,
                channel: [1, 6, 11][i % 3],
                secure: true,
            })
            .collect();
        let trusted_keys = self
            .release_keys
            .iter()
            .map(|path| {
                use p256::pkcs8::DecodePublicKey;
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading release key {}", path.display()))?;
                p256::ecdsa::VerifyingKey::from_public_key_pem(&pem)
                    .with_context(|| format!("{} is not a P-256 public key", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let config = Config {
            firmware_version: self.fw_version.clone(),
            heartbeat_ms: self.heartbeat_secs.max(1) * 1000,
            telemetry_ms: self.telemetry_secs.max(1) * 1000,
            backoff: BackoffConfig::default(),
            trusted_keys,
            ota_confirm_ms: self.ota_confirm_secs.max(1) * 1000,
            ota_verify_deadline_ms: self.ota_deadline_secs.max(1) * 1000,
            ..Config::default()
        };
        let factory = image::ImageHeader {
            version: self.fw_version.clone(),
            hardware: self.hardware.clone(),
            security_counter: self.security_counter,
            behaviour: image::Behaviour::Normal,
        };
        Ok(DeviceEnv {
            backend_url: self.backend_url.clone(),
            broker_host,
            broker_port,
            server_ca_pem,
            networks,
            config,
            http,
            slot_len: self.slot_size,
            factory,
            renewal: RenewalPolicy {
                at_permille: (self.renew_at * 1000.0).round() as u16,
                ..RenewalPolicy::default()
            },
        })
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=0.99).contains(&v) => Ok(v),
        _ => Err("a share of the certificate's life between 0.01 and 0.99".into()),
    }
}

fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtts://")
        .context("broker URL must start with mqtts:// (TLS is mandatory)")?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .map_or((rest, Ok(8883)), |(h, p)| (h, p.parse::<u16>()));
    Ok((
        host.trim_matches(['[', ']']).to_string(),
        port.context("broker URL port")?,
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Sim(flags)) => sim::run(cli.device, flags).await,
            Some(Command::Image(flags)) => write_image(&flags),
            None => run_device(cli.device, cli.provision_addr).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_device(flags: DeviceFlags, provision_addr: SocketAddr) -> anyhow::Result<()> {
    let env = flags.env()?;
    let nvs = nvs::Nvs::open(&flags.data_dir)?;
    let (runner, handle) = Runner::power_on(env.clone(), nvs, "agent".into()).await?;
    let listener = tokio::net::TcpListener::bind(provision_addr)
        .await
        .with_context(|| format!("binding SoftAP server on {provision_addr}"))?;
    let bound = listener.local_addr()?;
    // Tests and tools bind port 0 and read the real address here.
    std::fs::write(flags.data_dir.join("softap.addr"), bound.to_string())?;
    tracing::info!(addr = %bound, "SoftAP provisioning server listening");
    let app = softap::router(handle.clone(), env.networks.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stopper.shutdown().await;
    });
    match runner.run().await {
        Exit::Shutdown => Ok(()),
        Exit::Reboot => reexec(),
    }
}

fn write_image(flags: &ImageFlags) -> anyhow::Result<()> {
    let header = image::ImageHeader {
        version: flags.version.clone(),
        hardware: flags.hardware.clone(),
        security_counter: flags.security_counter,
        behaviour: flags.behaviour,
    };
    flags
        .version
        .parse::<flotilla_proto::FirmwareVersion>()
        .map_err(|e| anyhow::anyhow!("--version: {e}"))?;
    let bytes = image::build(&header, flags.size)?;
    std::fs::write(&flags.out, &bytes)
        .with_context(|| format!("writing {}", flags.out.display()))?;
    println!("{} ({} bytes)", flags.out.display(), bytes.len());
    Ok(())
}

/// A reboot replaces the process with a fresh copy of itself, as a chip restarts from flash.
fn reexec() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    tracing::info!("rebooting");
    let exe = std::env::current_exe()?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(anyhow::anyhow!("re-exec failed: {err}"))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_must_be_tls_and_parse() {
        assert_eq!(
            parse_broker_url("mqtts://localhost:8883").unwrap(),
            ("localhost".into(), 8883)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.example").unwrap(),
            ("broker.example".into(), 8883)
        );
        assert!(parse_broker_url("mqtt://localhost:1883").is_err());
        assert!(parse_broker_url("mqtts://h:notaport").is_err());
    }
}
