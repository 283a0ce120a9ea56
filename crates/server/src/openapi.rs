//! The OpenAPI 3.1 description of the user API and the device listener, built from one table
//! so that a test can check every documented operation is really routed.

use serde_json::{Map, Value, json};

/// (method, path, summary, auth, request body schema, success status)
pub type Operation = (
    &'static str,
    &'static str,
    &'static str,
    Auth,
    Option<fn() -> Value>,
    u16,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    User,
    Admin,
    ProvisioningToken,
    DeviceCertificate,
}

fn s(t: &str) -> Value {
    json!({ "type": t })
}

fn object(props: &[(&str, Value)], required: &[&str]) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert((*k).into(), v.clone());
    }
    json!({ "type": "object", "properties": p, "required": required })
}

pub const OPERATIONS: &[Operation] = &[
    (
        "post",
        "/api/auth/register",
        "Create an account (operator role)",
        Auth::None,
        Some(|| {
            object(
                &[
                    ("username", s("string")),
                    ("email", s("string")),
                    ("password", s("string")),
                ],
                &["username", "email", "password"],
            )
        }),
        201,
    ),
    (
        "post",
        "/api/auth/login",
        "Log in; returns {\"token\": JWT}",
        Auth::None,
        Some(|| {
            object(
                &[("email", s("string")), ("password", s("string"))],
                &["email", "password"],
            )
        }),
        200,
    ),
    (
        "post",
        "/api/device/register",
        "Register a device to the caller",
        Auth::User,
        Some(|| {
            object(
                &[("deviceId", s("string")), ("name", s("string"))],
                &["deviceId", "name"],
            )
        }),
        201,
    ),
    (
        "get",
        "/api/device",
        "The caller's devices with online state, last seen, firmware and LED",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/device/{deviceId}",
        "One device",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/device/{deviceId}/telemetry",
        "Latest telemetry readings (?limit=)",
        Auth::User,
        None,
        200,
    ),
    (
        "post",
        "/api/device/{deviceId}/led",
        "Switch the LED (a `led` command)",
        Auth::User,
        Some(|| object(&[("state", json!({ "enum": ["ON", "OFF"] }))], &["state"])),
        202,
    ),
    (
        "post",
        "/api/device/{deviceId}/commands",
        "Send a command: led, led_brightness, sensor, reboot, ping",
        Auth::User,
        Some(|| {
            object(
                &[
                    ("name", s("string")),
                    ("args", s("object")),
                    ("ttlSeconds", s("integer")),
                ],
                &["name"],
            )
        }),
        202,
    ),
    (
        "get",
        "/api/device/{deviceId}/commands",
        "Commands sent to a device, newest first",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/device/{deviceId}/commands/{commandId}",
        "One command: queued, delivered, succeeded, failed or expired (?wait=SECS, at most 30: answers once it finished, or when the wait ends)",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/dashboard",
        "Counts, firmware distribution and devices",
        Auth::User,
        None,
        200,
    ),
    (
        "post",
        "/api/provisioning/tokens",
        "Create a one-time provisioning token",
        Auth::User,
        Some(|| {
            object(
                &[("deviceId", s("string")), ("ttlSeconds", s("integer"))],
                &[],
            )
        }),
        201,
    ),
    (
        "get",
        "/api/admin/users",
        "All users",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/devices",
        "All devices",
        Auth::Admin,
        None,
        200,
    ),
    (
        "post",
        "/api/admin/user/{userId}/block",
        "Block or unblock a user (toggle)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "post",
        "/api/admin/user/{userId}/role",
        "Set a user's role",
        Auth::Admin,
        Some(|| {
            object(
                &[("role", json!({ "enum": ["admin", "operator", "viewer"] }))],
                &["role"],
            )
        }),
        200,
    ),
    (
        "post",
        "/api/admin/device/{deviceId}/block",
        "Block or unblock a device (toggle); a blocked device is disconnected",
        Auth::Admin,
        None,
        200,
    ),
    (
        "post",
        "/api/admin/device/{deviceId}/revoke",
        "Revoke a device's certificate: disconnected, and refused until provisioned again (409 when it holds none)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/audit",
        "Audit log, newest first (?limit=&action=)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/audit/chain",
        "The audit hash chain, oldest first: records after seq `after` (0), at most `limit` (1,000; 10,000), each with its seq, prevHash and hash (what `flotilla audit verify` checks)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/audit/checkpoints",
        "Signed audit checkpoints (seq, hash, at, removed, signature by the CA key): where removed records ended, and heads the log must still reach",
        Auth::Admin,
        None,
        200,
    ),
    (
        "post",
        "/api/admin/audit/exported",
        "Mark the audit log exported from after seq `after` through seq `through` (clamped to the head, never lowered; 409 when `after` is past the mark, a gap nobody holds): retention may then remove those records once old enough; audited",
        Auth::Admin,
        Some(|| {
            object(
                &[
                    ("after", json!({ "type": "integer", "minimum": 0 })),
                    ("through", json!({ "type": "integer", "minimum": 0 })),
                ],
                &["after", "through"],
            )
        }),
        200,
    ),
    (
        "get",
        "/api/admin/dead-letters",
        "Device messages that could not be stored, with the reason, newest first (?limit=)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/ca.pem",
        "The device CA certificate",
        Auth::None,
        None,
        200,
    ),
    (
        "get",
        "/api/openapi.json",
        "This document",
        Auth::None,
        None,
        200,
    ),
    ("get", "/healthz", "Liveness", Auth::None, None, 200),
    (
        "post",
        "/sign-csr",
        "Device listener (HTTPS): exchange a CSR and a one-time token for a certificate",
        Auth::ProvisioningToken,
        Some(|| {
            object(
                &[("device_id", s("string")), ("csr", s("string"))],
                &["device_id", "csr"],
            )
        }),
        200,
    ),
    (
        "post",
        "/renew",
        "Device listener (HTTPS, the device's current certificate): a certificate for the key in a fresh CSR; the old one stays valid until the new one is used",
        Auth::DeviceCertificate,
        Some(|| object(&[("csr", s("string"))], &["csr"])),
        200,
    ),
    (
        "post",
        "/renew/confirm",
        "Device listener (HTTPS, the renewed certificate): it is in use, so the one it renewed is revoked",
        Auth::DeviceCertificate,
        None,
        200,
    ),
    (
        "get",
        "/api/device/{deviceId}/config",
        "The device twin: desired and reported configuration, inSync and the fields that differ",
        Auth::User,
        None,
        200,
    ),
    (
        "put",
        "/api/device/{deviceId}/config",
        "Replace the desired configuration (intervals 1 to 86400 s, sensor switches); published retained on devices/{id}/config",
        Auth::User,
        Some(|| {
            object(
                &[
                    ("telemetry_interval_s", s("integer")),
                    ("heartbeat_interval_s", s("integer")),
                    ("pot", s("boolean")),
                    ("switch", s("boolean")),
                    ("temp", s("boolean")),
                ],
                &[],
            )
        }),
        200,
    ),
    (
        "put",
        "/api/device/{deviceId}/tags",
        "Replace a device's tags (rollouts can target a tag)",
        Auth::User,
        Some(|| {
            object(
                &[("tags", json!({"type": "array", "items": s("string")}))],
                &["tags"],
            )
        }),
        200,
    ),
    (
        "post",
        "/api/releases",
        "Publish a release: its signed manifest, verified against the trusted release keys",
        Auth::Admin,
        Some(|| {
            object(
                &[("manifest", s("string")), ("signature", s("string"))],
                &["manifest", "signature"],
            )
        }),
        201,
    ),
    (
        "get",
        "/api/releases",
        "Releases, newest version first",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/releases/blocked",
        "Blocked versions (seed's blocked_versions.json)",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/releases/{version}",
        "One release",
        Auth::User,
        None,
        200,
    ),
    (
        "put",
        "/api/releases/{version}/image",
        "Upload a release's image (application/octet-stream); checked against the manifest",
        Auth::Admin,
        None,
        200,
    ),
    (
        "post",
        "/api/releases/{version}/block",
        "Block (never offered; rollouts of it abort) or unblock a release",
        Auth::Admin,
        Some(|| {
            object(
                &[("blocked", s("boolean")), ("reason", s("string"))],
                &["blocked"],
            )
        }),
        200,
    ),
    (
        "get",
        "/api/ota/{deviceId}/check",
        "{\"updateAvailable\", \"latestVersion\", \"currentVersion\"}",
        Auth::User,
        None,
        200,
    ),
    (
        "post",
        "/api/ota/{deviceId}/start",
        "Offer a release to a device (default: the latest); optional {version, force}",
        Auth::User,
        None,
        202,
    ),
    (
        "post",
        "/api/ota/{deviceId}/cancel",
        "Cancel the device's open update and tell the device (it stops downloading and reports FAILED); 409 once its image is all downloaded (past recall: its outcome follows); a rollout's target waits again; audited",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/ota/{deviceId}/history",
        "A device's updates with every status it reported",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/firmware/distribution",
        "Devices per running firmware version",
        Auth::User,
        None,
        200,
    ),
    (
        "post",
        "/api/rollouts",
        "Create a staged rollout: {version, target: {hardware|tag|devices|all}, phases or exponential {startPercent, factor}, successThreshold, failureThreshold, minFailures, deviceTimeoutSecs, waitTimeoutSecs (offline targets skipped after), onFailure (stop|pause), maxConcurrent, startAt, maintenanceWindow {start, end}, health {maxCrashRatio, maxRebootRatio, minHeartbeatRatio, minObservedSecs, minEvents}}",
        Auth::User,
        Some(|| {
            object(
                &[
                    ("version", s("string")),
                    ("target", s("object")),
                    ("phases", json!({"type": "array", "items": s("number")})),
                ],
                &["version", "target"],
            )
        }),
        201,
    ),
    (
        "get",
        "/api/rollouts",
        "Rollouts with progress",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/rollouts/{id}",
        "A rollout: state, phase, counts per state",
        Auth::User,
        None,
        200,
    ),
    (
        "post",
        "/api/rollouts/{id}/{action}",
        "pause, resume or abort a rollout; resume also overrides a rollout that stopped or paused itself (the failures so far are forgiven). 202 when another replica leads and has not carried it out within 5 s",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/stats",
        "Fleet-wide counts; `storage`: rows per kind retention removes, audit records and checkpoints, database bytes, and what the last retention run of each kind removed",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/admin/security",
        "Fleet security report: certificates expiring within `days` (30), blocked or revoked devices still connected, devices with at least `crashes` (3) crashed boots, devices never seen since provisioning",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/metrics",
        "Prometheus text format: ingest counters and commit latency, fleet gauges (admin JWT or the FLOTILLA_METRICS_TOKEN bearer)",
        Auth::Admin,
        None,
        200,
    ),
    (
        "get",
        "/api/releases/{version}/download",
        "A presigned URL for a release image in the S3 bucket",
        Auth::User,
        None,
        200,
    ),
    (
        "get",
        "/firmware/{version}",
        "Device listener (HTTPS, client certificate): a release image; HTTP Range supported",
        Auth::DeviceCertificate,
        None,
        200,
    ),
];

