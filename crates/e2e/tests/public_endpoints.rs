//! The public endpoints against floods and against an admin locking the fleet out.

use std::net::IpAddr;

use flotilla_e2e::Server;
use serde_json::{Value, json};

/// A client whose connections come from `from` (any 127.0.0.0/8 address works on loopback).
fn client_from(from: &str) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(Some(from.parse::<IpAddr>()?))
        .build()?)
}

async fn login_from(
    server: &Server,
    client: &reqwest::Client,
    email: &str,
    password: &str,
) -> anyhow::Result<u16> {
    let r = client
        .post(format!("{}/api/auth/login", server.http))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_from_one_address_does_not_lock_the_admin_out_from_another()
-> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let admin = server.admin("root@example.com").await?;
    let attacker = client_from("127.0.0.66")?;
    let mut statuses = Vec::new();
    for k in 0..110 {
        // The admin's account, and others, guessed from one address.
        let email = if k % 2 == 0 {
            "root@example.com".to_string()
        } else {
            format!("user{k}@example.com")
        };
        statuses.push(login_from(&server, &attacker, &email, "guess-123").await?);
    }
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // The attacker is refused even with the right password now ...
    assert_eq!(
        login_from(&server, &attacker, "root@example.com", "admin-pass").await?,
        429
    );
    // ... while the admin, from another address, logs in.
    let office = client_from("127.0.0.7")?;
    assert_eq!(
        login_from(&server, &office, "root@example.com", "admin-pass").await?,
        200
    );
    // The refusals are audited with the address they came from.
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=auth.login&limit=200",
            Some(&admin),
            None,
        )
        .await?;
    assert!(
        audit.as_array().into_iter().flatten().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("too many failures") && d.contains("127.0.0.66"))),
        "{audit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_cannot_be_demoted_or_blocked() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let root = server.admin("root@example.com").await?;
    let root_id = server.user_id(&root, "root@example.com").await?;
    let role = |r: &str| Some(json!({ "role": r }));

    let (s, body) = server
        .call(
            "POST",
            &format!("/api/admin/user/{root_id}/role"),
            Some(&root),
            role("operator"),
        )
        .await?;
    assert_eq!(s, 409, "{body}");
    assert!(body.to_string().contains("last active admin"), "{body}");

    // With a second admin, the first may be demoted; the second is then the last.
    let second = server.admin("second@example.com").await?;
    let second_id = server.user_id(&root, "second@example.com").await?;
    let path = |id: i64, what: &str| format!("/api/admin/user/{id}/{what}");
    assert_eq!(
        server
            .status(
                "POST",
                &path(root_id, "role"),
                Some(&second),
                role("operator")
            )
            .await?,
        200
    );
    // Demoting the last admin is a conflict; blocking oneself is refused before that.
    for (what, body, want) in [("role", role("viewer"), 409), ("block", None, 400)] {
        let (s, b): (u16, Value) = server
            .call("POST", &path(second_id, what), Some(&second), body)
            .await?;
        assert_eq!(s, want, "{what}: {b}");
    }
    // Still an admin, still not blocked.
    let (s, users) = server
        .call("GET", "/api/admin/users", Some(&second), None)
        .await?;
    assert_eq!(s, 200);
    let me = users
        .as_array()
        .into_iter()
        .flatten()
        .find(|u| u["id"] == second_id)
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (me["role"].as_str(), me["blocked"].as_bool()),
        (Some("admin"), Some(false)),
        "{me}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_csr_checks_the_token_first_and_sheds_a_flood_with_bounded_audit() -> anyhow::Result<()>
{
    let server = Server::start(&[]).await?;
    let admin = server.admin("csr-admin@example.com").await?;
    let jwt = server.user("csr@example.com").await?;
    // A garbage CSR with a bad token is refused for the token (401), not parsed (400).
    assert_eq!(
        server
            .sign_csr_from("127.0.0.66", "not-a-token", "dev-x", "garbage")
            .await?,
        401
    );
    let mut statuses = Vec::new();
    for _ in 0..150 {
        statuses.push(
            server
                .sign_csr_from("127.0.0.66", "not-a-token", "dev-x", "garbage")
                .await?,
        );
    }
    // 50 failures per address and window (the first request above was one of them).
    assert!(statuses[..49].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[49..].iter().all(|s| *s == 429), "{statuses:?}");
    let (_, audit) = server
        .call(
            "GET",
            "/api/admin/audit?action=certificate.issue&limit=1000",
            Some(&admin),
            None,
        )
        .await?;
    let rows = audit.as_array().map(Vec::len).unwrap_or(0);
    assert!(rows <= 51, "{rows} audit rows for one flood of 151");
    // A real device elsewhere still provisions.
    let token = server.token(&jwt, Some("dev-ok")).await?;
    let (_key, csr) = flotilla_pki::device_key_and_csr("dev-ok")?;
    assert_eq!(
        server
            .sign_csr_from("127.0.0.7", &token, "dev-ok", &csr)
            .await?,
        200
    );
    Ok(())
}

