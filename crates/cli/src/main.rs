//! flotilla: the operator CLI over the Flotilla HTTP API.
//!
//! Human-readable tables by default, `--json` for scripts. Exit codes: 0 success, 1 error,
//! 2 bad usage, 3 not authenticated or not allowed, 4 not found.

mod api;
mod audit;
mod fleet_ota;
mod release;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use api::{Api, ApiFailure, Session};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Operate a Flotilla fleet")]
struct Cli {
    /// Server URL (the user API).
    #[arg(long, env = "FLOTILLA_URL", global = true)]
    url: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log in and remember the session.
    /// The password comes from the first line of standard input with `--password-stdin`,
    /// else from FLOTILLA_PASSWORD, else from a prompt on the terminal; `--password` works too
    /// but leaves it in the shell history and the process list.
    Login {
        #[arg(long)]
        email: String,
        #[arg(long, env = "FLOTILLA_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Devices.
    Device {
        #[command(subcommand)]
        action: DeviceCmd,
    },
    /// Provisioning tokens.
    Token {
        #[command(subcommand)]
        action: TokenCmd,
    },
    /// Switch a device's LED.
    Led {
        device: String,
        #[arg(value_parser = ["on", "off", "ON", "OFF"])]
        state: String,
        /// Wait up to SECS for the device's answer; fails unless it succeeded.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Send a command: led, led_brightness, sensor, reboot, ping.
    Command {
        device: String,
        name: String,
        /// Arguments as a JSON object, e.g. '{"value":40}'.
        args: Option<String>,
        #[arg(long)]
        ttl: Option<u64>,
        /// Wait up to SECS for the device's answer; fails unless it succeeded.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Releases: signing offline (the key never leaves this machine), publishing, blocking.
    Release {
        #[command(subcommand)]
        action: ReleaseCmd,
    },
    /// Firmware updates of single devices.
    Ota {
        #[command(subcommand)]
        action: fleet_ota::OtaCmd,
    },
    /// Staged rollouts.
    Rollout {
        #[command(subcommand)]
        action: fleet_ota::RolloutCmd,
    },
    /// The fleet security report (admins): certificates expiring within DAYS, blocked or
    /// revoked devices still connected, crash loops, devices never seen since provisioning.
    Security {
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Crashed boots that make a crash loop.
        #[arg(long, default_value_t = 3)]
        crashes: u32,
    },
    /// The audit log (admins): the newest records, or `verify` / `export` of its hash chain.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(subcommand)]
        action: Option<AuditCmd>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the whole hash chain here: every record links to the one before, every
    /// checkpoint is signed by the CA. Names the first record that does not hold; exit 1.
    Verify {
        /// The CA certificate to check checkpoint signatures with (default: the server's
        /// /ca.pem, which trusts the server you are checking; pin your own copy).
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        /// A head an earlier verify printed (`SEQ:HASH`), kept where the server cannot reach:
        /// the chain must still hold it, which catches a tail rewritten after it even when the
        /// signed head checkpoints were deleted.
        #[arg(long, value_parser = audit::parse_head)]
        expect: Option<(u64, flotilla_audit::Hash)>,
    },
    /// Write records after seq AFTER to OUT as JSON lines; once they are on disk the server
    /// may remove them when retention says they are old enough.
    Export {
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    Register {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    List,
    Show {
        id: String,
    },
    /// Block or unblock (toggle) a device (admins).
    Block {
        id: String,
    },
    /// Show the device's desired and reported configuration; with options, replace the
    /// desired one (it reaches the device retained on devices/ID/config).
    Config {
        id: String,
        /// Seconds between telemetry readings.
        #[arg(long)]
        telemetry: Option<u32>,
        /// Seconds between heartbeats.
        #[arg(long)]
        heartbeat: Option<u32>,
        #[arg(long, value_parser = on_off)]
        pot: Option<bool>,
        #[arg(long, value_parser = on_off)]
        switch: Option<bool>,
        #[arg(long, value_parser = on_off)]
        temp: Option<bool>,
    },
    /// Replace a device's tags (comma-separated; empty to clear).
    Tag {
        id: String,
        #[arg(value_delimiter = ',')]
        tags: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ReleaseCmd {
    /// Make a P-256 release signing key: OUT.key (0600) and OUT.pub.
    Keygen {
        #[arg(long, default_value = "release")]
        out: std::path::PathBuf,
    },
    /// Print a firmware image's SHA-256.
    Hash {
        firmware: std::path::PathBuf,
    },
    /// Sign a release: writes FIRMWARE.manifest.json. FIRMWARE must be an ESP32 app image;
    /// its descriptor gives the version, the hardware (its project name) and the security
    /// counter (its secure_version). A flag, if given, must agree with it.
    Sign {
        firmware: std::path::PathBuf,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        hardware: Option<String>,
        #[arg(long, default_value = "release.key")]
        key: std::path::PathBuf,
        #[arg(long)]
        security_counter: Option<u32>,
        /// Unix seconds after which devices refuse the release.
        #[arg(long)]
        expires: Option<u64>,
    },
    /// Check an image and its manifest against a public key, as a device would.
    Verify {
        firmware: std::path::PathBuf,
        manifest: std::path::PathBuf,
        #[arg(long, default_value = "release.pub")]
        public_key: std::path::PathBuf,
    },
    /// Upload a signed release (FIRMWARE and FIRMWARE.manifest.json) to the server.
    Publish {
        firmware: std::path::PathBuf,
        #[arg(long)]
        manifest: Option<std::path::PathBuf>,
    },
    /// Releases on the server.
    List,
    /// Never offer this release again; rollouts of it abort (admins).
    Block {
        version: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Unblock {
        version: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    Create {
        /// Bind the token to one device id.
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        ttl: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.exit_code)
        }
    }
}

/// The login password from standard input, the flag or environment, or a prompt without echo.
fn read_password(given: Option<&str>, from_stdin: bool) -> Result<String, ApiFailure> {
    let password = match given {
        _ if from_stdin => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| ApiFailure::other(format!("reading the password from stdin: {e}")))?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
        Some(p) => p.to_string(),
        None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            rpassword::prompt_password("Password: ")
                .map_err(|e| ApiFailure::other(format!("reading the password: {e}")))?
        }
        None => {
            return Err(ApiFailure::other(
                "no password: set FLOTILLA_PASSWORD, pass --password-stdin, or run on a terminal",
            ));
        }
    };
    if password.is_empty() {
        return Err(ApiFailure::other("the password is empty"));
    }
    Ok(password)
}

async fn run(cli: Cli) -> Result<(), ApiFailure> {
    let json_out = cli.json;
    if let Cmd::Login {
        email,
        password,
        password_stdin,
    } = &cli.command
    {
        let url = cli
            .url
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let password = read_password(password.as_deref(), *password_stdin)?;
        let api = Api::new(&url, None)?;
        let body = api
            .post(
                "/api/auth/login",
                &json!({ "email": email, "password": password }),
            )
            .await?;
        let token = body["token"]
            .as_str()
            .ok_or_else(|| ApiFailure::other("server returned no token"))?;
        Session {
            url: url.clone(),
            token: token.into(),
        }
        .save()?;
        print_out(json_out, &json!({ "loggedIn": email, "url": url }), |_| {
            println!("logged in to {url} as {email}")
        });
        return Ok(());
    }
    if let Cmd::Release { action } = &cli.command
        && action.is_offline()
    {
        return run_release(action, json_out);
    }
    let api = Api::from_session(cli.url.as_deref())?;
    match cli.command {
        Cmd::Login { .. } => Ok(()),
        Cmd::Release { action } => run_release_online(&api, action, json_out).await,
        Cmd::Ota { action } => fleet_ota::run_ota(&api, action, json_out).await,
        Cmd::Rollout { action } => fleet_ota::run_rollout(&api, action, json_out).await,
        Cmd::Device { action } => match action {
            DeviceCmd::Register { id, name } => {
                let name = name.unwrap_or_else(|| id.clone());
                let d = api
                    .post(
                        "/api/device/register",
                        &json!({ "deviceId": id, "name": name }),
                    )
                    .await?;
                print_out(json_out, &d, |d| {
                    println!("registered {}", d["deviceId"].as_str().unwrap_or_default())
                });
                Ok(())
            }
            DeviceCmd::List => {
                let list = api.get("/api/device").await?;
                print_out(json_out, &list, table::devices);
                Ok(())
            }
            DeviceCmd::Show { id } => {
                let d = api
                    .get(&format!("/api/device/{}", api::segment(&id)))
                    .await?;
                print_out(json_out, &d, table::key_values);
                Ok(())
            }
            DeviceCmd::Config {
                id,
                telemetry,
                heartbeat,
                pot,
                switch,
                temp,
            } => {
                let path = format!("/api/device/{}/config", api::segment(&id));
                let mut desired = serde_json::Map::new();
                let fields = [
                    ("telemetry_interval_s", telemetry.map(Value::from)),
                    ("heartbeat_interval_s", heartbeat.map(Value::from)),
                    ("pot", pot.map(Value::from)),
                    ("switch", switch.map(Value::from)),
                    ("temp", temp.map(Value::from)),
                ];
                for (name, value) in fields {
                    if let Some(v) = value {
                        desired.insert(name.into(), v);
                    }
                }
                let view = if desired.is_empty() {
                    api.get(&path).await?
                } else {
                    api.put_json(&path, &Value::Object(desired)).await?
                };
                print_out(json_out, &view, table::device_config);
                Ok(())
            }
            DeviceCmd::Tag { id, tags } => {
                let d = api
                    .put_json(
                        &format!("/api/device/{}/tags", api::segment(&id)),
                        &json!({ "tags": tags }),
                    )
                    .await?;
                print_out(json_out, &d, |d| println!("{id} tags: {}", d["tags"]));
                Ok(())
            }
            DeviceCmd::Block { id } => {
                let r = api
                    .post(
                        &format!("/api/admin/device/{}/block", api::segment(&id)),
                        &Value::Null,
                    )
                    .await?;
                print_out(json_out, &r, |r| println!("{id} blocked: {}", r["blocked"]));
                Ok(())
            }
        },
        Cmd::Token {
            action: TokenCmd::Create { device, ttl },
        } => {
            let mut body = json!({});
            if let Some(d) = device {
                body["deviceId"] = json!(d);
            }
            if let Some(t) = ttl {
                body["ttlSeconds"] = json!(t);
            }
            let r = api.post("/api/provisioning/tokens", &body).await?;
            print_out(json_out, &r, |r| {
                println!("{}", r["token"].as_str().unwrap_or_default())
            });
            Ok(())
        }
        Cmd::Led {
            device,
            state,
            wait,
        } => {
            let r = api
                .post(
                    &format!("/api/device/{}/led", api::segment(&device)),
                    &json!({ "state": state.to_uppercase() }),
                )
                .await?;
            if let Some(secs) = wait {
                let id = r["commandId"].as_str().unwrap_or_default();
                return answered(&api, &device, id, secs, json_out).await;
            }
            print_out(json_out, &r, |r| {
                println!(
                    "command {} {}",
                    r["commandId"].as_str().unwrap_or_default(),
                    r["state"].as_str().unwrap_or_default()
                )
            });
            Ok(())
        }
        Cmd::Command {
            device,
            name,
            args,
            ttl,
            wait,
        } => {
            let args: Value = match args {
                Some(a) => serde_json::from_str(&a)
                    .map_err(|e| ApiFailure::usage(format!("ARGS is not JSON: {e}")))?,
                None => json!({}),
            };
            let mut body = json!({ "name": name, "args": args });
            if let Some(t) = ttl {
                body["ttlSeconds"] = json!(t);
            }
            let r = api
                .post(
                    &format!("/api/device/{}/commands", api::segment(&device)),
                    &body,
                )
                .await?;
            if let Some(secs) = wait {
                let id = r["id"].as_str().unwrap_or_default();
                return answered(&api, &device, id, secs, json_out).await;
            }
            print_out(json_out, &r, |r| {
                println!(
                    "command {} {}",
                    r["id"].as_str().unwrap_or_default(),
                    r["state"].as_str().unwrap_or_default()
                )
            });
            Ok(())
        }
        Cmd::Security { days, crashes } => {
            let r = api
                .get(&format!(
                    "/api/admin/security?days={days}&crashes={crashes}"
                ))
                .await?;
            print_out(json_out, &r, table::security);
            Ok(())
        }
        Cmd::Audit {
            action: Some(action),
            ..
        } => run_audit(&api, action, json_out).await,
        Cmd::Audit {
            limit,
            action: None,
        } => {
            let r = api.get(&format!("/api/admin/audit?limit={limit}")).await?;
            print_out(json_out, &r, table::audit);
            Ok(())
        }
    }
}

async fn run_audit(api: &Api, action: AuditCmd, json_out: bool) -> Result<(), ApiFailure> {
    match action {
        AuditCmd::Verify { ca, expect } => {
            let ca_pem = match &ca {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| ApiFailure::other(format!("reading {}: {e}", path.display())))?,
                None => api.get_text("/ca.pem").await?,
            };
            match audit::verify(api, &ca_pem, expect).await? {
                Ok(s) => {
                    let head = flotilla_audit::to_hex(&s.head);
                    let r = json!({ "intact": true, "records": s.records, "firstSeq": s.first_seq,
                        "lastSeq": s.last_seq, "head": head, "checkpoints": s.checkpoints });
                    print_out(json_out, &r, |_| {
                        println!(
                            "audit chain intact: {} records (seq {}..{}), {} signed checkpoints\nhead {}:{}",
                            s.records, s.first_seq, s.last_seq, s.checkpoints, s.last_seq, head
                        )
                    });
                    Ok(())
                }
                Err(b) => {
                    if json_out {
                        println!("{}", json!({ "intact": false, "break": b.to_string() }));
                    }
                    Err(ApiFailure::other(format!("audit chain broken: {b}")))
                }
            }
        }
        AuditCmd::Export { out, after } => {
            let (count, last) = audit::export(api, after, &out).await?;
            let r = json!({ "records": count, "lastSeq": last, "file": out });
            print_out(json_out, &r, |_| {
                println!("{count} records through seq {last} in {}", out.display())
            });
            Ok(())
        }
    }
}

impl ReleaseCmd {
    fn is_offline(&self) -> bool {
        matches!(
            self,
            ReleaseCmd::Keygen { .. }
                | ReleaseCmd::Hash { .. }
                | ReleaseCmd::Sign { .. }
                | ReleaseCmd::Verify { .. }
        )
    }
}

async fn run_release_online(
    api: &Api,
    action: ReleaseCmd,
    json_out: bool,
) -> Result<(), ApiFailure> {
    match action {
        ReleaseCmd::Publish { firmware, manifest } => {
            fleet_ota::publish(api, &firmware, manifest.as_ref(), json_out).await
        }
        ReleaseCmd::List => {
            let r = api.get("/api/releases").await?;
            print_out(json_out, &r, |r| {
                for rel in r.as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<10} {:>9} bytes  {}{}",
                        rel["version"].as_str().unwrap_or_default(),
                        rel["hardware"].as_str().unwrap_or_default(),
                        rel["size"],
                        if rel["ready"] == json!(true) {
                            "ready"
                        } else {
                            "awaiting image"
                        },
                        if rel["blocked"] == json!(true) {
                            "  BLOCKED"
                        } else {
                            ""
                        }
                    );
                }
            });
            Ok(())
        }
        ReleaseCmd::Block { version, reason } => block(api, &version, true, reason, json_out).await,
        ReleaseCmd::Unblock { version } => block(api, &version, false, None, json_out).await,
        // Offline commands never get here (see `is_offline`).
        _ => run_release(&action, json_out),
    }
}

async fn block(
    api: &Api,
    version: &str,
    blocked: bool,
    reason: Option<String>,
    json_out: bool,
) -> Result<(), ApiFailure> {
    let r = api
        .post(
            &format!("/api/releases/{}/block", api::segment(version)),
            &json!({ "blocked": blocked, "reason": reason }),
        )
        .await?;
    print_out(json_out, &r, |r| {
        println!("{version} blocked: {}", r["blocked"])
    });
    Ok(())
}

fn run_release(action: &ReleaseCmd, json_out: bool) -> Result<(), ApiFailure> {
    match action {
        ReleaseCmd::Keygen { out } => {
            let (key, public) = release::keygen(out)?;
            print_out(
                json_out,
                &json!({ "key": key, "publicKey": public }),
                |_| {
                    println!(
                        "private key {} (keep it offline), public key {}",
                        key.display(),
                        public.display()
                    )
                },
            );
        }
        ReleaseCmd::Hash { firmware } => {
            let (sha256, size) = release::hash(firmware)?;
            print_out(json_out, &json!({ "sha256": sha256, "size": size }), |_| {
                println!("{sha256}")
            });
        }
        ReleaseCmd::Sign {
            firmware,
            version,
            hardware,
            key,
            security_counter,
            expires,
        } => {
            let req = release::SignRequest {
                firmware,
                key,
                version: version.as_deref(),
                hardware: hardware.as_deref(),
                security_counter: *security_counter,
                expires_at: *expires,
            };
            let out = release::sign(&req)?;
            print_out(json_out, &json!({ "manifest": out }), |_| {
                println!("signed {}", out.display())
            });
        }
        ReleaseCmd::Verify {
            firmware,
            manifest,
            public_key,
        } => {
            let m = release::verify(firmware, manifest, public_key)?;
            print_out(json_out, &json!(m), |_| {
                println!(
                    "ok: {} {} for {}",
                    firmware.display(),
                    m.version,
                    m.hardware
                )
            });
        }
        ReleaseCmd::Publish { .. }
        | ReleaseCmd::List
        | ReleaseCmd::Block { .. }
        | ReleaseCmd::Unblock { .. } => {
            return Err(ApiFailure::other("this release command needs the server"));
        }
    }
    Ok(())
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "ON" | "true" => Ok(true),
        "off" | "OFF" | "false" => Ok(false),
        _ => Err("on or off".into()),
    }
}

fn print_out(json_out: bool, value: &Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        human(value);
    }
}

/// Waits up to `secs` for command `id` to finish (the server holds each request up to 25 s),
/// prints it, and fails unless it succeeded.
async fn answered(
    api: &api::Api,
    device: &str,
    id: &str,
    secs: u64,
    json_out: bool,
) -> Result<(), ApiFailure> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let path = format!(
        "/api/device/{}/commands/{}",
        api::segment(device),
        api::segment(id)
    );
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let r = api
            .get(&format!("{path}?wait={}", left.as_secs().min(25)))
            .await?;
        let state = r["state"].as_str().unwrap_or_default().to_string();
        let finished = matches!(state.as_str(), "succeeded" | "failed" | "expired");
        if finished || left.as_secs() == 0 {
            print_out(json_out, &r, |r| {
                println!("command {id} {state}");
                if let Some(e) = r["error"].as_str() {
                    println!("error: {e}");
                }
            });
            return match state.as_str() {
                "succeeded" => Ok(()),
                _ if finished => Err(ApiFailure::other(format!("command {id} {state}"))),
                _ => Err(ApiFailure::other(format!(
                    "command {id} still {state} after {secs} s"
                ))),
            };
        }
    }
}
