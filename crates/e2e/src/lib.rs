//! Test support for end-to-end tests: starts the real `flotilla-server` and `flotilla-agent`
//! binaries on ephemeral ports in temporary directories, and talks to them over real HTTP,
//! HTTPS and MQTT with mutual TLS. Every wait is a condition polled until a deadline.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); `.ci/run` does that.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Directory holding the workspace's binaries: next to this executable, or one level up when
/// it is a test executable in `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The server binary: `FLOTILLA_SERVER_BIN` when set (a benchmark's baseline build), else
/// the workspace's own.
pub fn server_bin() -> PathBuf {
    match std::env::var_os("FLOTILLA_SERVER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => bin("flotilla-server"),
    }
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Installs the process-wide rustls provider once (both aws-lc-rs and ring are linked).
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Polls `check` until it yields `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

impl Proc {
    pub fn kill_hard(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Asks politely first (SIGTERM), so a server can stop what it started (the demo fleet),
    /// then kills whatever is still running after 3 s.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && self.is_running() {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_hard();
    }

    /// Freezes the process (SIGSTOP), as a machine that stalls or a VM that is paused would:
    /// it holds its sockets and sessions but runs nothing until [`Proc::resume`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let sent = Command::new("kill")
            .arg(which)
            .arg(self.0.id().to_string())
            .status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "kill {which} {} failed",
            self.0.id()
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

/// Environment that runs a process on a wall clock `offset` away from this machine's (as
/// libfaketime reads it: "+60s", "-2m"), through Debian's libfaketime (scripts/setup installs
/// it). The monotonic clock stays true, so timers and timeouts run as they would.
pub fn skewed_clock_env(offset: &str) -> Result<Vec<(String, String)>> {
    let lib = std::fs::read_dir("/usr/lib")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .context("libfaketime not found under /usr/lib/*/faketime (Debian's faketime package)")?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ])
}

/// A running flotilla-server.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub proc: Proc,
    pub http: String,
    pub device_port: u16,
    pub mqtt_port: u16,
    /// The broker's loopback listener for the server's own service clients.
    pub mqtt_internal_port: u16,
    pub client: reqwest::Client,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// The Mosquitto this server runs behind in an external-broker run
    /// ([`external_broker::enabled`]); after `proc`, so the server stops first, and before
    /// `database`, so broker-sync stops before its database is dropped.
    pub broker: Option<external_broker::HarnessBroker>,
    /// Declared after `proc`, so the server stops before its database is dropped.
    pub database: database::Database,
}

impl Server {
    pub async fn start(extra: &[&str]) -> Result<Server> {
        Self::start_with_env(extra, &[]).await
    }

    /// Starts with extra environment variables (for secrets that do not belong in argv).
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Result<Server> {
        Self::start_on(None, extra, env).await
    }

    /// Starts on a fresh PostgreSQL database whatever the run's mode.
    pub async fn start_on_postgres(extra: &[&str]) -> Result<Server> {
        Self::start_on_postgres_with_env(extra, &[]).await
    }

    /// [`Server::start_on_postgres`] with extra environment variables.
    pub async fn start_on_postgres_with_env(
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server> {
        Self::start_on(Some(database::Database::postgres().await?), extra, env).await
    }

    /// Starts on the PostgreSQL database at `url`, which the test owns (a
    /// [`postgres_cluster::PostgresCluster`] of its own).
    pub async fn start_on_url(url: &str, extra: &[&str]) -> Result<Server> {
        Self::start_on(
            Some(database::Database::SharedPostgres(url.to_string())),
            extra,
            &[],
        )
        .await
    }

    /// A second replica beside this server (which must be on PostgreSQL): its own data dir
    /// holding the same CA (the shared secret replicas mount), the same database, its own
    /// embedded broker and listeners.
    pub async fn start_replica(&self, extra: &[&str]) -> Result<Server> {
        self.start_replica_with_env(extra, &[]).await
    }

    /// [`Server::start_replica`] with extra environment variables.
    pub async fn start_replica_with_env(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server> {
        anyhow::ensure!(
            self.database.is_postgres(),
            "replicas share a PostgreSQL database"
        );
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("server");
        std::fs::create_dir_all(&data)?;
        for f in [flotilla_pki::CA_CERT_FILE, flotilla_pki::CA_KEY_FILE] {
            std::fs::copy(self.data_dir().join(f), data.join(f))?;
        }
        let database = database::Database::SharedPostgres(self.database.url());
        let broker = match &self.broker {
            Some(broker) => Some(broker.for_replica()?),
            None => None,
        };
        Self::start_with_broker(dir, Some(database), extra, env, broker).await
    }

    async fn start_on(
        database: Option<database::Database>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server> {
        Self::start_with_broker(tempfile::tempdir()?, database, extra, env, None).await
    }

    async fn start_with_broker(
        dir: tempfile::TempDir,
        database: Option<database::Database>,
        extra: &[&str],
        env: &[(&str, &str)],
        broker: Option<external_broker::HarnessBroker>,
    ) -> Result<Server> {
        init_crypto();
        let database = match database {
            Some(d) => d,
            None => database::Database::for_server(dir.path().join("server")).await?,
        };
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if database.is_postgres() {
            env.push(("FLOTILLA_DATABASE_URL".into(), database.url()));
        }
        // A test that names a broker of its own at start gets no harness broker.
        let broker = match broker {
            None if external_broker::enabled() && !extra.contains(&"--broker-url") => {
                Some(external_broker::HarnessBroker::start(dir.path(), &env).await?)
            }
            given => given,
        };
        let with_broker = external_broker::args(broker.as_ref(), extra);
        let with_broker: Vec<&str> = with_broker.iter().map(String::as_str).collect();
        let (proc, ep) = Self::spawn(dir.path(), &with_broker, &env).await?;
        let mut server = Server {
            http: String::new(),
            device_port: 0,
            mqtt_port: 0,
            mqtt_internal_port: 0,
            dir,
            proc,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
            broker,
            database,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        server.adopt(&ep)?;
        Ok(server)
    }

    /// Stops the server and starts it again on the same data dir (new ephemeral ports).
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.terminate();
        self.start_again().await
    }

    /// The extra arguments the server was (re)started with.
    pub fn extra_args(&self) -> &[String] {
        &self.extra
    }

    /// Replaces the extra arguments the next (re)start passes.
    pub fn set_args(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and starts it again.
    pub async fn sigkill_and_restart(&mut self) -> Result<()> {
        self.proc.kill_hard();
        self.start_again().await
    }

    async fn start_again(&mut self) -> Result<()> {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let extra = external_broker::args(self.broker.as_ref(), &extra);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (proc, ep) = Self::spawn(self.dir.path(), &extra, &self.env).await?;
        self.proc = proc;
        self.adopt(&ep)
    }

    fn adopt(&mut self, ep: &Value) -> Result<()> {
        let port = |k: &str| -> Result<u16> {
            let addr: std::net::SocketAddr = ep[k].as_str().context("endpoint")?.parse()?;
            Ok(addr.port())
        };
        self.http = format!("http://{}", ep["http"].as_str().context("http")?);
        self.device_port = port("device")?;
        self.mqtt_port = port("mqtt")?;
        // Absent from servers before the internal listener was published (benchmark baselines).
        self.mqtt_internal_port = port("mqtt_internal").unwrap_or(0);
        // Behind the harness's Mosquitto, devices connect to its device listener.
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        if let Some(broker) = external_broker::in_use(self.broker.as_ref(), &extra) {
            self.mqtt_port = broker.device_port();
        }
        Ok(())
    }

    async fn spawn(dir: &Path, extra: &[&str], env: &[(String, String)]) -> Result<(Proc, Value)> {
        let data = dir.join("server");
        let endpoints = data.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log_path = dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        // FLOTILLA_SERVER_WRAPPER runs the server under a tool, e.g. "valgrind --tool=massif";
        // a test may give one for its own server in `env`.
        let wrapper = env
            .iter()
            .find(|(k, _)| k == "FLOTILLA_SERVER_WRAPPER")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("FLOTILLA_SERVER_WRAPPER").ok());
        let mut command = match wrapper {
            Some(wrapper) if !wrapper.trim().is_empty() => {
                let mut words = wrapper.split_whitespace();
                let mut c = Command::new(words.next().unwrap_or_default());
                c.args(words).arg(server_bin());
                c
            }
            _ => Command::new(server_bin()),
        };
        let child = command
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--device-addr",
                "127.0.0.1:0",
                "--mqtt-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning flotilla-server")?;
        let mut proc = Proc(child);
        // The server writes its endpoints only once the broker listens and the server's own
        // MQTT client has been accepted by it (CONNACK), so everything is ready then.
        // `Some(None)`: it exited, which ends the wait with an error (a test may expect that).
        let ep: Option<Value> = wait_for("server endpoints", Duration::from_secs(30), || {
            let running = proc.is_running();
            let ep: Option<Value> = std::fs::read(&endpoints)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            async move {
                match ep {
                    Some(ep) => Some(Some(ep)),
                    None if !running => Some(None),
                    None => None,
                }
            }
        })
        .await?;
        let ep = ep.with_context(|| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            format!(
                "flotilla-server exited during start-up; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })?;
        Ok((proc, ep))
    }

    /// The environment the server runs with (its database URL among it).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// What a hostile peer must not change about a device, as the API shows it: presence, LED
    /// state, firmware and heap, its commands, OTA history and telemetry.
    pub async fn device_state(&self, jwt: &str, device: &str) -> Result<Value> {
        let get = |path: String| async move {
            let (status, body) = self.call("GET", &path, Some(jwt), None).await?;
            anyhow::ensure!(status == 200, "{path}: {status} {body}");
            Ok::<Value, anyhow::Error>(body)
        };
        let d = get(format!("/api/device/{device}")).await?;
        Ok(serde_json::json!({
            "online": d["online"], "led": d["led"], "brightness": d["brightness"],
            "lastSeen": d["lastSeen"], "heap": d["heap"], "firmware": d["firmwareVersion"],
            "disconnectReason": d["disconnectReason"],
            "commands": get(format!("/api/device/{device}/commands")).await?,
            "ota": get(format!("/api/ota/{device}/history")).await?,
            "telemetry": get(format!("/api/device/{device}/telemetry?limit=1000")).await?,
        }))
    }

    /// The server binary with this server's data dir and database, for a subcommand such as
    /// `broker-sync`; its log goes to `<name>.log` beside the server's.
    pub fn subcommand(&self, name: &str) -> Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        let mut command = Command::new(server_bin());
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg(name)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        Ok(command)
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("ca.pem")).expect("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A `flotilla-agent` command whose flash is `data_dir` and whose baked-in CA, backend and
    /// broker are this server's.
    pub fn agent_command(&self, data_dir: &Path) -> Command {
        let mut c = Command::new(bin("flotilla-agent"));
        c.arg("--data-dir")
            .arg(data_dir)
            .arg("--server-ca")
            .arg(self.data_dir().join("ca.pem"))
            .args([
                "--backend-url",
                &self.backend_url(),
                "--broker-url",
                &self.broker_url(),
            ]);
        c
    }

    pub fn backend_url(&self) -> String {
        format!("https://localhost:{}", self.device_port)
    }

    pub fn broker_url(&self) -> String {
        format!("mqtts://localhost:{}", self.mqtt_port)
    }

    /// A rollout's transitions in the audit log, oldest first: `(state, words)`.
    /// `GET /api/admin/stats` as `admin`; `None` unless it answers 200 (a replica whose
    /// database is down does not).
    pub async fn stats(&self, admin: &str) -> Option<Value> {
        let (status, stats) = self
            .call("GET", "/api/admin/stats", Some(admin), None)
            .await
            .ok()?;
        (status == 200).then_some(stats)
    }

    /// Whether this replica runs the background work, as its stats say.
    pub async fn leads(&self, admin: &str) -> Option<bool> {
        self.stats(admin).await?["leader"].as_bool()
    }

    /// `GET /api/rollouts/{id}`; `None` unless it answers 200.
    /// Heartbeats from every device in `devices` (named `ids`) every quarter second, the one
    /// at `updated` (on 1.1.0) crashing at every beat and the others (on 1.0.0) never, until
    /// rollout `id` stops running; the rollout as it stopped. Fails after `within`.
    pub async fn crash_one_until_rollout_halts(
        &self,
        jwt: &str,
        id: &str,
        devices: &mut [mqtt::Session],
        ids: &[&str],
        updated: usize,
        within: Duration,
    ) -> Result<Value> {
        let deadline = std::time::Instant::now() + within;
        let mut beat = 0u32;
        loop {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the health gate never stopped rollout {id}"
            );
            beat += 1;
            for (i, (dev, device)) in devices.iter_mut().zip(ids).enumerate() {
                let (fw, crashes, uptime) = if i == updated {
                    ("1.1.0", beat, 1)
                } else {
                    ("1.0.0", 0, 100 + beat)
                };
                let hb =
                    format!(r#"{{"heap":1000,"fw":"{fw}","uptime":{uptime},"crashes":{crashes}}}"#);
                dev.publish(&format!("devices/{device}/health"), hb.into_bytes())
                    .await?;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let r = self.rollout(jwt, id).await.context("reading the rollout")?;
            if r["progress"]["state"] != "running" {
                return Ok(r);
            }
        }
    }

    pub async fn rollout(&self, jwt: &str, id: &str) -> Option<Value> {
        let (status, r) = self
            .call("GET", &format!("/api/rollouts/{id}"), Some(jwt), None)
            .await
            .ok()?;
        (status == 200).then_some(r)
    }

    pub async fn rollout_transitions(
        &self,
        jwt: &str,
        rollout: &str,
    ) -> Result<Vec<(String, String)>> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut out: Vec<(String, String)> = self
            .audit(jwt, "rollout.transition")
            .await?
            .iter()
            .filter(|e| e["target"] == rollout)
            .map(|e| (text(&e["result"]), text(&e["detail"])))
            .collect();
        out.reverse();
        Ok(out)
    }

    /// The newest 1,000 audit entries with `action`, newest first.
    pub async fn audit(&self, jwt: &str, action: &str) -> Result<Vec<Value>> {
        let path = format!("/api/admin/audit?action={action}&limit=1000");
        let (status, audit) = self.call("GET", &path, Some(jwt), None).await?;
        match audit {
            Value::Array(entries) => Ok(entries),
            other => bail!("GET {path}: {status} {other}"),
        }
    }

    /// A raw request; returns status and JSON body (Null when the body is not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.http);
        let mut req = match method {
            "GET" => self.client.get(url),
            "POST" => self.client.post(url),
            "PUT" => self.client.put(url),
            other => bail!("method {other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Just the status code of a request.
    pub async fn status(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<u16> {
        Ok(self.call(method, path, token, body).await?.0)
    }

    /// Registers a user and returns a login token.
    pub async fn user(&self, email: &str) -> Result<String> {
        let (s, b) = self
            .call(
                "POST",
                "/api/auth/register",
                None,
                Some(json!({"username": email, "email": email, "password": "secret-pass"})),
            )
            .await?;
        anyhow::ensure!(s == 201, "register {email}: {s} {b}");
        self.login(email, "secret-pass").await
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<String> {
        let (s, b) = self
            .call(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        anyhow::ensure!(s == 200, "login {email}: {s} {b}");
        Ok(b["token"].as_str().context("token")?.to_string())
    }

    /// The id of the user with `email`, as an admin sees it.
    pub async fn user_id(&self, admin: &str, email: &str) -> Result<i64> {
        let (_, users) = self
            .call("GET", "/api/admin/users", Some(admin), None)
            .await?;
        users
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["email"] == email)
            .and_then(|u| u["id"].as_i64())
            .with_context(|| format!("no user {email}: {users}"))
    }

    /// Creates an admin offline, as an operator would, and logs in.
    pub async fn admin(&self, email: &str) -> Result<String> {
        let status = Command::new(server_bin())
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "admin",
                "create",
                "--email",
                email,
                "--password",
                "admin-pass",
            ])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "admin create failed");
        self.login(email, "admin-pass").await
    }

    pub async fn token(&self, jwt: &str, device_id: Option<&str>) -> Result<String> {
        let body = match device_id {
            Some(d) => json!({ "deviceId": d }),
            None => json!({}),
        };
        let (s, b) = self
            .call("POST", "/api/provisioning/tokens", Some(jwt), Some(body))
            .await?;
        anyhow::ensure!(s == 201, "token: {s} {b}");
        Ok(b["token"].as_str().context("token")?.to_string())
    }

    pub fn device_http(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem().as_bytes())?)
            .timeout(Duration::from_secs(30))
            .build()?)
    }

    /// `POST /sign-csr` from the loopback address `from` (any of 127.0.0.0/8); the status.
    pub async fn sign_csr_from(
        &self,
        from: &str,
        token: &str,
        device_id: &str,
        csr: &str,
    ) -> Result<u16> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem().as_bytes())?)
            .local_address(Some(from.parse::<std::net::IpAddr>()?))
            .timeout(Duration::from_secs(30))
            .build()?;
        let r = client
            .post(format!("{}/sign-csr", self.backend_url()))
            .bearer_auth(token)
            .json(&json!({ "device_id": device_id, "csr": csr }))
            .send()
            .await?;
        Ok(r.status().as_u16())
    }

    /// `POST /sign-csr` as a device would; returns status and body.
    pub async fn sign_csr(&self, token: &str, device_id: &str, csr: &str) -> Result<(u16, Value)> {
        let resp = self
            .device_http()?
            .post(format!("{}/sign-csr", self.backend_url()))
            .bearer_auth(token)
            .json(&json!({ "device_id": device_id, "csr": csr }))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Provisions a device identity directly (key + CSR made here, as on a device).
    pub async fn enroll(&self, jwt: &str, device_id: &str) -> Result<DeviceIdentity> {
        let token = self.token(jwt, Some(device_id)).await?;
        let (key_pem, csr) = flotilla_pki::device_key_and_csr(device_id)?;
        let (s, b) = self.sign_csr(&token, device_id, &csr).await?;
        anyhow::ensure!(s == 200, "sign-csr: {s} {b}");
        Ok(DeviceIdentity {
            device_id: device_id.to_string(),
            cert_pem: b["certificate"]["content"]
                .as_str()
                .context("cert")?
                .to_string(),
            key_pem,
            ca_pem: b["ca_certificate"]["content"]
                .as_str()
                .context("ca")?
                .to_string(),
        })
    }

    pub async fn device(&self, jwt: &str, device_id: &str) -> Result<Value> {
        let (s, b) = self
            .call("GET", &format!("/api/device/{device_id}"), Some(jwt), None)
            .await?;
        anyhow::ensure!(s == 200, "device {device_id}: {s} {b}");
        Ok(b)
    }
}

/// A device's certificate material.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl DeviceIdentity {
    /// Writes cert, key and CA to files, for stock tools such as mosquitto_pub.
    pub fn write_files(&self, dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let (c, k, a) = (
            dir.join(format!("{}.pem", self.device_id)),
            dir.join(format!("{}.key", self.device_id)),
            dir.join("ca.pem"),
        );
        std::fs::write(&c, &self.cert_pem)?;
        std::fs::write(&k, &self.key_pem)?;
        std::fs::write(&a, &self.ca_pem)?;
        Ok((c, k, a))
    }
}

/// A running flotilla-agent.
pub struct Agent {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub softap: String,
}

impl Agent {
    pub async fn start(server: &Server, data_dir: &Path, extra: &[&str]) -> Result<Agent> {
        std::fs::create_dir_all(data_dir)?;
        let addr_file = data_dir.join("softap.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("agent.log"))?;
        let child = server
            .agent_command(data_dir)
            .args(["--provision-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let proc = Proc(child);
        let softap = wait_for("agent SoftAP address", Duration::from_secs(20), || {
            let a = std::fs::read_to_string(&addr_file).ok();
            async move { a }
        })
        .await?;
        Ok(Agent {
            proc,
            data_dir: data_dir.to_path_buf(),
            softap: format!("http://{softap}"),
        })
    }

    pub async fn status(&self) -> Result<Value> {
        Ok(reqwest::get(format!("{}/status", self.softap))
            .await?
            .json()
            .await?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent.log")).unwrap_or_default()
    }
}

pub mod database;
pub mod external_broker;
pub mod mosquitto;
pub mod mqtt;
pub mod postgres_cluster;

pub mod bench;
pub mod proxy;
pub mod release_kit;
pub mod tls_resumption;

/// The `flotilla` CLI with its own session file, pointed at a server.
#[derive(Clone)]
pub struct Cli {
    http: String,
    pub session: PathBuf,
}

impl Cli {
    pub fn new(server: &Server, session: &Path) -> Cli {
        Cli {
            http: server.http.clone(),
            session: session.to_path_buf(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("flotilla"));
        c.env("FLOTILLA_SESSION", &self.session)
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_PASSWORD")
            .env("FLOTILLA_URL", &self.http)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("running flotilla")
    }

    /// Runs with extra environment variables and `stdin` as standard input.
    pub fn run_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: &str,
    ) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running flotilla");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        child.wait_with_output().expect("running flotilla")
    }

    /// `flotilla login`, the password on standard input; panics unless it succeeds.
    pub fn login(&self, email: &str, password: &str) {
        let out = self.run_with(
            &["login", "--email", email, "--password-stdin"],
            &[],
            &format!("{password}\n"),
        );
        assert!(
            out.status.success(),
            "login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs with `--json`; panics with stderr unless it succeeds.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("CLI printed JSON")
    }
}

impl Agent {
    /// Provisions the agent through its SoftAP as seed 004 does, with a fresh token.
    pub async fn provision(&self, server: &Server, jwt: &str, device_id: &str) -> Result<()> {
        let token = server.token(jwt, None).await?;
        let resp = reqwest::Client::new()
            .post(format!("{}/provision", self.softap))
            .bearer_auth(jwt)
            .json(&json!({ "ssid": "flotilla-lab", "password": "1q2w3e4r", "device_id": device_id, "provisioning_token": token }))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 200,
            "provision {device_id}: {}",
            resp.status()
        );
        Ok(())
    }
}

/// moto's S3 server (installed by `scripts/setup`), on an ephemeral port, with one bucket.
pub struct Moto {
    _proc: Proc,
    pub endpoint: String,
}

impl Moto {
    pub async fn start(bucket: &str) -> Result<Moto> {
        init_crypto();
        let venv = std::env::var("FLOTILLA_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/flotilla/venv")
            });
        let exe = venv.join("bin/moto_server");
        anyhow::ensure!(
            exe.exists(),
            "{} missing: run scripts/setup (installs moto[server] from PyPI)",
            exe.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let proc = Proc(
            Command::new(exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("moto S3 server", Duration::from_secs(30), || {
            let req = http.put(format!("{endpoint}/{bucket}")).send();
            async move {
                req.await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await?;
        Ok(Moto {
            _proc: proc,
            endpoint,
        })
    }
}