/// Opens `n` TCP connections from `from` to `port` and sends nothing on them.
async fn idle_connections(
    from: &str,
    port: u16,
    n: usize,
) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(from.parse()?, 0))?;
        held.push(socket.connect(([127, 0, 0, 1], port).into()).await?);
    }
    Ok(held)
}

/// How many of the connections the server has closed (a read sees EOF or an error).
async fn closed(conns: &mut [tokio::net::TcpStream], within: std::time::Duration) -> usize {
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + within;
    for c in conns.iter_mut() {
        let mut buf = [0u8; 64];
        match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => n += 1,
            _ => {}
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_address_is_shed_while_a_real_device_connects()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the MQTT front door's caps and descriptor reserve are the embedded broker's",
    ) {
        return Ok(());
    }
    let server = Server::start(&[
        "--device-listener-per-address",
        "16",
        "--mqtt-per-address",
        "16",
        "--mqtt-handshake-timeout",
        "2",
    ])
    .await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let jwt = server.user("idle@example.com").await?;

    // The device listener: past 16 from one address, connections are closed at once.
    let mut https = idle_connections("127.0.0.66", server.device_port, 40).await?;
    let shed = closed(&mut https[16..], std::time::Duration::from_secs(2)).await;
    assert_eq!(shed, 24, "connections over the per-address cap stayed open");
    // MQTT: 200 connections that never start TLS; past 16 they are closed at once, well
    // before the 2 s deadline.
    let mut mqtt = idle_connections("127.0.0.66", server.mqtt_port, 200).await?;
    let shed = closed(&mut mqtt[16..], std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        shed, 184,
        "MQTT connections over the per-address cap stayed open"
    );

    // Meanwhile a real device provisions (device listener) and connects (MQTT) from elsewhere.
    let id = server.enroll(&jwt, "while-flooded").await?;
    let connected_at = tokio::time::Instant::now();
    let mut s = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    s.publish("devices/while-flooded/health", r#"{"heap":1,"fw":"1.0.0"}"#)
        .await?;
    // A device that finishes TLS with its certificate and never sends CONNECT (rmqtt's version
    // probe waits for ever) is closed at the deadline too.
    let mut mute = tls_as_device_and_silence(&server, &id, "127.0.0.69").await?;
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), mute.read(&mut buf))
            .await
            .is_err(),
        "the silent TLS client was closed before its deadline"
    );

    // A client that finishes TLS on the device listener and then sends nothing is closed by
    // the header timeout (10 s), not held for ever; so is one that would rather speak HTTP/2
    // (hyper's HTTP/2 has no deadline for its preface: the listener speaks HTTP/1.1 only), and
    // one that sends its headers and then never all of its body.
    let mut silent = tls_and_silence(&server, "127.0.0.67", &[b"http/1.1"]).await?;
    let mut silent_h2 = tls_and_silence(&server, "127.0.0.70", &[b"h2", b"http/1.1"]).await?;
    let mut slow_body = tls_and_silence(&server, "127.0.0.71", &[b"http/1.1"]).await?;
    slow_body
        .write_all(b"POST /sign-csr HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{")
        .await?;
    slow_body.flush().await?;
    // So is one that connects to the user API and sends nothing.
    let api_port: u16 = server.http.rsplit(':').next().unwrap_or_default().parse()?;
    let mut api_idle = idle_connections("127.0.0.68", api_port, 1).await?;
    // The idle ones are closed by the handshake timeouts (10 s TLS on the device listener,
    // 2 s here on MQTT), so they do not hold sockets for long.
    assert_eq!(
        closed(&mut mqtt, std::time::Duration::from_secs(6)).await,
        200
    );
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), mute.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a TLS connection that never sent CONNECT was still open: {read:?}"
    );
    // The device that connected is a session: the deadline is long past and it still
    // publishes (the front door knew it arrived because the broker saw its real address).
    tokio::time::sleep_until(connected_at + std::time::Duration::from_secs(3)).await;
    s.publish("devices/while-flooded/health", r#"{"heap":2,"fw":"1.0.0"}"#)
        .await?;
    assert!(!s.closed_within(std::time::Duration::from_millis(200)).await);
    assert_eq!(
        closed(&mut https[..16], std::time::Duration::from_secs(15)).await,
        16
    );
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS connection was still open after 15 s: {read:?}"
    );
    assert_eq!(
        silent_h2.get_ref().1.alpn_protocol(),
        Some(b"http/1.1".as_slice()),
        "the device listener never negotiates HTTP/2"
    );
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(5), silent_h2.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client that offered h2 was still open: {read:?}"
    );
    // The half-sent body gets an error response and the connection is closed.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slow_body.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))) && answer.starts_with("HTTP/1.1 4"),
        "a body that never arrived still held its connection: {read:?} {answer:?}"
    );
    assert_eq!(
        closed(&mut api_idle, std::time::Duration::from_secs(5)).await,
        1,
        "an idle connection to the user API was still open"
    );
    Ok(())
}

