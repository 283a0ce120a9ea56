//! Online OTA commands: publishing releases, updating one device, staged rollouts.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::api::{Api, ApiFailure, segment};
use crate::print_out;

#[derive(Subcommand)]
pub enum OtaCmd {
    /// Offer a release to one device (seed 001's send_ota_update).
    Send {
        device: String,
        version: String,
        /// Allow an older version (the device still refuses a lower security counter).
        #[arg(long)]
        force: bool,
    },
    /// Cancel the device's open update; a device downloading it stops and reports FAILED.
    Cancel { device: String },
    /// Is there a newer release for this device?
    Check { device: String },
    /// A device's updates and every status it reported.
    History { device: String },
    /// How many devices run each firmware version.
    Distribution,
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Roll a release out in phases that stop by themselves when devices fail.
    Create(Box<NewRollout>),
    List,
    Show {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Abort {
        id: String,
    },
}

#[derive(Args)]
pub struct NewRollout {
    version: String,
    /// Every device of this hardware type.
    #[arg(long, conflicts_with_all = ["tag", "devices", "all"])]
    hardware: Option<String>,
    /// Every device with this tag.
    #[arg(long, conflicts_with_all = ["devices", "all"])]
    tag: Option<String>,
    /// These devices (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "all")]
    devices: Option<Vec<String>>,
    /// Every device you can see.
    #[arg(long)]
    all: bool,
    /// Cumulative percentages per phase.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100")]
    phases: Vec<f64>,
    /// Instead of --phases: START,FACTOR, e.g. 1,2 for 1%, 2%, 4%, ... 100%.
    #[arg(long, value_delimiter = ',')]
    exponential: Option<Vec<f64>>,
    /// Daily UTC maintenance window START-END, e.g. 23:00-01:00.
    #[arg(long)]
    window: Option<String>,
    #[arg(long, default_value_t = 0.95)]
    success_threshold: f64,
    #[arg(long, default_value_t = 0.2)]
    failure_threshold: f64,
    #[arg(long, default_value_t = 1)]
    min_failures: usize,
    /// Seconds a device may take before it counts as failed.
    #[arg(long, default_value_t = 1800)]
    device_timeout: u64,
    /// Seconds after its phase starts that an offline device is skipped (and offered later,
    /// when it returns).
    #[arg(long, default_value_t = 3600)]
    wait_timeout: u64,
    /// What crossing the failure threshold does: stop, or pause (resume overrides either).
    #[arg(long, value_parser = ["stop", "pause"], default_value = "stop")]
    on_failure: String,
    #[arg(long, default_value_t = 100)]
    max_concurrent: usize,
    /// Unix milliseconds before which nothing is offered.
    #[arg(long)]
    start_at: Option<u64>,
}

/// Uploads a signed release: the manifest first (the server checks its signature), then the
/// image (checked against the manifest).
pub async fn publish(
    api: &Api,
    firmware: &PathBuf,
    manifest: Option<&PathBuf>,
    json_out: bool,
) -> Result<(), ApiFailure> {
    let manifest_path = manifest
        .cloned()
        .unwrap_or_else(|| PathBuf::from(format!("{}.manifest.json", firmware.display())));
    let signed: Value = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .map_err(|e| ApiFailure::usage(format!("reading {}: {e}", manifest_path.display())))?,
    )
    .map_err(|e| {
        ApiFailure::usage(format!(
            "{} is not a manifest: {e}",
            manifest_path.display()
        ))
    })?;
    let image = std::fs::read(firmware)
        .map_err(|e| ApiFailure::usage(format!("reading {}: {e}", firmware.display())))?;
    let release = api.post("/api/releases", &signed).await?;
    let version = release["version"].as_str().unwrap_or_default().to_string();
    let ready = api
        .put_bytes(&format!("/api/releases/{}/image", segment(&version)), image)
        .await?;
    print_out(json_out, &ready, |r| {
        println!(
            "published {} for {} ({} bytes)",
            r["version"].as_str().unwrap_or_default(),
            r["hardware"].as_str().unwrap_or_default(),
            r["size"]
        )
    });
    Ok(())
}

