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

fn age(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
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