/// A TLS connection to the MQTT listener with a device's own certificate that sends nothing.
async fn tls_as_device_and_silence(
    server: &Server,
    id: &flotilla_e2e::DeviceIdentity,
    from: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from.parse()?, 0))?;
    let tcp = socket
        .connect(([127, 0, 0, 1], server.mqtt_port).into())
        .await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    // TLS 1.3 sends the client certificate after the handshake's first flight: flush it.
    use tokio::io::AsyncWriteExt;
    tls.flush().await?;
    Ok(tls)
}

/// A TLS connection to the device listener that offers `alpn` and sends nothing.
async fn tls_and_silence(
    server: &Server,
    from: &str,
    alpn: &[&[u8]],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from.parse()?, 0))?;
    let tcp = socket
        .connect(([127, 0, 0, 1], server.device_port).into())
        .await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await?,
    )
}

/// A connected device goes on under a flood: the API answers and writes a command to the
/// database, the command reaches the device over the server's own (internal) listener, and
/// the heartbeat the device publishes is stored.
async fn connected_device_goes_on(
    server: &Server,
    jwt: &str,
    device: &mut flotilla_e2e::mqtt::Session,
    id: &str,
) -> anyhow::Result<()> {
    let (status, body) = server
        .call(
            "POST",
            &format!("/api/device/{id}/commands"),
            Some(jwt),
            Some(serde_json::json!({"name":"ping"})),
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    let (topic, _) = device.message(std::time::Duration::from_secs(5)).await?;
    assert_eq!(topic, format!("devices/{id}/command"));
    device
        .publish(
            &format!("devices/{id}/health"),
            r#"{"heap":7,"fw":"1.0.0"}"#,
        )
        .await?;
    flotilla_e2e::wait_for(
        "heartbeat stored",
        std::time::Duration::from_secs(5),
        || async { (server.device(jwt, id).await.ok()?["heap"] == 7).then_some(()) },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_fills_only_the_device_budget_and_connected_devices_go_on()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the MQTT front door's caps and descriptor reserve are the embedded broker's",
    ) {
        return Ok(());
    }
    let server = Server::start(&[
        "--mqtt-max-connections",
        "20",
        "--mqtt-handshake-timeout",
        "5",
    ])
    .await?;
    let jwt = server.user("budget@example.com").await?;
    let id = server.enroll(&jwt, "inside").await?;
    let mut device = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    device.subscribe("devices/inside/command").await?;

    // 60 idle connections from 30 addresses: the budget of 20 holds the device and 19 of
    // them; the rest are closed at once.
    let mut flood = Vec::new();
    for k in 0..30 {
        flood.extend(idle_connections(&format!("127.0.1.{}", 10 + k), server.mqtt_port, 2).await?);
    }
    let shed = closed(&mut flood, std::time::Duration::from_millis(1500)).await;
    assert_eq!(shed, 41, "connections over the total budget stayed open");

    connected_device_goes_on(&server, &jwt, &mut device, "inside").await?;

    // Once the flood's deadline passed, its slots are free and a second device connects.
    let other = server.enroll(&jwt, "after-flood").await?;
    assert_eq!(
        closed(&mut flood, std::time::Duration::from_secs(5)).await,
        60
    );
    flotilla_e2e::mqtt::connect_device(server.mqtt_port, &other).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_under_a_low_open_file_limit_leaves_the_reserve_for_devices_the_api_and_the_database()
-> anyhow::Result<()> {
    if flotilla_e2e::external_broker::embedded_only(
        "the MQTT front door's caps and descriptor reserve are the embedded broker's",
    ) {
        return Ok(());
    }
    // 1,500 descriptors, HTTP caps of 64 each: the budget is (1500 - 64 - 64 - 512) / 3 = 286
    // device connections, sized by the server itself.
    let server = Server::start_with_env(
        &["--http-max", "64", "--device-listener-max", "64"],
        &[("FLOTILLA_SERVER_WRAPPER", "prlimit --nofile=1500:1500")],
    )
    .await?;
    let jwt = server.user("reserve@example.com").await?;
    let id = server.enroll(&jwt, "kept").await?;
    let mut device = flotilla_e2e::mqtt::connect_device(server.mqtt_port, &id).await?;
    device.subscribe("devices/kept/command").await?;

    // 400 idle connections from 8 addresses (50 each, under the per-address cap): 285 are
    // held, the rest closed at once, and the server keeps descriptors for the rest.
    let mut flood = Vec::new();
    for k in 0..8 {
        flood.extend(idle_connections(&format!("127.0.2.{}", 10 + k), server.mqtt_port, 50).await?);
    }
    let shed = closed(&mut flood, std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        shed,
        400 - 285,
        "the budget was not sized from the open-file limit"
    );

    connected_device_goes_on(&server, &jwt, &mut device, "kept").await?;
    // A second device provisions over the device listener meanwhile.
    server.enroll(&jwt, "provisioned-meanwhile").await?;
    Ok(())
}