pub async fn run_ota(api: &Api, cmd: OtaCmd, json_out: bool) -> Result<(), ApiFailure> {
    match cmd {
        OtaCmd::Send {
            device,
            version,
            force,
        } => {
            let r = api
                .post(
                    &format!("/api/ota/{}/start", segment(&device)),
                    &json!({ "version": version, "force": force }),
                )
                .await?;
            print_out(json_out, &r, |r| {
                println!(
                    "offered {} to {device}: update {} ({})",
                    r["version"].as_str().unwrap_or_default(),
                    r["id"].as_str().unwrap_or_default(),
                    r["state"].as_str().unwrap_or_default()
                )
            });
        }
        OtaCmd::Cancel { device } => {
            let r = api
                .post(&format!("/api/ota/{}/cancel", segment(&device)), &json!({}))
                .await?;
            print_out(json_out, &r, |r| {
                println!(
                    "cancelled update {} ({}) of {device}",
                    r["id"].as_str().unwrap_or_default(),
                    r["version"].as_str().unwrap_or_default()
                )
            });
        }
        OtaCmd::Check { device } => {
            let r = api
                .get(&format!("/api/ota/{}/check", segment(&device)))
                .await?;
            print_out(json_out, &r, crate::table::key_values);
        }
        OtaCmd::History { device } => {
            let r = api
                .get(&format!("/api/ota/{}/history", segment(&device)))
                .await?;
            print_out(json_out, &r, |r| {
                for u in r["updates"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  {}  {}",
                        u["id"].as_str().unwrap_or_default(),
                        u["version"].as_str().unwrap_or_default(),
                        u["state"].as_str().unwrap_or_default(),
                        u["error"].as_str().unwrap_or_default()
                    );
                }
            });
        }
        OtaCmd::Distribution => {
            let r = api.get("/api/firmware/distribution").await?;
            print_out(json_out, &r, |r| {
                for v in r["versions"].as_array().into_iter().flatten() {
                    println!(
                        "{:<12} {}",
                        v["version"].as_str().unwrap_or("unknown"),
                        v["devices"]
                    );
                }
            });
        }
    }
    Ok(())
}

pub async fn run_rollout(api: &Api, cmd: RolloutCmd, json_out: bool) -> Result<(), ApiFailure> {
    let (path, body) = match cmd {
        RolloutCmd::Create(n) => {
            let target = match (n.hardware, n.tag, n.devices, n.all) {
                (Some(h), None, None, false) => json!({ "hardware": h }),
                (None, Some(t), None, false) => json!({ "tag": t }),
                (None, None, Some(d), false) => json!({ "devices": d }),
                (None, None, None, true) => json!({ "all": true }),
                _ => {
                    return Err(ApiFailure::usage(
                        "name the target: --hardware, --tag, --devices or --all",
                    ));
                }
            };
            let mut body = json!({
                "version": n.version,
                "target": target,
                "phases": n.phases,
                "successThreshold": n.success_threshold,
                "failureThreshold": n.failure_threshold,
                "minFailures": n.min_failures,
                "deviceTimeoutSecs": n.device_timeout,
                "waitTimeoutSecs": n.wait_timeout,
                "onFailure": n.on_failure,
                "maxConcurrent": n.max_concurrent,
            });
            if let Some(t) = n.start_at {
                body["startAt"] = json!(t);
            }
            if let Some(e) = n.exponential {
                if e.len() != 2 {
                    return Err(ApiFailure::usage("--exponential is START,FACTOR, e.g. 1,2"));
                }
                body["exponential"] = json!({ "startPercent": e[0], "factor": e[1] });
                if let Some(obj) = body.as_object_mut() {
                    obj.remove("phases");
                }
            }
            if let Some(w) = n.window {
                let (start, end) = w
                    .split_once('-')
                    .ok_or_else(|| ApiFailure::usage("--window is START-END, e.g. 23:00-01:00"))?;
                body["maintenanceWindow"] = json!({ "start": start, "end": end });
            }
            ("/api/rollouts".to_string(), Some(body))
        }
        RolloutCmd::List => ("/api/rollouts".to_string(), None),
        RolloutCmd::Show { id } => (format!("/api/rollouts/{}", segment(&id)), None),
        RolloutCmd::Pause { id } => (
            format!("/api/rollouts/{}/pause", segment(&id)),
            Some(Value::Null),
        ),
        RolloutCmd::Resume { id } => (
            format!("/api/rollouts/{}/resume", segment(&id)),
            Some(Value::Null),
        ),
        RolloutCmd::Abort { id } => (
            format!("/api/rollouts/{}/abort", segment(&id)),
            Some(Value::Null),
        ),
    };
    let r = match body {
        Some(b) => api.post(&path, &b).await?,
        None => api.get(&path).await?,
    };
    print_out(json_out, &r, |r| {
        let one = |r: &Value| {
            let p = &r["progress"];
            println!(
                "{}  {}  {}  phase {}  waiting {}  in flight {}  succeeded {}  failed {}",
                r["id"].as_str().unwrap_or_default(),
                r["version"].as_str().unwrap_or_default(),
                p["state"].as_str().unwrap_or_default(),
                p["phase"]
                    .as_u64()
                    .map_or("-".to_string(), |x| (x + 1).to_string()),
                p["waiting"],
                p["inFlight"],
                p["succeeded"],
                p["failed"]
            )
        };
        match r.as_array() {
            Some(list) => list.iter().for_each(one),
            None => one(r),
        }
    });
    Ok(())
}
