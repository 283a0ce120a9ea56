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
        "One command: queued, delivered, succeeded, failed or expired",
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
        "get",
        "/api/admin/audit",
        "Audit log, newest first (?limit=&action=)",
        Auth::Admin,
        None,
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
        "Create a staged rollout: {version, target: {hardware|tag|devices|all}, phases or exponential {startPercent, factor}, successThreshold, failureThreshold, minFailures, deviceTimeoutSecs, maxConcurrent, startAt, maintenanceWindow {start, end}}",
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
        "pause, resume or abort a rollout",
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

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, auth, body, status) in OPERATIONS {
        let mut op = json!({
            "summary": summary,
            "responses": {
                status.to_string(): { "description": "success" },
                "400": { "description": "invalid input; the body's `error` says what to fix" },
            },
        });
        if *auth != Auth::None {
            op["security"] = json!([{ "bearer": [] }]);
            op["responses"]["401"] = json!({ "description": "missing, invalid or expired token" });
        }
        if *auth == Auth::Admin {
            op["responses"]["403"] = json!({ "description": "admin role required" });
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