/// The error statuses an operation can answer besides the ones its kind implies (401 and 403
/// for a missing token or a blocked account on authenticated operations, 400 for a malformed
/// path parameter). Checked against the running server by `crates/e2e/tests/openapi_property.rs`.
pub fn errors(method: &str, path: &str) -> &'static [u16] {
    match (method, path) {
        ("post", "/api/auth/register") => &[400, 409, 413, 429],
        ("post", "/api/auth/login") => &[400, 401, 403, 413, 429],
        ("post", "/api/device/register") => &[400, 404, 409, 413],
        ("get", "/api/device/{deviceId}") => &[404],
        ("get", "/api/device/{deviceId}/telemetry") => &[400, 404],
        ("post", "/api/device/{deviceId}/led") => &[400, 404, 409, 413],
        ("post", "/api/device/{deviceId}/commands") => &[400, 404, 409, 413],
        ("get", "/api/device/{deviceId}/commands") => &[404],
        ("get", "/api/device/{deviceId}/commands/{commandId}") => &[400, 404],
        ("post", "/api/provisioning/tokens") => &[400, 409, 413],
        ("post", "/api/admin/user/{userId}/block") => &[404, 409],
        ("post", "/api/admin/user/{userId}/role") => &[400, 404, 409, 413],
        ("post", "/api/admin/device/{deviceId}/block") => &[404],
        ("post", "/api/admin/device/{deviceId}/revoke") => &[404, 409],
        ("get", "/api/admin/audit") | ("get", "/api/admin/dead-letters") => &[400],
        ("get", "/api/admin/audit/chain") => &[400],
        ("post", "/api/admin/audit/exported") => &[400, 409, 413],
        ("post", "/sign-csr") => &[400, 401, 403, 409, 413, 429],
        ("post", "/renew") => &[400, 401, 403, 413, 429],
        ("post", "/renew/confirm") => &[401, 403],
        ("get", "/api/admin/security") => &[400],
        ("put", "/api/device/{deviceId}/tags") => &[400, 404, 413],
        ("get", "/api/device/{deviceId}/config") => &[404],
        ("put", "/api/device/{deviceId}/config") => &[400, 404, 413],
        ("post", "/api/releases") => &[400, 409, 413],
        ("get", "/api/releases/{version}") => &[404],
        ("get", "/api/releases/{version}/download") => &[404, 409],
        ("put", "/api/releases/{version}/image") => &[400, 404, 409],
        ("post", "/api/releases/{version}/block") => &[400, 404, 413],
        ("get", "/api/ota/{deviceId}/check") => &[404],
        ("post", "/api/ota/{deviceId}/start") => &[400, 404, 409, 413],
        ("get", "/api/ota/{deviceId}/history") => &[404],
        ("post", "/api/ota/{deviceId}/cancel") => &[404, 409],
        ("post", "/api/rollouts") => &[400, 404, 409, 413],
        ("get", "/api/rollouts/{id}") => &[404],
        ("post", "/api/rollouts/{id}/{action}") => &[202, 404, 409],
        ("get", "/firmware/{version}") => &[206, 401, 403, 404, 410, 416],
        _ => &[],
    }
}

