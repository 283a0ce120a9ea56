//! The HTTP client and the saved session.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A failure with the message and exit code the user sees.
#[derive(Debug)]
pub struct ApiFailure {
    pub message: String,
    pub exit_code: u8,
}

impl ApiFailure {
    pub fn other(message: impl Into<String>) -> Self {
        ApiFailure {
            message: message.into(),
            exit_code: 1,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        ApiFailure {
            message: message.into(),
            exit_code: 2,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct Session {
    pub url: String,
    pub token: String,
}

impl Session {
    fn path() -> PathBuf {
        if let Some(p) = std::env::var_os("FLOTILLA_SESSION") {
            return PathBuf::from(p);
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("flotilla").join("session.json")
    }

    /// Saves the session owner-only: the token is a credential.
    pub fn save(&self) -> Result<(), ApiFailure> {
        use std::io::Write;
        let path = Self::path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiFailure::other(format!("creating {}: {e}", dir.display())))?;
        }
        let _ = std::fs::remove_file(&path);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options
            .open(&path)
            .map_err(|e| ApiFailure::other(format!("writing {}: {e}", path.display())))?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())
            .map_err(|e| ApiFailure::other(e.to_string()))
    }

    fn load() -> Option<Session> {
        serde_json::from_slice(&std::fs::read(Self::path()).ok()?).ok()
    }
}

pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> Result<Api, ApiFailure> {
        if let Some(host) = plain_http_to_remote(url) {
            eprintln!(
                "warning: {host} is reached over plain HTTP: the password and session token cross the network readable; use https://"
            );
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| ApiFailure::other(e.to_string()))?;
        Ok(Api {
            base: url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// The saved session, with `FLOTILLA_TOKEN` and `--url` taking precedence.
    pub fn from_session(url: Option<&str>) -> Result<Api, ApiFailure> {
        let session = Session::load();
        let token = std::env::var("FLOTILLA_TOKEN")
            .ok()
            .or_else(|| session.as_ref().map(|s| s.token.clone()));
        let url = url
            .map(str::to_string)
            .or_else(|| session.as_ref().map(|s| s.url.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        if token.is_none() {
            return Err(ApiFailure {
                message: "not logged in: run `flotilla login --email ... --password ...`".into(),
                exit_code: 3,
            });
        }
        Api::new(&url, token)
    }

    pub async fn get(&self, path: &str) -> Result<Value, ApiFailure> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// A text resource (the CA certificate), not JSON.
    pub async fn get_text(&self, path: &str) -> Result<String, ApiFailure> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ApiFailure::other(format!("cannot reach {}: {e}", self.base)))?;
        if !resp.status().is_success() {
            return Err(ApiFailure::other(format!(
                "{url}: HTTP {}",
                resp.status().as_u16()
            )));
        }
        resp.text()
            .await
            .map_err(|e| ApiFailure::other(format!("reading {url}: {e}")))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiFailure> {
        let req = self.http.post(format!("{}{path}", self.base));
        let req = if body.is_null() { req } else { req.json(body) };
        self.send(req).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value, ApiFailure> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Uploads raw bytes (a firmware image).
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Value, ApiFailure> {
        let req = self
            .http
            .put(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(std::time::Duration::from_secs(600))
            .body(bytes);
        self.send(req).await
    }

    async fn send(&self, mut req: reqwest::RequestBuilder) -> Result<Value, ApiFailure> {
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ApiFailure::other(format!("cannot reach {}: {e}", self.base)))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| status.to_string());
        let exit_code = match status.as_u16() {
            401 | 403 => 3,
            404 => 4,
            _ => 1,
        };
        Err(ApiFailure {
            message: format!("{message} (HTTP {})", status.as_u16()),
            exit_code,
        })
    }
}

/// The host of a plain `http://` URL that is not this machine (where credentials would cross
/// a network in the clear); `None` for HTTPS and loopback.
pub fn plain_http_to_remote(url: &str) -> Option<String> {
    let scheme_end = url.find("://")?;
    if !url[..scheme_end].eq_ignore_ascii_case("http") {
        return None;
    }
    let rest = &url[scheme_end + 3..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_flagged_only_off_this_machine() {
        for (url, want) in [
            ("http://127.0.0.1:8080", None),
            ("http://localhost:8080/api", None),
            ("http://[::1]:8080", None),
            ("http://127.0.0.66:8080", None),
            ("https://fleet.example.com", None),
            ("http://fleet.example.com:8080", Some("fleet.example.com")),
            ("http://10.1.2.3", Some("10.1.2.3")),
            ("http://[2001:db8::1]:80/x", Some("2001:db8::1")),
            ("http://user@fleet.example.com", Some("fleet.example.com")),
            // Schemes are case-insensitive (RFC 3986), and so is the warning.
            ("HTTP://Fleet.example.com", Some("Fleet.example.com")),
            ("Http://LOCALHOST:8080", None),
            ("HTTPS://fleet.example.com", None),
        ] {
            assert_eq!(plain_http_to_remote(url).as_deref(), want, "{url}");
        }
    }
}
