//! The OpenAPI document is the truth: random requests built from the document itself
//! (structured JSON bodies from each operation's schema, mutated: missing and extra fields,
//! wrong types, huge and odd strings; odd path parameters and queries; every kind of caller)
//! get only statuses the document lists for that operation, never a 5xx, and every error has
//! the documented `{"error": ...}` body.

use std::collections::BTreeSet;

use flotilla_e2e::Server;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

const PATH_VALUES: &[&str] = &[
    "prop-dev",
    "no-such-device",
    "1",
    "2",
    "-1",
    "99999999999999999999999",
    "%ff%fe",
    "%00",
    "a%2Fb",
    "v1.0.0",
    "1.0.0",
    "ota-0000",
    "pause",
    "resume",
    "abort",
    "explode",
    "%E2%82%AC",
];

fn odd_string(rng: &mut StdRng) -> Value {
    let choices: [&dyn Fn(&mut StdRng) -> String; 7] = [
        &|_| String::new(),
        &|_| "prop-dev".into(),
        &|_| "a\u{0}b".into(),
        &|_| "ÿ€💥".repeat(20),
        &|r| "x".repeat(r.random_range(60..300)),
        &|_| "x".repeat(70 * 1024),
        &|r| format!("{}", r.random::<u32>()),
    ];
    Value::String(choices[rng.random_range(0..choices.len())](rng))
}

fn value_for(schema: &Value, rng: &mut StdRng) -> Value {
    // Wrong types as often as right ones.
    match rng.random_range(0..10) {
        0 => return Value::Null,
        1 => return json!(rng.random_range(-5i64..5)),
        2 => return json!([1, "two", null]),
        3 => return json!({"nested": {"deeper": [true]}}),
        _ => {}
    }
    match schema["type"].as_str() {
        Some("integer") => json!([0i64, 1, 60, 3600, -1, i64::MAX, 101][rng.random_range(0..7)]),
        Some("boolean") => json!(rng.random_bool(0.5)),
        Some("object") => body_from(schema, rng),
        Some("array") => json!(["a", "b"]),
        _ => match rng.random_range(0..3) {
            0 => json!(
                [
                    "ON", "OFF", "operator", "viewer", "admin", "ping", "reboot", "led"
                ][rng.random_range(0..8)]
            ),
            _ => odd_string(rng),
        },
    }
}

fn body_from(schema: &Value, rng: &mut StdRng) -> Value {
    let mut out = Map::new();
    if let Some(props) = schema["properties"].as_object() {
        for (name, prop) in props {
            if rng.random_bool(0.8) {
                out.insert(name.clone(), value_for(prop, rng));
            }
        }
    }
    if rng.random_bool(0.2) {
        out.insert("unexpected".into(), json!("field"));
    }
    Value::Object(out)
}

/// A request body for the operation: mostly JSON built from its schema, sometimes not JSON.
fn body(op: &Value, rng: &mut StdRng) -> Option<Vec<u8>> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    match rng.random_range(0..12) {
        0 => Some(b"not json at all".to_vec()),
        1 => Some(Vec::new()),
        2 => Some(b"[]".to_vec()),
        3 => Some(vec![b'{'; 80 * 1024]),
        _ if schema.is_object() => Some(serde_json::to_vec(&body_from(schema, rng)).ok()?),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_get_only_documented_statuses_and_never_a_5xx() -> anyhow::Result<()> {
    let iterations: usize = std::env::var("FLOTILLA_API_PROPERTY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("FLOTILLA_API_PROPERTY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (FLOTILLA_API_PROPERTY_SEED to replay), {iterations} cases");
    let mut rng = StdRng::seed_from_u64(seed);

    let server = Server::start(&[]).await?;
    let admin = server.admin("prop-admin@example.com").await?;
    let operator = server.user("prop-op@example.com").await?;
    let viewer = server.user("prop-viewer@example.com").await?;
    let viewer_id = server.user_id(&admin, "prop-viewer@example.com").await?;
    server
        .call(
            "POST",
            &format!("/api/admin/user/{viewer_id}/role"),
            Some(&admin),
            Some(json!({"role": "viewer"})),
        )
        .await?;
    server.enroll(&operator, "prop-dev").await?;
    let callers = [
        None,
        Some("garbage.token.here".to_string()),
        Some(operator),
        Some(admin),
        Some(viewer),
    ];

    let (_, doc) = server.call("GET", "/api/openapi.json", None, None).await?;
    let mut ops = Vec::new();
    for (path, methods) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in methods.as_object().into_iter().flatten() {
            let documented: BTreeSet<u16> = op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.parse().ok())
                .collect();
            ops.push((method.clone(), path.clone(), op.clone(), documented));
        }
    }
    assert!(
        ops.len() > 30,
        "the document lists {} operations",
        ops.len()
    );
    // A connection per request: the server closes one after refusing an oversized body, and a
    // pooled connection would carry that into the next case.
    let user_api = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?;
    let device_api = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem().as_bytes())?)
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?;

    let mut failures = Vec::new();
    let mut seen: BTreeSet<(String, u16)> = BTreeSet::new();
    for case in 0..iterations {
        let (method, path, op, documented) = &ops[rng.random_range(0..ops.len())];
        let concrete: String = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    PATH_VALUES[rng.random_range(0..PATH_VALUES.len())].to_string()
                } else {
                    seg.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let query = if method == "get" && rng.random_bool(0.3) {
            [
                "?limit=abc",
                "?limit=-5",
                "?limit=10",
                "?limit=99999999999999999999",
                "?action=x",
            ][rng.random_range(0..5)]
        } else {
            ""
        };
        let on_device_listener =
            path == "/sign-csr" || path.starts_with("/renew") || path.starts_with("/firmware");
        let (client, base) = if on_device_listener {
            (&device_api, server.backend_url())
        } else {
            (&user_api, server.http.clone())
        };
        let url = format!("{base}{concrete}{query}");
        let mut req = match method.as_str() {
            "get" => client.get(&url),
            "post" => client.post(&url),
            "put" => client.put(&url),
            other => panic!("method {other}"),
        };
        if let Some(token) = &callers[rng.random_range(0..callers.len())] {
            req = req.bearer_auth(token);
        }
        let sent_body = body(op, &mut rng);
        if let Some(b) = &sent_body {
            req = req
                .header("content-type", "application/json")
                .body(b.clone());
        }
        let oversized = sent_body.as_ref().is_some_and(|b| b.len() > 64 * 1024);
        let resp = match req.send().await {
            Ok(r) => r,
            // The server refuses an oversized body before reading it all and may close the
            // connection while the client is still sending: the refusal is what counts.
            Err(_) if oversized => continue,
            Err(e) => return Err(e.into()),
        };
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        seen.insert((format!("{method} {path}"), status));
        let bad_status = status >= 500 || !documented.contains(&status);
        let bad_body = (400..500).contains(&status)
            && serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .is_none();
        if bad_status || bad_body {
            let body_hint = sent_body
                .as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
            failures.push(format!(
                "case {case}: {} {url} -> {status} (documented {documented:?}) body {:?} sent {body_hint:?}",
                method.to_uppercase(),
                text.chars().take(200).collect::<String>()
            ));
        }
    }
    eprintln!("{} distinct (operation, status) pairs seen", seen.len());
    assert!(
        failures.is_empty(),
        "{} of {iterations} requests broke the document (seed {seed}):\n{}",
        failures.len(),
        failures[..failures.len().min(25)].join("\n")
    );
    Ok(())
}