fn describe(status: u16) -> &'static str {
    match status {
        206 => "part of the image (HTTP Range)",
        400 => "invalid input; `error` says what to fix",
        401 => "missing, invalid or expired credentials",
        403 => "not allowed for this role, or the account is blocked",
        404 => "no such resource (or not visible to the caller)",
        409 => "conflicts with the current state; `error` says which",
        410 => "the release is blocked",
        413 => "request body too large",
        416 => "range not satisfiable",
        429 => "too many attempts; try again later",
        503 => "the database is unavailable; try again after Retry-After seconds",
        _ => "error",
    }
}

/// Every status an operation can answer, success first.
pub fn statuses(op: &Operation) -> Vec<u16> {
    let (method, path, _, auth, _, success) = op;
    let mut all = vec![*success];
    all.extend_from_slice(errors(method, path));
    if matches!(auth, Auth::User | Auth::Admin) {
        all.extend([401, 403]);
    }
    if path.contains('{') {
        all.push(400);
    }
    // Everything but these reads the database.
    if !matches!(*path, "/ca.pem" | "/api/openapi.json" | "/healthz") {
        all.push(503);
    }
    all.sort_unstable();
    all.dedup();
    all
}

pub fn document() -> Value {
    let error_body = json!({
        "application/json": { "schema": object(&[("error", s("string"))], &["error"]) }
    });
    let mut paths = Map::new();
    for op in OPERATIONS {
        let (method, path, summary, auth, body, success) = op;
        let mut responses = Map::new();
        for status in statuses(op) {
            let response = if status == *success || status == 206 {
                json!({ "description": "success" })
            } else {
                json!({ "description": describe(status), "content": error_body })
            };
            responses.insert(status.to_string(), response);
        }
        let mut op = json!({ "summary": summary, "responses": responses });
        if matches!(auth, Auth::User | Auth::Admin | Auth::ProvisioningToken) {
            op["security"] = json!([{ "bearer": [] }]);
        }
        if let Some(schema) = body {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": schema() } } });
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Flotilla API", "version": env!("CARGO_PKG_VERSION") },
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } } },
        "paths": paths,
    })
}
