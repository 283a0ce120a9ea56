//! Plain-text tables for humans.

use serde_json::Value;

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn span(s: i64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn age(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "never".into();
    };
    format!("{} ago", span((now_ms() - ms).max(0) / 1000))
}

/// How long until a Unix-ms moment, or how long ago it passed.
fn until(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "-".into();
    };
    let s = (ms - now_ms()) / 1000;
    if s >= 0 {
        format!("in {}", span(s))
    } else {
        format!("{} ago", span(-s))
    }
}

fn rows_of(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

/// The security report, one section per finding; empty sections say so.
pub fn security(report: &Value) {
    let section =
        |title: &str, list: &Value, headers: &[&str], row: &dyn Fn(&Value) -> Vec<String>| {
            let rows = rows_of(list, row);
            println!("{title}: {}", rows.len());
            if !rows.is_empty() {
                print(headers, rows);
            }
            println!();
        };
    let days = cell(&report["horizonDays"]);
    section(
        &format!("Certificates expiring within {days} days"),
        &report["expiringCertificates"],
        &["DEVICE", "EXPIRES", "RENEWAL", "ONLINE", "LAST SEEN"],
        &|e| {
            vec![
                cell(&e["deviceId"]),
                until(&e["notAfter"]),
                if e["renewalPending"] == true {
                    "pending"
                } else {
                    "-"
                }
                .into(),
                cell(&e["online"]),
                age(&e["lastSeen"]),
            ]
        },
    );
    section(
        "Blocked or revoked devices still connected",
        &report["deniedButConnected"],
        &["DEVICE", "BLOCKED", "REVOKED", "LAST SEEN"],
        &|d| {
            vec![
                cell(&d["deviceId"]),
                cell(&d["blocked"]),
                cell(&d["revoked"]),
                age(&d["lastSeen"]),
            ]
        },
    );
    section(
        "Devices in crash loops",
        &report["crashLoops"],
        &["DEVICE", "CRASHES", "UPTIME", "FIRMWARE", "LAST SEEN"],
        &|c| {
            vec![
                cell(&c["deviceId"]),
                cell(&c["crashes"]),
                c["uptime"].as_i64().map_or("-".into(), span),
                cell(&c["firmwareVersion"]),
                age(&c["lastSeen"]),
            ]
        },
    );
    section(
        "Devices never seen since provisioning",
        &report["neverSeen"],
        &["DEVICE", "NAME", "REGISTERED"],
        &|n| vec![cell(&n["deviceId"]), cell(&n["name"]), age(&n["createdAt"])],
    );
}

pub fn devices(list: &Value) {
    let rows = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    vec![
                        cell(&d["deviceId"]),
                        cell(&d["name"]),
                        if d["online"].as_bool() == Some(true) {
                            "online".into()
                        } else {
                            "offline".into()
                        },
                        age(&d["lastSeen"]),
                        cell(&d["firmwareVersion"]),
                        cell(&d["led"]),
                        if d["blocked"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print(
        &[
            "DEVICE",
            "NAME",
            "STATE",
            "LAST SEEN",
            "FIRMWARE",
            "LED",
            "BLOCKED",
        ],
        rows,
    );
}

pub fn audit(list: &Value) {
    let rows = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    vec![
                        cell(&e["id"]),
                        age(&e["at"]),
                        cell(&e["actor"]),
                        cell(&e["action"]),
                        cell(&e["target"]),
                        cell(&e["result"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print(&["ID", "WHEN", "ACTOR", "ACTION", "TARGET", "RESULT"], rows);
}

pub fn key_values(v: &Value) {
    if let Some(map) = v.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in map {
            println!("{k:<width$}  {}", cell(v));
        }
    }
}

/// A device's twin: each field desired and reported, and whether they agree.
pub fn device_config(view: &Value) {
    let fields = [
        "telemetry_interval_s",
        "heartbeat_interval_s",
        "pot",
        "switch",
        "temp",
    ];
    let rows = fields
        .iter()
        .map(|f| {
            let differs = view["differences"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == f));
            vec![
                f.to_string(),
                cell(&view["desired"][f]),
                cell(&view["reported"][f]),
                if differs { "differs" } else { "" }.to_string(),
            ]
        })
        .collect();
    print(&["FIELD", "DESIRED", "REPORTED", ""], rows);
    let sync = if view["inSync"] == true {
        "in sync"
    } else {
        "not in sync"
    };
    println!("{sync}; reported {}", age(&view["reportedAt"]));
}
