//! One suite, both backends: every case runs on a fresh SQLite file and on a fresh PostgreSQL
//! database, and must give the same answers on each.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use serde_json::json;

use super::testdb::{TestDb, dev};
use super::*;

/// `case_name::sqlite` and `case_name::postgres` for each case.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = super::TestDb::sqlite().await;
                    super::$case(db.store()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let db = super::TestDb::postgres().await;
                    super::$case(db.store()).await;
                }
            }
        )*
    };
}

on_both_backends!(
    a_stored_device_id_that_is_not_valid_refuses_the_read,
    users_and_the_last_admin,
    two_admins_blocking_each_other_at_once_leave_one_active,
    devices_register_list_block_and_tag,
    presence_sweeps,
    one_token_one_device_whatever_the_concurrency,
    commands_move_forward_only_and_expire,
    device_messages_and_redelivered_readings,
    a_message_committed_after_a_newer_one_changes_only_what_is_older,
    a_numbered_message_is_ordered_by_its_key_not_by_when_it_was_taken,
    a_batch_of_readings_judges_each_device_by_its_own_latest_reading,
    the_heartbeats_stored_since_a_time_are_each_devices_newest,
    readings_in_a_batch_store_what_one_at_a_time_stores,
    dead_letters_and_retained_messages,
    releases,
    ota_offers_and_reports,
    rollouts_and_their_outcomes,
    audit_and_fleet_figures,
    the_audit_log_is_a_chain_that_names_the_first_edited_record,
    retention_removes_old_rows_of_each_kind_and_nothing_else,
    concurrent_registrations_of_one_id_give_it_one_owner,
    concurrent_offers_leave_one_open,
    concurrent_tag_replacements_leave_one_set,
    a_block_committed_while_a_message_is_stored_wins,
    revoked_and_superseded_certificates_reach_the_broker_denials,
    a_renewed_certificate_is_valid_beside_the_old_one_until_it_is_used,
    the_security_report_lists_what_needs_attention_and_nothing_else,
    desired_and_reported_config_are_kept_apart,
    concurrent_renewals_issue_one_certificate,
    rollout_candidates_are_chosen_by_target_owner_block_and_hardware,
    token_keys_are_published_once_and_found_by_id,
    attempts_are_counted_in_windows_given_back_and_cleared,
    a_lease_has_one_holder_and_work_under_a_lost_lease_is_refused,
    a_takeover_waits_for_work_begun_under_the_old_epoch,
    a_holder_stalled_inside_its_work_loses_it_and_does_not_hold_up_the_takeover,
    queued_commands_of_online_devices_are_resent_until_accepted,
    retention_under_the_lease_deletes_only_what_its_holder_commits,
);

/// A stall limit no test reaches.
const LONG_STALL: std::time::Duration = std::time::Duration::from_secs(60);

async fn user(store: &Store, email: &str, role: Role) -> i64 {
    store.create_user(email, email, "hash", role).await.unwrap()
}

fn message<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

async fn users_and_the_last_admin(store: &Store) {
    let admin = user(store, "admin@x", Role::Admin).await;
    let op = user(store, "op@x", Role::Operator).await;
    assert_ne!(admin, op);
    let dup = store
        .create_user("again", "admin@x", "h", Role::Viewer)
        .await;
    assert!(
        matches!(&dup, Err(crate::StoreError::Conflict(_))),
        "{dup:?}"
    );
    let a = store.user_by_email("admin@x").await.unwrap().unwrap();
    assert_eq!((a.id, a.role, a.blocked), (admin, Role::Admin, false));
    assert_eq!(store.user_by_id(op).await.unwrap().unwrap().email, "op@x");
    assert!(store.user_by_email("ADMIN@x").await.unwrap().is_none());
    assert_eq!(
        store
            .users()
            .await
            .unwrap()
            .iter()
            .map(|u| u.id)
            .collect::<Vec<_>>(),
        vec![admin, op]
    );
    // The only active admin can be neither blocked nor demoted.
    assert_eq!(
        store.toggle_user_block(admin).await.unwrap(),
        UserChange::LastAdmin
    );
    assert_eq!(
        store.set_user_role(admin, Role::Viewer).await.unwrap(),
        UserChange::LastAdmin
    );
    assert_eq!(
        store.toggle_user_block(9999).await.unwrap(),
        UserChange::NotFound
    );
    assert_eq!(
        store.set_user_role(op, Role::Admin).await.unwrap(),
        UserChange::Done(())
    );
    assert_eq!(
        store.toggle_user_block(admin).await.unwrap(),
        UserChange::Done(true)
    );
    assert_eq!(
        store.toggle_user_block(op).await.unwrap(),
        UserChange::LastAdmin
    );
    assert_eq!(
        store.toggle_user_block(admin).await.unwrap(),
        UserChange::Done(false)
    );
}

async fn two_admins_blocking_each_other_at_once_leave_one_active(store: &Store) {
    for round in 0..20 {
        let a = user(store, &format!("a{round}@x"), Role::Admin).await;
        let b = user(store, &format!("b{round}@x"), Role::Admin).await;
        // Every other admin is blocked, so these two are the last ones.
        for u in store.users().await.unwrap() {
            if u.id != a && u.id != b && !u.blocked {
                assert_eq!(
                    store.toggle_user_block(u.id).await.unwrap(),
                    UserChange::Done(true)
                );
            }
        }
        let (s1, s2) = (store.clone(), store.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { s1.toggle_user_block(a).await.unwrap() }),
            tokio::spawn(async move { s2.toggle_user_block(b).await.unwrap() }),
        );
        let outcomes = [x.unwrap(), y.unwrap()];
        assert!(
            outcomes.contains(&UserChange::LastAdmin),
            "round {round}: both blocked: {outcomes:?}"
        );
        let active = store
            .users()
            .await
            .unwrap()
            .iter()
            .filter(|u| u.role == Role::Admin && !u.blocked)
            .count();
        assert_eq!(active, 1, "round {round}");
    }
}

async fn devices_register_list_block_and_tag(store: &Store) {
    let alice = user(store, "alice@x", Role::Operator).await;
    let bob = user(store, "bob@x", Role::Operator).await;
    // Ids that a collation-aware sort would order differently from bytes.
    for id in ["dev-b", "Dev-a", "dev_c", "dev-1", "dev1"] {
        assert!(store.register_device(&dev(id), "n", alice).await.unwrap());
    }
    assert!(
        store
            .register_device(&dev("dev1"), "again", alice)
            .await
            .unwrap()
    );
    assert!(
        !store
            .register_device(&dev("dev1"), "theft", bob)
            .await
            .unwrap()
    );
    assert!(store.register_device(&dev("bobs"), "b", bob).await.unwrap());
    let ids = |v: Vec<DeviceRow>| {
        v.into_iter()
            .map(|d| d.device_id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(store.devices_of(Some(alice)).await.unwrap()),
        ["Dev-a", "dev-1", "dev-b", "dev1", "dev_c"]
    );
    assert_eq!(store.devices_of(None).await.unwrap().len(), 6);
    assert!(
        store
            .device_visible_to(&dev("bobs"), Some(alice))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .device_visible_to(&dev("bobs"), None)
            .await
            .unwrap()
            .is_some()
    );
    let d = store.device(&dev("dev1")).await.unwrap().unwrap();
    assert_eq!(
        (d.name.as_str(), d.owner_id, d.online, d.provisioned),
        ("n", alice, false, false)
    );

    store
        .set_device_tags(&dev("dev1"), &["hall".into(), "floor-2".into()])
        .await
        .unwrap();
    // A set, read back in order.
    assert_eq!(
        store.device(&dev("dev1")).await.unwrap().unwrap().tags,
        ["floor-2", "hall"]
    );
    store
        .set_device_tags(&dev("dev-b"), &["hall".into()])
        .await
        .unwrap();
    let tagged: Vec<(String, Vec<String>)> = store
        .devices_of(Some(alice))
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.device_id.to_string(), d.tags))
        .filter(|(_, t)| !t.is_empty())
        .collect();
    assert_eq!(
        tagged,
        [
            ("dev-b".to_string(), vec!["hall".to_string()]),
            (
                "dev1".to_string(),
                vec!["floor-2".to_string(), "hall".to_string()]
            )
        ]
    );
    store.set_device_tags(&dev("dev1"), &[]).await.unwrap();
    assert!(
        store
            .device(&dev("dev1"))
            .await
            .unwrap()
            .unwrap()
            .tags
            .is_empty()
    );
    assert!(store.toggle_device_block(&dev("dev1")).await.unwrap());
    assert!(matches!(
        store.toggle_device_block(&dev("nope")).await,
        Err(crate::StoreError::NotFound)
    ));
    let gate = store.gate_snapshot().await.unwrap();
    let entry = |id: &str, blocked| GateEntry {
        device_id: id.into(),
        blocked,
        serial: None,
        pending_serial: None,
    };
    assert!(gate.contains(&entry("dev1", true)));
    assert!(gate.contains(&entry("bobs", false)));
    assert!(!store.toggle_device_block(&dev("dev1")).await.unwrap());
}

async fn presence_sweeps(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for id in ["quiet", "chatty"] {
        store.register_device(&dev(id), id, o).await.unwrap();
    }
    let mut tx = store.begin_write().await.unwrap();
    let hb: flotilla_proto::Heartbeat = message(json!({"heap": 1, "fw": "1.0.0"}));
    assert!(
        tx.apply_update(&dev("quiet"), &DeviceUpdate::Heartbeat(hb.clone()), 1_000)
            .await
            .unwrap()
    );
    assert!(
        tx.apply_update(&dev("chatty"), &DeviceUpdate::Heartbeat(hb), 5_000)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    assert_eq!(store.online_devices().await.unwrap().len(), 2);
    assert_eq!(store.expire_silent_devices(2_000).await.unwrap(), ["quiet"]);
    assert!(store.expire_silent_devices(2_000).await.unwrap().is_empty());
    let q = store.device(&dev("quiet")).await.unwrap().unwrap();
    assert_eq!(
        (q.online, q.disconnect_reason.as_deref()),
        (false, Some("heartbeat timeout"))
    );
    assert!(
        store
            .mark_offline(&dev("chatty"), "connection lost")
            .await
            .unwrap()
    );
    assert!(!store.mark_offline(&dev("chatty"), "again").await.unwrap());
    assert_eq!(
        store
            .device(&dev("chatty"))
            .await
            .unwrap()
            .unwrap()
            .disconnect_reason
            .as_deref(),
        Some("connection lost")
    );
}

async fn one_token_one_device_whatever_the_concurrency(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let other = user(store, "other@x", Role::Operator).await;
    let far = now_ms() + 600_000;
    store.create_token("t-any", o, None, far).await.unwrap();
    store
        .create_token("t-bound", o, Some(&dev("bound-dev")), far)
        .await
        .unwrap();
    store
        .create_token("t-old", o, None, now_ms() - 1)
        .await
        .unwrap();
    store
        .register_device(&dev("taken"), "t", other)
        .await
        .unwrap();
    let cert = flotilla_pki::IssuedCertificate {
        certificate_pem: String::new(),
        serial_hex: "0a0b".into(),
        not_after_unix: 1_900_000_000,
    };
    assert_eq!(
        store.peek_token("t-old", &dev("d")).await.unwrap(),
        TokenClaim::Invalid
    );
    assert_eq!(
        store.peek_token("t-bound", &dev("d")).await.unwrap(),
        TokenClaim::WrongDevice
    );
    assert_eq!(
        store.peek_token("t-any", &dev("taken")).await.unwrap(),
        TokenClaim::DeviceTaken
    );
    assert_eq!(
        store.peek_token("t-any", &dev("new-dev")).await.unwrap(),
        TokenClaim::Claimed { owner_id: o }
    );
    // A refusal changes nothing: the token still works for a device it may have.
    assert_eq!(
        store
            .redeem_token("t-any", &dev("taken"), &cert)
            .await
            .unwrap(),
        TokenClaim::DeviceTaken
    );
    let tries: Vec<_> = (0..8)
        .map(|i| {
            let (s, c) = (store.clone(), cert.clone());
            tokio::spawn(async move { s.redeem_token("t-any", &dev(format!("new-{i}")), &c).await })
        })
        .collect();
    let mut claimed = Vec::new();
    for (i, t) in tries.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(TokenClaim::Claimed { .. }) => claimed.push(format!("new-{i}")),
            Ok(TokenClaim::Invalid) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    let d = store.device(&dev(&claimed[0])).await.unwrap().unwrap();
    assert!(d.provisioned);
    assert_eq!(d.owner_id, o);
    let gauges = store.fleet_gauges().await.unwrap();
    assert_eq!(gauges.first_cert_expiry_ms, Some(1_900_000_000_000));
    assert_eq!(gauges.device_certificates, 1);
}

async fn commands_move_forward_only_and_expire(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    store.register_device(&dev("e"), "e", o).await.unwrap();
    let far = now_ms() + 600_000;
    let c = store
        .create_command("c1", &dev("d"), "led", &json!({"state": "ON"}), o, far)
        .await
        .unwrap();
    assert_eq!(
        (c.state, c.args.clone()),
        (CommandState::Queued, json!({"state": "ON"}))
    );
    store
        .create_command("c2", &dev("d"), "ping", &json!({}), o, now_ms() - 1)
        .await
        .unwrap();
    store
        .create_command("c3", &dev("e"), "ping", &json!({}), o, far)
        .await
        .unwrap();
    assert!(
        store
            .create_command("c1", &dev("d"), "ping", &json!({}), o, far)
            .await
            .is_err()
    );
    let pending: Vec<_> = store
        .pending_commands(&dev("d"))
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(pending, ["c1"]);
    store.mark_command_sent("c1").await.unwrap();

    let reply = |id: &str, status: &str| -> flotilla_proto::CommandReply {
        message(json!({"id": id, "status": status, "result": {"ok": true}, "error": "e"}))
    };
    let mut tx = store.begin_write().await.unwrap();
    // Another device cannot move it; accepted, then succeeded; a final state stays.
    assert!(
        !tx.apply_reply(&dev("e"), &reply("c1", "succeeded"), 10)
            .await
            .unwrap()
    );
    assert!(
        tx.apply_reply(&dev("d"), &reply("c1", "accepted"), 11)
            .await
            .unwrap()
    );
    assert!(
        tx.apply_reply(&dev("d"), &reply("c1", "succeeded"), 12)
            .await
            .unwrap()
    );
    assert!(
        !tx.apply_reply(&dev("d"), &reply("c1", "failed"), 13)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let c1 = store.command("c1").await.unwrap().unwrap();
    assert_eq!(c1.state, CommandState::Succeeded);
    assert_eq!((c1.delivered_at, c1.completed_at), (Some(11), Some(12)));
    assert_eq!(c1.result, Some(json!({"ok": true})));

    assert_eq!(store.expire_commands().await.unwrap(), 1);
    assert_eq!(store.expire_commands().await.unwrap(), 0);
    assert_eq!(
        store.command("c2").await.unwrap().unwrap().state,
        CommandState::Expired
    );
    let listed: Vec<_> = store
        .commands_of(&dev("d"), 1)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed.len(), 1);
    assert!(store.command("nope").await.unwrap().is_none());
    // A state no variant names (a newer server's, a hand-edited row) is an error, not a default.
    sqlx::query("UPDATE commands SET state = 'teleported' WHERE id = 'c3'")
        .execute(&store.pool)
        .await
        .unwrap();
    let e = store.command("c3").await.unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"unknown command state "teleported""#),
        "{e}"
    );
}

async fn device_messages_and_redelivered_readings(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    store
        .register_device(&dev("blocked"), "b", o)
        .await
        .unwrap();
    store.toggle_device_block(&dev("blocked")).await.unwrap();
    let status: flotilla_proto::Status = message(json!({
        "online": true, "led": "ON", "brightness": 40, "fw": "1.2.0", "hw": "esp32c3"
    }));
    let hb: flotilla_proto::Heartbeat =
        message(json!({"heap": 18000, "fw": "1.2.0", "rssi": -60, "uptime": 12, "crashes": 1}));
    let t: flotilla_proto::Telemetry =
        message(json!({"seq": 7, "ts": 99, "pot": 512, "switch": true, "temp": 18.7}));
    let mut tx = store.begin_write().await.unwrap();
    assert!(
        tx.apply_update(&dev("d"), &DeviceUpdate::Status(status), 100)
            .await
            .unwrap()
    );
    assert!(
        !tx.apply_update(&dev("d"), &DeviceUpdate::Heartbeat(hb.clone()), 101)
            .await
            .unwrap()
    );
    for _ in 0..2 {
        tx.apply_update(&dev("d"), &DeviceUpdate::Telemetry(t.clone()), 102)
            .await
            .unwrap();
    }
    // Unknown and blocked devices change nothing.
    assert!(
        !tx.apply_update(&dev("ghost"), &DeviceUpdate::Heartbeat(hb.clone()), 103)
            .await
            .unwrap()
    );
    assert!(
        !tx.apply_update(&dev("blocked"), &DeviceUpdate::Heartbeat(hb), 103)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    let d = store.device(&dev("d")).await.unwrap().unwrap();
    assert_eq!(
        (
            d.online,
            d.led.as_deref(),
            d.brightness,
            d.firmware_version.as_deref(),
            d.hardware.as_deref()
        ),
        (true, Some("ON"), Some(40), Some("1.2.0"), Some("esp32c3"))
    );
    assert_eq!(
        (d.heap, d.rssi, d.uptime, d.crashes, d.last_seen),
        (Some(18000), Some(-60), Some(12), Some(1), Some(102))
    );
    let rows = store.telemetry(&dev("d"), 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (r.seq, r.device_ts, r.received_at, r.pot, r.switch, r.temp),
        (7, Some(99), 102, Some(512), Some(true), Some(18.7))
    );
    assert!(!store.device(&dev("blocked")).await.unwrap().unwrap().online);

    let offline: flotilla_proto::Status = message(json!({"online": false, "reason": "sleeping"}));
    let mut tx = store.begin_write().await.unwrap();
    tx.apply_update(&dev("d"), &DeviceUpdate::Status(offline), 200)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let d = store.device(&dev("d")).await.unwrap().unwrap();
    assert_eq!(
        (
            d.online,
            d.disconnect_reason.as_deref(),
            d.last_seen,
            d.led.as_deref()
        ),
        (false, Some("sleeping"), Some(102), Some("ON"))
    );
}

async fn readings_in_a_batch_store_what_one_at_a_time_stores(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for i in 0..30 {
        store
            .register_device(&dev(format!("d{i}")), "d", o)
            .await
            .unwrap();
    }
    store.toggle_device_block(&dev("d3")).await.unwrap();
    let readings: Vec<(String, flotilla_proto::Telemetry)> = (0..2_500u64)
        .map(|n| {
            let device = format!("d{}", n % 32); // d30 and d31 are not registered
            let t = message(json!({"seq": n / 32, "pot": n % 1000, "switch": n % 2 == 0, "temp": 0.1 * n as f64}));
            (device, t)
        })
        .collect();
    let readings: Vec<_> = readings.into_iter().map(|(d, t)| (dev(d), t)).collect();
    let refs: Vec<(&flotilla_proto::DeviceId, &flotilla_proto::Telemetry, i64)> =
        readings.iter().map(|(d, t)| (d, t, 500)).collect();
    let again: Vec<_> = refs[..100].iter().map(|(d, t, _)| (*d, *t, 501)).collect();
    let mut tx = store.begin_write().await.unwrap();
    let mut came_online: Vec<String> = tx
        .apply_readings(&refs)
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    // Redelivered: stored once.
    tx.apply_readings(&again).await.unwrap();
    tx.commit().await.unwrap();
    came_online.sort();
    let mut expected: Vec<String> = (0..30)
        .filter(|i| *i != 3)
        .map(|i| format!("d{i}"))
        .collect();
    expected.sort();
    assert_eq!(came_online, expected);
    for i in [0, 7, 29] {
        let rows = store.telemetry(&dev(format!("d{i}")), 1_000).await.unwrap();
        let expected: Vec<i64> = (0..2_500i64)
            .filter(|n| n % 32 == i)
            .map(|n| n / 32)
            .rev()
            .collect();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), expected);
        assert!(rows.iter().all(|r| r.received_at == 500));
        // Each value as sent, the temperature at its shortest decimal form (as one at a time).
        for r in &rows {
            let n = r.seq * 32 + i;
            let temp: f64 = ((0.1 * n as f64) as f32).to_string().parse().unwrap();
            assert_eq!(
                (r.device_ts, r.pot, r.switch, r.temp),
                (None, Some(n % 1000), Some(n % 2 == 0), Some(temp)),
                "d{i} seq {}",
                r.seq
            );
        }
        let d = store.device(&dev(format!("d{i}"))).await.unwrap().unwrap();
        // Every device has a reading among the first 100, delivered again at 501.
        assert_eq!((d.online, d.last_seen), (true, Some(501)));
    }
    assert!(store.telemetry(&dev("d3"), 10).await.unwrap().is_empty());
    assert!(store.telemetry(&dev("d30"), 10).await.unwrap().is_empty());

    // One (device, seq) twice in a batch, with other values: the first is stored.
    let (first, second) = (
        message(json!({"seq": 90_000, "pot": 1})),
        message(json!({"seq": 90_000, "pot": 2})),
    );
    let d0 = dev("d0");
    let mut tx = store.begin_write().await.unwrap();
    tx.apply_readings(&[(&d0, &first, 600), (&d0, &second, 600)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let newest = &store.telemetry(&d0, 1).await.unwrap()[0];
    assert_eq!((newest.seq, newest.pot), (90_000, Some(1)));
}

async fn dead_letters_and_retained_messages(store: &Store) {
    let payload = [0xff, 0x00, 0xfe, b'x'];
    store
        .dead_letter("devices/d/telemetry", &payload, "refused")
        .await
        .unwrap();
    store
        .dead_letter("devices/e/health", b"{}", &"long ".repeat(200))
        .await
        .unwrap();
    let letters = store.dead_letters(10).await.unwrap();
    assert_eq!(letters[0].0, "devices/e/health");
    assert_eq!(letters[0].1.chars().count(), 500);
    assert_eq!(letters[1], ("devices/d/telemetry".into(), "refused".into()));
    store
        .set_retained("devices/b/config", &payload, 1)
        .await
        .unwrap();
    store
        .set_retained("devices/a/config", b"v1", 1)
        .await
        .unwrap();
    store
        .set_retained("devices/a/config", b"v2", 0)
        .await
        .unwrap();
    let kept = store.retained().await.unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(
        (
            kept[0].topic.as_str(),
            kept[0].payload.as_slice(),
            kept[0].qos
        ),
        ("devices/a/config", &b"v2"[..], 0)
    );
    assert_eq!(kept[1].payload, payload);
    store
        .set_retained("devices/a/config", b"", 1)
        .await
        .unwrap();
    assert_eq!(store.retained().await.unwrap().len(), 1);
}

fn new_release<'a>(version: &'a str, hardware: &'a str, by: i64) -> NewRelease<'a> {
    NewRelease {
        version,
        hardware,
        size: 1 << 20,
        sha256: "ab",
        security_counter: 3,
        manifest: "{}",
        signature: "sig",
        created_by: by,
    }
}

async fn releases(store: &Store) {
    let o = user(store, "o@x", Role::Admin).await;
    for (v, hw) in [
        ("1.2.0", "esp32c3"),
        ("1.10.0", "esp32c3"),
        ("2.0.0", "esp32s3"),
    ] {
        let r = store.create_release(new_release(v, hw, o)).await.unwrap();
        assert!(!r.ready && !r.blocked);
    }
    assert!(
        store
            .create_release(new_release("1.2.0", "esp32c3", o))
            .await
            .is_err()
    );
    let versions: Vec<_> = store
        .releases()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, ["2.0.0", "1.10.0", "1.2.0"]);
    assert!(store.latest_release(None).await.unwrap().is_none());
    for v in ["1.2.0", "1.10.0", "2.0.0"] {
        store.mark_release_ready(v).await.unwrap();
    }
    assert_eq!(
        store
            .latest_release(Some("esp32c3"))
            .await
            .unwrap()
            .unwrap()
            .version,
        "1.10.0"
    );
    assert!(
        store
            .set_release_blocked("1.10.0", true, Some("bricks"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_release_blocked("9.9.9", true, None)
            .await
            .unwrap()
    );
    let r = store.release("1.10.0").await.unwrap().unwrap();
    assert_eq!(
        (
            r.blocked,
            r.blocked_reason.as_deref(),
            r.size,
            r.security_counter
        ),
        (true, Some("bricks"), 1 << 20, 3)
    );
    assert_eq!(
        store
            .latest_release(Some("esp32c3"))
            .await
            .unwrap()
            .unwrap()
            .version,
        "1.2.0"
    );
    assert_eq!(
        store.latest_release(None).await.unwrap().unwrap().version,
        "2.0.0"
    );
    store
        .set_release_blocked("1.10.0", false, Some("ignored"))
        .await
        .unwrap();
    assert_eq!(
        store
            .release("1.10.0")
            .await
            .unwrap()
            .unwrap()
            .blocked_reason,
        None
    );
}

async fn ota_offers_and_reports(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for d in ["d", "e", "f"] {
        store.register_device(&dev(d), d, o).await.unwrap();
    }
    let u1 = store
        .create_update(&NewOffer {
            id: "u1",
            device_id: &dev("d"),
            version: "1.1.0",
            force: false,
            rollout_id: None,
            created_by: Some(o),
            supersede_started: false,
        })
        .await
        .unwrap();
    assert_eq!(u1.update.state, UpdateState::Offered);
    assert!(u1.withdrawn.is_empty());
    // A newer offer cancels the open one, and says which, for the device to be told.
    let u2 = store
        .create_update(&NewOffer {
            id: "u2",
            device_id: &dev("d"),
            version: "1.2.0",
            force: true,
            rollout_id: Some("r1"),
            created_by: Some(o),
            supersede_started: false,
        })
        .await
        .unwrap();
    assert_eq!(
        u2.withdrawn,
        [crate::Withdrawn {
            device_id: dev("d"),
            update_id: "u1".into()
        }]
    );
    assert!(!store.has_open_update(&dev("d"), "1.1.0").await.unwrap());
    assert!(store.has_open_update(&dev("d"), "1.2.0").await.unwrap());
    let since = now_ms() - 60_000;
    assert_eq!(
        store
            .cancelled_updates_since(&dev("d"), since)
            .await
            .unwrap(),
        ["u1"]
    );
    assert_eq!(store.unstarted_updates(&dev("d")).await.unwrap().len(), 1);

    let report = |v: serde_json::Value| -> flotilla_proto::OtaStatus { message(v) };
    let mut tx = store.begin_write().await.unwrap();
    // Another device's report, and a report without an id, change nothing.
    assert!(
        tx.apply_ota_status(
            &dev("e"),
            &report(json!({"status": "FAILED", "id": "u2"})),
            10
        )
        .await
        .unwrap()
        .is_none()
    );
    assert!(
        tx.apply_ota_status(&dev("d"), &report(json!({"status": "FAILED"})), 10)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        tx.apply_ota_status(
            &dev("d"),
            &report(json!({"status": "IN_PROGRESS", "id": "u2", "progress": 50})),
            11
        )
        .await
        .unwrap()
        .is_none()
    );
    // Success with another version than offered is a failure.
    let done = tx
        .apply_ota_status(
            &dev("d"),
            &report(json!({"status": "SUCCESS", "id": "u2", "version": "1.1.9"})),
            12,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (done.state, done.rollout_id.as_deref()),
        (UpdateState::Failed, Some("r1"))
    );
    assert!(
        tx.apply_ota_status(
            &dev("d"),
            &report(json!({"status": "SUCCESS", "id": "u2", "version": "1.2.0"})),
            13
        )
        .await
        .unwrap()
        .is_none()
    );
    tx.commit().await.unwrap();
    let history = store.update_history(&dev("d"), 10).await.unwrap();
    assert_eq!(history.len(), 2);
    let (u2, events) = &history.iter().find(|(u, _)| u.id == "u2").unwrap();
    assert_eq!(
        (u2.state, u2.progress, u2.force),
        (UpdateState::Failed, Some(50), true)
    );
    assert_eq!(
        events.iter().map(|e| e.status.as_str()).collect::<Vec<_>>(),
        ["IN_PROGRESS", "SUCCESS", "SUCCESS"]
    );
    assert_eq!(
        history.iter().find(|(u, _)| u.id == "u1").unwrap().0.state,
        UpdateState::Cancelled
    );

    store
        .create_update(&NewOffer {
            id: "u3",
            device_id: &dev("e"),
            version: "1.2.0",
            force: false,
            rollout_id: Some("r2"),
            created_by: None,
            supersede_started: false,
        })
        .await
        .unwrap();
    store
        .create_update(&NewOffer {
            id: "u4",
            device_id: &dev("f"),
            version: "1.2.0",
            force: false,
            rollout_id: Some("r2"),
            created_by: None,
            supersede_started: false,
        })
        .await
        .unwrap();
    store.time_out_update("r2", &dev("e")).await.unwrap();
    assert_eq!(
        store.cancel_rollout_updates("r2", "aborted").await.unwrap(),
        1
    );
    let outcomes = store.rollout_outcomes("r2").await.unwrap();
    assert!(outcomes.contains(&("e".into(), UpdateState::Failed)));
    assert!(outcomes.contains(&("f".into(), UpdateState::Cancelled)));

    let mut tx = store.begin_write().await.unwrap();
    let fw = |v: &str| -> flotilla_proto::Heartbeat { message(json!({"heap": 1, "fw": v})) };
    tx.apply_update(&dev("d"), &DeviceUpdate::Heartbeat(fw("1.2.0")), 20)
        .await
        .unwrap();
    tx.apply_update(&dev("e"), &DeviceUpdate::Heartbeat(fw("1.2.0")), 20)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        store.version_distribution(None).await.unwrap(),
        [(Some("1.2.0".to_string()), 2), (None, 1)]
    );
    assert!(
        store
            .version_distribution(Some(o + 1))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn rollouts_and_their_outcomes(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let config = json!({"phases": [10, 100], "failureThreshold": 0.2});
    let r = store
        .create_rollout("r1", "1.2.0", &config, &["d1".into(), "d2".into()], o)
        .await
        .unwrap();
    assert_eq!(
        (r.state, r.phase, r.targets.len()),
        (RolloutState::Scheduled, None, 2)
    );
    // Targets keep their order across statement chunks.
    let many: Vec<String> = (0..2_500).rev().map(|i| format!("dev-{i}")).collect();
    store
        .create_rollout("r2", "1.3.0", &json!({}), &many, o)
        .await
        .unwrap();
    assert_eq!(store.rollout("r2").await.unwrap().unwrap().targets, many);
    let listed = store.rollouts().await.unwrap();
    assert_eq!(
        listed.iter().find(|r| r.id == "r1").unwrap().targets,
        ["d1", "d2"]
    );
    assert_eq!(listed.iter().find(|r| r.id == "r2").unwrap().targets, many);
    let save = |state, phase| RolloutSave {
        id: "r1",
        state,
        phase,
        halt: None,
        reason: None,
        wait_until: Some(1_000),
        forgiven_failed: 0,
        forgiven_succeeded: 0,
        overrides: 0,
        targets: Vec::new(),
        offers: Vec::new(),
        answered_control: None,
        cancel_unstarted: None,
        audit: Vec::new(),
    };
    store
        .save_rollout(&save(RolloutState::Running, Some(1)))
        .await
        .unwrap();
    store
        .save_rollout(&save(RolloutState::Paused, None))
        .await
        .unwrap();
    let r1 = store.rollout("r1").await.unwrap().unwrap();
    assert_eq!(
        (r1.state, r1.phase, r1.config.clone(), r1.wait_until),
        (RolloutState::Paused, Some(1), config, Some(1_000))
    );
    // A decision saves target states and records its offers in the same transaction.
    let d2 = dev("d2");
    let offers = store
        .save_rollout(&RolloutSave {
            halt: Some(RolloutHalt::TooManyFailures),
            reason: Some("stopped itself"),
            forgiven_failed: 3,
            forgiven_succeeded: 4,
            targets: vec![
                (0, TargetState::Skipped, None),
                (1, TargetState::InFlight, Some(77)),
            ],
            offers: vec![NewOffer {
                id: "u-r1",
                device_id: &d2,
                version: "1.2.0",
                force: false,
                rollout_id: Some("r1"),
                created_by: Some(o),
                supersede_started: false,
            }],
            ..save(RolloutState::Stopped, Some(0))
        })
        .await
        .unwrap();
    assert_eq!(offers.made.len(), 1);
    assert!(offers.busy.is_empty());
    assert_eq!(offers.made[0].rollout_id.as_deref(), Some("r1"));
    assert_eq!(store.unstarted_updates(&d2).await.unwrap().len(), 1);
    let targets = store.rollout_targets("r1").await.unwrap();
    assert_eq!(
        targets
            .iter()
            .map(|t| (t.device_id.as_str(), t.state, t.since))
            .collect::<Vec<_>>(),
        [
            ("d1", TargetState::Skipped, None),
            ("d2", TargetState::InFlight, Some(77))
        ]
    );
    assert_eq!(
        store.rollout_target_counts("r2").await.unwrap(),
        [(TargetState::Waiting, 2_500)]
    );
    // The decision's audit records are written with it.
    store
        .save_rollout(&RolloutSave {
            audit: vec![AuditRecord {
                actor: "system:rollouts",
                action: "rollout.transition",
                target: Some("r1"),
                result: "stopped",
                detail: Some("stopped itself".into()),
            }],
            halt: Some(RolloutHalt::TooManyFailures),
            reason: Some("stopped itself"),
            forgiven_failed: 3,
            forgiven_succeeded: 4,
            ..save(RolloutState::Stopped, Some(0))
        })
        .await
        .unwrap();
    let audited = store
        .audit_entries(10, Some("rollout.transition"))
        .await
        .unwrap();
    assert_eq!(
        (audited.len(), audited[0].target.as_deref()),
        (1, Some("r1"))
    );
    let r1 = store.rollout("r1").await.unwrap().unwrap();
    assert_eq!(
        (
            r1.halt,
            r1.reason.as_deref(),
            r1.forgiven_failed,
            r1.forgiven_succeeded
        ),
        (
            Some(RolloutHalt::TooManyFailures),
            Some("stopped itself"),
            3,
            4
        )
    );
    // A device working on an update is not offered another: the decision saves, and says so.
    sqlx::query("UPDATE ota_updates SET state = 'started' WHERE id = 'u-r1'")
        .execute(&store.pool)
        .await
        .unwrap();
    let again = NewOffer {
        id: "u-r1-again",
        device_id: &d2,
        version: "1.2.0",
        force: false,
        rollout_id: Some("r1"),
        created_by: Some(o),
        supersede_started: false,
    };
    let saved = store
        .save_rollout(&RolloutSave {
            offers: vec![again.clone()],
            ..save(RolloutState::Stopped, Some(0))
        })
        .await
        .unwrap();
    assert_eq!((saved.made.len(), saved.busy), (0, vec![d2.clone()]));
    assert_eq!(
        store.rollout_targets("r1").await.unwrap()[1].state,
        TargetState::Waiting,
        "a target that could not be offered is not saved in flight"
    );
    assert!(matches!(
        store.create_update(&again).await,
        Err(StoreError::Conflict(_))
    ));
    let superseding = store
        .create_update(&NewOffer {
            supersede_started: true,
            ..again
        })
        .await
        .unwrap();
    assert_eq!(superseding.update.id, "u-r1-again");
    assert_eq!(
        superseding
            .withdrawn
            .iter()
            .map(|w| w.update_id.as_str())
            .collect::<Vec<_>>(),
        ["u-r1"],
        "the started update it replaced, for the device to be told"
    );
    // An operator cancels the device's open update (started here); then there is none.
    let cancelled = store
        .cancel_open_update(&d2, "cancelled by user:1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            cancelled.id.as_str(),
            cancelled.state,
            cancelled.rollout_id.as_deref()
        ),
        ("u-r1-again", UpdateState::Cancelled, Some("r1"))
    );
    assert!(
        store
            .cancel_open_update(&d2, "again")
            .await
            .unwrap()
            .is_none()
    );
    // An update whose image is all downloaded is past recall.
    store
        .create_update(&NewOffer {
            id: "u-r1-installing",
            ..again
        })
        .await
        .unwrap();
    run_sql(
        store,
        "UPDATE ota_updates SET state = 'in_progress', progress = 100 WHERE id = 'u-r1-installing'",
        &[],
    )
    .await;
    assert!(matches!(
        store.cancel_open_update(&d2, "late").await,
        Err(StoreError::Conflict(_))
    ));
    // A rollout that ends cancels its unstarted offers and puts their targets back to
    // waiting (an override offers them again); a started one stays in flight.
    store
        .create_rollout("r3", "1.2.0", &json!({}), &["c1".into(), "c2".into()], o)
        .await
        .unwrap();
    let (c1, c2) = (dev("c1"), dev("c2"));
    let offer = |id: &'static str, device_id| NewOffer {
        id,
        device_id,
        version: "1.2.0",
        force: false,
        rollout_id: Some("r3"),
        created_by: None,
        supersede_started: false,
    };
    let r3 = |state, cancel| RolloutSave {
        id: "r3",
        cancel_unstarted: cancel,
        ..save(state, Some(0))
    };
    store
        .save_rollout(&RolloutSave {
            targets: vec![
                (0, TargetState::InFlight, Some(1)),
                (1, TargetState::InFlight, Some(1)),
            ],
            offers: vec![offer("u-c1", &c1), offer("u-c2", &c2)],
            ..r3(RolloutState::Running, None)
        })
        .await
        .unwrap();
    sqlx::query("UPDATE ota_updates SET state = 'started' WHERE id = 'u-c1'")
        .execute(&store.pool)
        .await
        .unwrap();
    let stopped = store
        .save_rollout(&r3(RolloutState::Stopped, Some("rollout stopped")))
        .await
        .unwrap();
    assert_eq!(
        stopped.withdrawn,
        [crate::Withdrawn {
            device_id: c2.clone(),
            update_id: "u-c2".into()
        }],
        "the unstarted offer a stopped rollout cancels, for its device to be told"
    );
    assert_eq!(
        store
            .rollout_targets("r3")
            .await
            .unwrap()
            .iter()
            .map(|t| t.state)
            .collect::<Vec<_>>(),
        [TargetState::InFlight, TargetState::Waiting]
    );
    assert!(store.unstarted_updates(&c2).await.unwrap().is_empty());
    // An operator's request waits for the leader until a decision answers it.
    assert!(
        store
            .request_rollout_control("r1", "resume", "user:1")
            .await
            .unwrap()
    );
    assert!(
        !store
            .request_rollout_control("nope", "resume", "user:1")
            .await
            .unwrap()
    );
    assert_eq!(
        store.rollout_controls().await.unwrap(),
        [("r1".to_string(), "resume".to_string(), "user:1".to_string())]
    );
    store
        .save_rollout(&RolloutSave {
            answered_control: Some("pause"),
            ..save(RolloutState::Running, Some(0))
        })
        .await
        .unwrap();
    assert_eq!(
        store.rollout_controls().await.unwrap().len(),
        1,
        "another request stays"
    );
    store
        .save_rollout(&RolloutSave {
            answered_control: Some("resume"),
            ..save(RolloutState::Running, Some(0))
        })
        .await
        .unwrap();
    assert!(store.rollout_controls().await.unwrap().is_empty());
    assert_eq!(store.rollouts().await.unwrap().len(), 3);
    assert!(store.rollout("nope").await.unwrap().is_none());
}

/// A stand-in signature for checkpoints: the statement's SHA-256 (the server signs with its
/// CA key; that is tested where the key is).
fn test_signature(statement: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(statement).to_vec()
}

async fn verify_chain(store: &Store) -> Result<flotilla_audit::Summary, flotilla_audit::Break> {
    let checkpoints = store.audit_checkpoints().await.unwrap();
    let mut v = flotilla_audit::Verifier::new(&checkpoints, |m, s| test_signature(m) == s)?;
    let mut after = 0;
    loop {
        let page = store.audit_chain(after, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            v.push_record(r)?;
        }
    }
    v.finish()
}

async fn the_audit_log_is_a_chain_that_names_the_first_edited_record(store: &Store) {
    // Rows from before the chain existed are chained when the store opens.
    for actor in ["old:1", "old:2"] {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, result) VALUES (1, $1, 'legacy', 'success')",
        )
        .bind(actor)
        .execute(&store.pool)
        .await
        .unwrap();
    }
    assert_eq!(super::audit::seal_unchained(store).await.unwrap(), 2);
    // Appends that race are chained in commit order, each once.
    let writes = (0..18).map(|i| {
        let store = store.clone();
        async move {
            let detail = format!("write {i}");
            store
                .audit(AuditRecord {
                    actor: "user:1",
                    action: "admin.device.block",
                    target: Some("dev"),
                    result: "success",
                    detail: Some(detail),
                })
                .await
        }
    });
    futures::future::join_all(writes).await;
    let s = verify_chain(store).await.unwrap();
    assert_eq!((s.records, s.first_seq, s.last_seq), (20, 1, 20));
    let head = store.audit_head().await.unwrap();
    assert_eq!((head.seq, head.hash), (20, s.head));

    // The export mark never passes the head nor goes back.
    assert_eq!(store.mark_audit_exported(0, 8).await.unwrap(), 8);
    assert_eq!(store.mark_audit_exported(0, 5).await.unwrap(), 8);
    // A copy that starts past the mark leaves a gap nobody holds.
    assert!(matches!(
        store.mark_audit_exported(9, 12).await,
        Err(crate::StoreError::Conflict(_))
    ));
    assert!(store.audit_removal(0).await.unwrap().is_none());
    let removal = store.audit_removal(now_ms() + 1).await.unwrap().unwrap();
    assert_eq!((removal.seq, removal.count), (8, 8));
    let checkpoint = |seq: u64, hash: &flotilla_audit::Hash, removed: u64| {
        let statement = flotilla_audit::Checkpoint::statement(seq, hash, 5, removed);
        flotilla_audit::Checkpoint {
            seq,
            hash: flotilla_audit::to_hex(hash),
            at: 5,
            removed,
            signature: hex_of(&test_signature(&statement)),
        }
    };
    // A head marked at the very seq the removal reaches gives way to the removal.
    store
        .add_audit_checkpoint(&checkpoint(removal.seq, &removal.hash, 0))
        .await
        .unwrap();
    let removed = store
        .add_audit_checkpoint(&checkpoint(removal.seq, &removal.hash, removal.count))
        .await
        .unwrap();
    assert_eq!(removed, 8);
    let anchors = store.audit_checkpoints().await.unwrap();
    assert_eq!(
        anchors
            .iter()
            .map(|c| (c.seq, c.removed))
            .collect::<Vec<_>>(),
        [(8, 8)]
    );
    assert_eq!(
        store
            .add_audit_checkpoint(&checkpoint(20, &head.hash, 0))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.mark_audit_exported(8, u64::MAX).await.unwrap(), 20);
    let s = verify_chain(store).await.unwrap();
    assert_eq!(
        (s.records, s.first_seq, s.last_seq, s.checkpoints),
        (12, 9, 20, 2)
    );

    // A row written into the table directly, after the chain began, is not chained at the
    // next open.
    run_sql(
        store,
        "INSERT INTO audit (at, actor, action, result) VALUES ($1, 'intruder', 'x', 'success')",
        &[now_ms()],
    )
    .await;
    assert_eq!(super::audit::seal_unchained(store).await.unwrap(), 0);
    assert_eq!(verify_chain(store).await.unwrap().last_seq, 20);

    // One edited row: the verifier names it.
    sqlx::query("UPDATE audit SET detail = 'nothing happened' WHERE seq = 12")
        .execute(&store.pool)
        .await
        .unwrap();
    match verify_chain(store).await {
        Err(flotilla_audit::Break::Record { seq: 12, .. }) => {}
        other => panic!("an edited record went unnoticed: {other:?}"),
    }
}

async fn run_sql(store: &Store, sql: &str, binds: &[i64]) {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(*b);
    }
    q.execute(&store.pool).await.unwrap();
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&store.pool)
        .await
        .unwrap()
}

async fn retention_removes_old_rows_of_each_kind_and_nothing_else(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for d in ["d", "e"] {
        store.register_device(&dev(d), d, o).await.unwrap();
    }
    let (old, cutoff, fresh) = (1_000i64, 5_000i64, 9_000i64);
    // d: ten old readings and ten fresh; e: thirty fresh, to trim to its newest ten.
    for seq in 1..=20 {
        let at = if seq <= 10 { old } else { fresh };
        run_sql(
            store,
            "INSERT INTO telemetry (device_id, seq, received_at) VALUES ('d', $1, $2)",
            &[seq, at],
        )
        .await;
    }
    for seq in 1..=30 {
        run_sql(
            store,
            "INSERT INTO telemetry (device_id, seq, received_at) VALUES ('e', $1, $2)",
            &[seq, fresh],
        )
        .await;
    }
    for (i, at) in [old, old, fresh].into_iter().enumerate() {
        run_sql(
            store,
            "INSERT INTO ota_events (update_id, at, status) VALUES ('u', $1, 'downloading')",
            &[at],
        )
        .await;
        run_sql(
            store,
            "INSERT INTO dead_letters (topic, payload, reason, at) VALUES ('t', '', 'r', $1)",
            &[at],
        )
        .await;
        let token = format!(
            "INSERT INTO provisioning_tokens (token_hash, owner_id, expires_at, created_at) VALUES ('h{i}', $1, $2, 0)"
        );
        run_sql(store, &token, &[o, at]).await;
    }
    // Finished long ago, finished lately, and open since long ago (never removed by age).
    for (id, state, completed) in [
        ("c1", "succeeded", Some(old)),
        ("c2", "failed", Some(fresh)),
        ("c3", "queued", None),
    ] {
        sqlx::query("INSERT INTO commands (id, device_id, name, args, state, created_at, expires_at, completed_at) VALUES ($1, 'd', 'ping', '{}', $2, 0, 0, $3)")
            .bind(id).bind(state).bind(completed)
            .execute(&store.pool).await.unwrap();
    }

    for kind in RetentionKind::ALL {
        let mut removed = 0;
        loop {
            let n = store.delete_expired(kind, cutoff, 3).await.unwrap();
            assert!(n <= 3, "{kind:?} deleted {n} in a batch of 3");
            if n == 0 {
                break;
            }
            removed += n;
        }
        let expected = match kind {
            RetentionKind::Telemetry => 10,
            RetentionKind::FinishedCommands => 1,
            _ => 2,
        };
        assert_eq!(removed, expected, "{kind:?}");
        store
            .record_retention_run(kind.as_str(), 7, removed)
            .await
            .unwrap();
    }
    let mut trimmed = 0;
    for device in store.device_ids_after(None, 10).await.unwrap() {
        loop {
            let n = store.trim_device_telemetry(&device, 10, 4).await.unwrap();
            if n == 0 {
                break;
            }
            trimmed += n;
        }
    }
    assert_eq!(trimmed, 20);
    assert_eq!(
        store.device_ids_after(Some(&dev("d")), 10).await.unwrap(),
        vec![dev("e")]
    );
    assert_eq!(
        count(
            store,
            "SELECT COUNT(*) FROM telemetry WHERE device_id = 'd' AND seq > 10"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            store,
            "SELECT MIN(seq) FROM telemetry WHERE device_id = 'e'"
        )
        .await,
        21
    );
    let c: Vec<String> = sqlx::query_scalar("SELECT id FROM commands ORDER BY id")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(c, ["c2", "c3"]);
    store.record_retention_run("telemetry", 8, 5).await.unwrap();
    let f = store.storage_figures().await.unwrap();
    assert_eq!(
        (
            f.telemetry_rows,
            f.ota_events,
            f.commands,
            f.provisioning_tokens,
            f.dead_letters
        ),
        (20, 1, 2, 1, 1)
    );
    assert!(f.database_bytes > 0);
    let telemetry = f.retention.iter().find(|r| r.kind == "telemetry").unwrap();
    assert_eq!(
        (telemetry.at, telemetry.deleted, telemetry.total_deleted),
        (8, 5, 15)
    );
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn audit_and_fleet_figures(store: &Store) {
    for (i, action) in ["user.login", "device.block", "user.login"]
        .iter()
        .enumerate()
    {
        store
            .audit(AuditRecord {
                actor: "a",
                action,
                target: Some("t"),
                result: if i == 0 { "failure" } else { "success" },
                detail: None,
            })
            .await;
    }
    let logins = store.audit_entries(10, Some("user.login")).await.unwrap();
    assert_eq!(logins.len(), 2);
    assert!(logins[0].id > logins[1].id);
    assert_eq!(
        store.audit_entries(1, None).await.unwrap()[0].action,
        "user.login"
    );
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    store
        .create_command("c", &dev("d"), "ping", &json!({}), o, now_ms() + 60_000)
        .await
        .unwrap();
    store
        .create_rollout("r", "1.0.0", &json!({}), &[], o)
        .await
        .unwrap();
    let g = store.fleet_gauges().await.unwrap();
    assert_eq!(
        (
            g.devices,
            g.online,
            g.device_certificates,
            g.first_cert_expiry_ms
        ),
        (1, 0, 0, None)
    );
    assert_eq!(g.commands, [("queued".to_string(), 1)]);
    assert_eq!(g.rollouts, [("scheduled".to_string(), 1)]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats["users"].as_i64(),
            stats["devices"].as_i64(),
            stats["commands"].as_i64()
        ),
        (Some(1), Some(1), Some(1))
    );
}

/// Opening runs migrations again and changes nothing; a database from before sqlx's migrator
/// (its own `schema_migrations` table) is adopted, not migrated twice.
#[tokio::test]
async fn reopening_and_legacy_sqlite_databases_migrate_once() {
    let db = TestDb::sqlite().await;
    user(db.store(), "kept@x", Role::Admin).await;
    let again = Store::open(&db.url).await.unwrap();
    assert!(again.user_by_email("kept@x").await.unwrap().is_some());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.db");
    {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .unwrap();
        sqlx::raw_sql("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        for (version, file) in [
            (1, include_str!("../migrations/sqlite/0001_initial.sql")),
            (
                2,
                include_str!("../migrations/sqlite/0002_device_uptime.sql"),
            ),
            (
                3,
                include_str!("../migrations/sqlite/0003_releases_and_ota.sql"),
            ),
            (
                4,
                include_str!("../migrations/sqlite/0004_dead_letters_and_retained.sql"),
            ),
        ] {
            sqlx::raw_sql(file).execute(&mut conn).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, 0)")
                .bind(version)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO users (username, email, password_hash, role, created_at) VALUES ('old', 'old@x', 'h', 'admin', 0);
             INSERT INTO devices (device_id, owner_id, name, created_at, tags) VALUES ('tagged', 1, 't', 0, '[\"b\",\"a\",7]');
             INSERT INTO devices (device_id, owner_id, name, created_at, tags) VALUES ('garbled', 1, 'g', 0, 'not json');
             INSERT INTO rollouts (id, version, config, targets, state, created_at, updated_at) VALUES ('r', '1.0.0', '{}', '[\"z\",\"tagged\",\"a\"]', 'paused', 0, 0);
             INSERT INTO ota_updates (id, device_id, version, force, rollout_id, state, created_at, updated_at) VALUES ('u1', 'tagged', '1.0.0', 0, 'r', 'started', 5, 5);
             INSERT INTO ota_updates (id, device_id, version, force, rollout_id, state, error, created_at, updated_at) VALUES ('u2', 'a', '1.0.0', 0, 'r', 'failed', 'timed out', 6, 6);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // Versions 5 and 6 are applied now; 1-4 are not run again (they would fail: tables exist).
    // Tags and targets move from JSON arrays to rows, keeping the targets' order; what is not
    // a list of strings is dropped, not an error.
    let store = Store::open_file(&path).await.unwrap();
    assert!(store.user_by_email("old@x").await.unwrap().is_some());
    assert_eq!(
        store.device(&dev("tagged")).await.unwrap().unwrap().tags,
        ["a", "b"]
    );
    assert!(
        store
            .device(&dev("garbled"))
            .await
            .unwrap()
            .unwrap()
            .tags
            .is_empty()
    );
    let r = store.rollout("r").await.unwrap().unwrap();
    assert_eq!(
        (r.state, r.targets),
        (
            RolloutState::Paused,
            vec!["z".into(), "tagged".into(), "a".into()]
        )
    );
    // Each target's state is taken from its latest offer.
    assert_eq!(
        store
            .rollout_targets("r")
            .await
            .unwrap()
            .iter()
            .map(|t| (t.state, t.since))
            .collect::<Vec<_>>(),
        [
            (TargetState::Waiting, None),
            (TargetState::InFlight, Some(5)),
            (TargetState::TimedOut, None)
        ]
    );
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'commands_expiry'",
    )
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["commands_expiry"]);
    Store::open_file(&path).await.unwrap();
}

async fn concurrent_registrations_of_one_id_give_it_one_owner(store: &Store) {
    let a = user(store, "a@x", Role::Operator).await;
    let b = user(store, "b@x", Role::Operator).await;
    for round in 0..20 {
        let id = format!("contested-{round}");
        let (s1, s2, i1, i2) = (store.clone(), store.clone(), id.clone(), id.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { s1.register_device(&dev(&i1), "a", a).await }),
            tokio::spawn(async move { s2.register_device(&dev(&i2), "b", b).await }),
        );
        let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
        assert!(x != y, "round {round}: both {x}");
        let owner = store.device(&dev(&id)).await.unwrap().unwrap().owner_id;
        assert_eq!(owner, if x { a } else { b });
    }
}

async fn concurrent_offers_leave_one_open(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    for round in 0..20 {
        let offers: Vec<_> = (0..3)
            .map(|i| {
                let s = store.clone();
                let id = format!("u{round}-{i}");
                tokio::spawn(async move {
                    s.create_update(&NewOffer {
                        id: &id,
                        device_id: &dev("d"),
                        version: "1.2.0",
                        force: false,
                        rollout_id: None,
                        created_by: None,
                        supersede_started: false,
                    })
                    .await
                })
            })
            .collect();
        for offer in offers {
            offer.await.unwrap().unwrap();
        }
        let open = store
            .update_history(&dev("d"), 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|(u, _)| !u.state.is_final())
            .count();
        assert_eq!(open, 1, "round {round}");
    }
}

async fn concurrent_tag_replacements_leave_one_set(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    let one: Vec<String> = (0..50).map(|i| format!("a{i:02}")).collect();
    let other: Vec<String> = (0..50).map(|i| format!("b{i:02}")).collect();
    for round in 0..20 {
        let (s1, s2, t1, t2) = (store.clone(), store.clone(), one.clone(), other.clone());
        let (x, y) = tokio::join!(
            tokio::spawn(async move { s1.set_device_tags(&dev("d"), &t1).await }),
            tokio::spawn(async move { s2.set_device_tags(&dev("d"), &t2).await }),
        );
        x.unwrap().unwrap();
        y.unwrap().unwrap();
        let tags = store.device(&dev("d")).await.unwrap().unwrap().tags;
        assert!(
            tags == one || tags == other,
            "round {round}: {} tags",
            tags.len()
        );
    }
}

async fn a_block_committed_while_a_message_is_stored_wins(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    // Another connection blocks the device and holds its transaction open...
    let mut blocker = store.pool.acquire().await.unwrap();
    let begin = if store.backend == Backend::Sqlite {
        "BEGIN IMMEDIATE"
    } else {
        "BEGIN"
    };
    sqlx::raw_sql(begin).execute(&mut *blocker).await.unwrap();
    sqlx::query("UPDATE devices SET blocked = 1 WHERE device_id = 'd'")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // ...while ingest stores a heartbeat and a reading of that device.
    let s = store.clone();
    let ingest = tokio::spawn(async move {
        let hb: flotilla_proto::Heartbeat = message(json!({"heap": 5, "fw": "1.0.0"}));
        let t: flotilla_proto::Telemetry = message(json!({"seq": 1}));
        let mut tx = s.begin_write().await.unwrap();
        let online = tx
            .apply_update(&dev("d"), &DeviceUpdate::Heartbeat(hb), 10)
            .await
            .unwrap();
        tx.apply_readings(&[(&dev("d"), &t, 10)]).await.unwrap();
        tx.commit().await.unwrap();
        online
    });
    // Ingest is waiting on the blocker now: on PostgreSQL for its row lock (seen in
    // pg_stat_activity), on SQLite in its busy timeout for the write lock.
    if store.backend == Backend::Postgres {
        crate::testdb::wait_until_a_query_waits_for_a_lock(store).await;
    } else {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert!(!ingest.is_finished(), "ingest did not wait for the block");
    sqlx::raw_sql("COMMIT")
        .execute(&mut *blocker)
        .await
        .unwrap();
    assert!(!ingest.await.unwrap(), "a blocked device came online");
    let d = store.device(&dev("d")).await.unwrap().unwrap();
    assert_eq!((d.blocked, d.online, d.heap), (true, false, None));
    assert!(store.telemetry(&dev("d"), 10).await.unwrap().is_empty());
}

/// Replicas starting together on a fresh database: both open it, each migration runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_opening_a_fresh_postgres_database_at_once_migrate_it_once() {
    let db = TestDb::postgres_empty().await;
    let (a, b) = tokio::join!(Store::open(&db.url), Store::open(&db.url));
    let (a, _b) = (a.unwrap(), b.unwrap());
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&a.pool)
            .await
            .unwrap();
    assert_eq!(applied, (1..=15).collect::<Vec<i64>>());
    user(&a, "one@x", Role::Admin).await;
}

/// A command's state change committed through one store reaches a listener of another (two
/// replicas) as a notice naming it; creating a command (no change of state) sends none, and
/// SQLite has no notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_state_changes_are_noticed_by_every_listener_on_postgres() {
    let db = TestDb::postgres().await;
    let (writer, other) = (db.store(), Store::open(&db.url).await.unwrap());
    let mut notices = other.command_notices().await.unwrap().unwrap();
    let o = user(writer, "o@x", Role::Operator).await;
    writer.register_device(&dev("d"), "d", o).await.unwrap();
    let far = now_ms() + 600_000;
    for id in ["c1", "c2"] {
        writer
            .create_command(id, &dev("d"), "ping", &json!({}), o, far)
            .await
            .unwrap();
    }
    // Creating c1 and c2 is no state change: the first notice names c3, which the sweep
    // expires.
    writer
        .create_command("c3", &dev("d"), "ping", &json!({}), o, now_ms() - 1)
        .await
        .unwrap();
    assert_eq!(writer.expire_commands().await.unwrap(), 1);
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), notices.next())
        .await
        .expect("a notice within 5 s")
        .unwrap();
    assert_eq!(next, "c3");
    let sqlite = TestDb::sqlite().await;
    assert!(sqlite.store().command_notices().await.unwrap().is_none());
}

/// Something other than this code wrote a device id no device can have: listing the devices
/// fails with a refusal naming it, instead of handing the id on.
async fn a_stored_device_id_that_is_not_valid_refuses_the_read(store: &Store) {
    let owner = store
        .create_user("o", "o@x", "h", Role::Admin)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO devices (device_id, owner_id, name, online, created_at) VALUES ($1, $2, 'x', 0, 0)",
    )
    .bind("has/slash")
    .bind(owner)
    .execute(&store.pool)
    .await
    .unwrap();
    match store.devices_of(None).await {
        Err(StoreError::Refused(cause)) => {
            assert!(cause.to_string().contains("has/slash"), "{cause}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A command row naming it is refused the same way.
    sqlx::query(
        "INSERT INTO commands (id, device_id, name, args, state, created_at, expires_at) \
         VALUES ('c1', 'has/slash', 'ping', '{}', 'queued', 0, 0)",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    assert!(matches!(
        store.command("c1").await,
        Err(StoreError::Refused(_))
    ));
}

fn issued(serial_hex: &str, not_after_unix: i64) -> flotilla_pki::IssuedCertificate {
    flotilla_pki::IssuedCertificate {
        certificate_pem: String::new(),
        serial_hex: serial_hex.into(),
        not_after_unix,
    }
}

async fn provision(
    store: &Store,
    owner: i64,
    token: &str,
    device: &str,
    cert: &flotilla_pki::IssuedCertificate,
) {
    store
        .create_token(token, owner, None, now_ms() + 600_000)
        .await
        .unwrap();
    assert_eq!(
        store.redeem_token(token, &dev(device), cert).await.unwrap(),
        TokenClaim::Claimed { owner_id: owner }
    );
}

async fn revoked_and_superseded_certificates_reach_the_broker_denials(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let later = 1_900_000_000;
    assert_eq!(
        store.broker_denials().await.unwrap(),
        BrokerDenials::default()
    );
    provision(store, o, "t1", "a", &issued("a1", later)).await;
    provision(store, o, "t2", "b", &issued("b1", later)).await;
    // A certificate that has expired is refused anyway: the CRL need not list it.
    provision(store, o, "t3", "c", &issued("c1", 1_000_000)).await;
    assert_eq!(
        store.broker_denials().await.unwrap(),
        BrokerDenials::default()
    );

    // Re-provisioned: the old serial is superseded; the device is not denied.
    provision(store, o, "t4", "a", &issued("a2", later)).await;
    // Revoked by an admin: the device holds no certificate and is denied.
    assert!(store.revoke_device_certificate(&dev("b")).await.unwrap());
    assert!(!store.revoke_device_certificate(&dev("b")).await.unwrap());
    assert!(matches!(
        store.revoke_device_certificate(&dev("nobody")).await,
        Err(StoreError::NotFound)
    ));
    assert!(store.revoke_device_certificate(&dev("c")).await.unwrap());
    // Blocked without a revocation: denied, its serial stays valid.
    store.register_device(&dev("d"), "d", o).await.unwrap();
    store.toggle_device_block(&dev("d")).await.unwrap();
    // Never provisioned, not blocked: nothing to deny.
    store.register_device(&dev("e"), "e", o).await.unwrap();

    let denials = store.broker_denials().await.unwrap();
    assert_eq!(denials.denied_devices, vec![dev("b"), dev("c"), dev("d")]);
    let revoked: Vec<(&str, &str, RevokeReason)> = denials
        .revoked
        .iter()
        .map(|r| (r.serial_hex.as_str(), r.device_id.as_str(), r.reason))
        .collect();
    assert_eq!(
        revoked,
        vec![
            ("a1", "a", RevokeReason::Superseded),
            ("b1", "b", RevokeReason::Revoked)
        ]
    );
    assert!(denials.revoked.iter().all(|r| r.revoked_at > 0));
    let b = store.device(&dev("b")).await.unwrap().unwrap();
    assert!(!b.provisioned);

    // Provisioned again: no longer denied; the revoked serial stays listed.
    provision(store, o, "t5", "b", &issued("b2", later)).await;
    let denials = store.broker_denials().await.unwrap();
    assert_eq!(denials.denied_devices, vec![dev("c"), dev("d")]);
    assert_eq!(denials.revoked.len(), 2);
}

fn gate_of(entries: &[GateEntry], device: &str) -> (Option<String>, Option<String>) {
    let e = entries.iter().find(|e| e.device_id == device).unwrap();
    (e.serial.clone(), e.pending_serial.clone())
}

fn revoked_serials(denials: &BrokerDenials) -> Vec<(&str, RevokeReason)> {
    denials
        .revoked
        .iter()
        .map(|r| (r.serial_hex.as_str(), r.reason))
        .collect()
}

async fn a_renewed_certificate_is_valid_beside_the_old_one_until_it_is_used(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let later = 1_900_000_000;
    let pair = |a: &str, b: Option<&str>| (Some(a.to_string()), b.map(String::from));
    provision(store, o, "t1", "a", &issued("a1", later)).await;
    assert_eq!(
        store.renewal_refusal(&dev("a"), "a1", 0).await.unwrap(),
        Ok(())
    );
    let renew = |presented: &'static str, serial: &'static str, interval: i64| async move {
        store
            .renew_device_certificate(&dev("a"), presented, &issued(serial, later), interval)
            .await
            .unwrap()
    };
    assert_eq!(renew("a1", "a2", 0).await, Ok(()));
    assert_eq!(
        gate_of(&store.gate_snapshot().await.unwrap(), "a"),
        pair("a1", Some("a2"))
    );
    // Both stay valid: nothing is denied or listed yet.
    assert_eq!(
        store.broker_denials().await.unwrap(),
        BrokerDenials::default()
    );
    // Only the current certificate renews, and not twice within the interval.
    assert_eq!(renew("a2", "x", 0).await, Err(RenewalRefusal::NotCurrent));
    assert!(matches!(
        renew("a1", "x", 600_000).await,
        Err(RenewalRefusal::TooSoon { retry_after_ms }) if retry_after_ms > 0 && retry_after_ms <= 600_000
    ));
    // A second renewal replaces the unused pending one, which is revoked.
    assert_eq!(renew("a1", "a3", 0).await, Ok(()));
    assert_eq!(
        revoked_serials(&store.broker_denials().await.unwrap()),
        vec![("a2", RevokeReason::Superseded)]
    );
    assert_eq!(
        store
            .promote_device_certificate(&dev("a"), "a2")
            .await
            .unwrap(),
        Promotion::Unknown
    );
    assert_eq!(
        store
            .promote_device_certificate(&dev("a"), "a3")
            .await
            .unwrap(),
        Promotion::Promoted {
            superseded: Some("a1".into())
        }
    );
    assert_eq!(
        store
            .promote_device_certificate(&dev("a"), "a3")
            .await
            .unwrap(),
        Promotion::AlreadyCurrent
    );
    assert_eq!(
        gate_of(&store.gate_snapshot().await.unwrap(), "a"),
        pair("a3", None)
    );
    let denials = store.broker_denials().await.unwrap();
    assert!(denials.denied_devices.is_empty());
    assert_eq!(
        revoked_serials(&denials),
        vec![
            ("a1", RevokeReason::Superseded),
            ("a2", RevokeReason::Superseded)
        ]
    );
    let a = store.device(&dev("a")).await.unwrap().unwrap();
    assert!(a.provisioned);

    // Re-provisioning and an admin's revocation take the pending certificate with them.
    assert_eq!(renew("a3", "a4", 0).await, Ok(()));
    provision(store, o, "t2", "a", &issued("a5", later)).await;
    assert_eq!(
        gate_of(&store.gate_snapshot().await.unwrap(), "a"),
        pair("a5", None)
    );
    assert_eq!(
        store
            .promote_device_certificate(&dev("a"), "a4")
            .await
            .unwrap(),
        Promotion::Unknown
    );
    assert_eq!(renew("a5", "a6", 0).await, Ok(()));
    assert!(store.revoke_device_certificate(&dev("a")).await.unwrap());
    let gate = store.gate_snapshot().await.unwrap();
    assert_eq!(gate_of(&gate, "a"), (None, None));
    let denials = store.broker_denials().await.unwrap();
    assert_eq!(denials.denied_devices, vec![dev("a")]);
    let listed: Vec<&str> = denials
        .revoked
        .iter()
        .map(|r| r.serial_hex.as_str())
        .collect();
    assert_eq!(listed, vec!["a1", "a2", "a3", "a4", "a5", "a6"]);

    // A blocked device does not renew; an unknown one is not found.
    provision(store, o, "t3", "b", &issued("b1", later)).await;
    store.toggle_device_block(&dev("b")).await.unwrap();
    assert_eq!(
        store.renewal_refusal(&dev("b"), "b1", 0).await.unwrap(),
        Err(RenewalRefusal::Blocked)
    );
    assert_eq!(
        store
            .renew_device_certificate(&dev("b"), "b1", &issued("b2", later), 0)
            .await
            .unwrap(),
        Err(RenewalRefusal::Blocked)
    );
    assert!(matches!(
        store.renewal_refusal(&dev("nobody"), "x", 0).await,
        Err(StoreError::NotFound)
    ));
}

async fn the_security_report_lists_what_needs_attention_and_nothing_else(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let day = 86_400;
    let now = now_ms() / 1000;
    provision(store, o, "t1", "soon", &issued("s1", now + 3 * day)).await;
    provision(store, o, "t2", "sooner", &issued("s2", now + day)).await;
    provision(store, o, "t3", "later", &issued("l1", now + 90 * day)).await;
    provision(store, o, "t4", "revoked", &issued("r1", now + 90 * day)).await;
    provision(store, o, "t5", "blocked", &issued("b1", now + 90 * day)).await;
    provision(store, o, "t6", "crashy", &issued("c1", now + 90 * day)).await;
    // Registered, never provisioned: not "never seen since provisioning".
    store
        .register_device(&dev("bare"), "bare", o)
        .await
        .unwrap();
    store
        .renew_device_certificate(&dev("soon"), "s1", &issued("s1b", now + 90 * day), 0)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .revoke_device_certificate(&dev("revoked"))
            .await
            .unwrap()
    );
    store.toggle_device_block(&dev("blocked")).await.unwrap();
    let mut tx = store.begin_write().await.unwrap();
    let beat = |crashes: u32| -> flotilla_proto::Heartbeat {
        message(json!({"heap": 1, "fw": "1.0.0", "uptime": 12, "crashes": crashes}))
    };
    // The revoked device still reports (as through an external broker nobody synced).
    for (device, crashes) in [("crashy", 5), ("later", 2), ("sooner", 3), ("revoked", 0)] {
        tx.apply_update(&dev(device), &DeviceUpdate::Heartbeat(beat(crashes)), 20)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let report = store
        .security_report((now + 7 * day) * 1000, 3, 100)
        .await
        .unwrap();
    let ids = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
    let expiring: Vec<(String, bool)> = report
        .expiring_certificates
        .iter()
        .map(|e| (e.device_id.clone(), e.renewal_pending))
        .collect();
    assert_eq!(
        expiring,
        vec![("sooner".into(), false), ("soon".into(), true)]
    );
    assert_eq!(
        report.expiring_certificates[0].not_after,
        (now + day) * 1000
    );
    // Blocked but never online: not listed; revoked and reporting: listed.
    let denied: Vec<(String, bool, bool)> = report
        .denied_but_connected
        .iter()
        .map(|d| (d.device_id.clone(), d.blocked, d.revoked))
        .collect();
    assert_eq!(denied, vec![("revoked".into(), false, true)]);
    let crashing: Vec<String> = report
        .crash_loops
        .iter()
        .map(|c| c.device_id.clone())
        .collect();
    assert_eq!(crashing, ids(vec!["crashy", "sooner"]));
    assert_eq!(report.crash_loops[0].crashes, 5);
    let never: Vec<String> = report
        .never_seen
        .iter()
        .map(|n| n.device_id.clone())
        .collect();
    assert_eq!(never, ids(vec!["soon", "blocked"]));
    // The limit holds for each list.
    let one = store
        .security_report((now + 7 * day) * 1000, 3, 1)
        .await
        .unwrap();
    assert_eq!(one.expiring_certificates.len(), 1);
    assert_eq!(one.crash_loops.len(), 1);
}

async fn rollout_candidates_are_chosen_by_target_owner_block_and_hardware(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    let other = user(store, "p@x", Role::Operator).await;
    for id in ["a", "b", "c", "d", "e"] {
        store.register_device(&dev(id), id, o).await.unwrap();
    }
    store.register_device(&dev("z"), "z", other).await.unwrap();
    let status = |hw: &str, fw: &str| -> flotilla_proto::Status {
        message(json!({"online": true, "hw": hw, "fw": fw}))
    };
    let mut tx = store.begin_write().await.unwrap();
    for (id, hw) in [
        ("a", "c3"),
        ("b", "c3"),
        ("c", "s3"),
        ("d", "c3"),
        ("z", "c3"),
    ] {
        tx.apply_update(&dev(id), &DeviceUpdate::Status(status(hw, "1.0.0")), 20)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // e says no hardware: a candidate for any.
    store.toggle_device_block(&dev("d")).await.unwrap();
    store
        .set_device_tags(&dev("b"), &["lab".to_string()])
        .await
        .unwrap();
    let ids = |s: Selection| -> Vec<String> {
        s.candidates
            .into_iter()
            .map(|c| c.device_id.to_string())
            .collect()
    };
    let pick = |owner, selector| async move {
        store
            .rollout_candidates(owner, selector, "c3")
            .await
            .unwrap()
    };
    assert_eq!(
        ids(pick(Some(o), TargetSelector::All).await),
        ["a", "b", "e"]
    );
    assert_eq!(
        ids(pick(None, TargetSelector::All).await),
        ["a", "b", "e", "z"]
    );
    assert_eq!(
        ids(pick(Some(o), TargetSelector::Hardware("c3")).await),
        ["a", "b"]
    );
    assert_eq!(ids(pick(Some(o), TargetSelector::Tag("lab")).await), ["b"]);
    let listed = ["e".to_string(), "a".to_string(), "c".to_string()];
    let chosen = pick(Some(o), TargetSelector::Devices(&listed)).await;
    assert_eq!(chosen.unknown, None);
    assert_eq!(
        chosen.candidates[0].firmware_version.as_deref(),
        Some("1.0.0")
    );
    assert_eq!(ids(chosen), ["a", "e"]);
    // Another owner's device, or none at all, is unknown to this caller.
    let foreign = ["a".to_string(), "z".to_string(), "nobody".to_string()];
    let chosen = pick(Some(o), TargetSelector::Devices(&foreign)).await;
    assert_eq!(chosen.unknown.as_deref(), Some("z"));
    // More ids than one statement takes.
    let many: Vec<String> = (0..2500)
        .map(|k| format!("x{k}"))
        .chain(["b".to_string()])
        .collect();
    let chosen = pick(Some(o), TargetSelector::Devices(&many)).await;
    assert_eq!(chosen.unknown.as_deref(), Some("x0"));
    assert_eq!(ids(chosen), ["b"]);
}

async fn concurrent_renewals_issue_one_certificate(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    provision(store, o, "t1", "a", &issued("a1", 1_900_000_000)).await;
    let attempts = (0..8).map(|k| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .renew_device_certificate(
                    &dev("a"),
                    "a1",
                    &issued(&format!("n{k}"), 1_900_000_000),
                    600_000,
                )
                .await
                .unwrap()
        })
    });
    let results: Vec<_> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(()) | Err(RenewalRefusal::TooSoon { .. }))),
        "{results:?}"
    );
    // Nothing was revoked: the refused ones issued nothing.
    assert!(store.broker_denials().await.unwrap().revoked.is_empty());
}

async fn desired_and_reported_config_are_kept_apart(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("a"), "a", o).await.unwrap();
    assert_eq!(
        store.device_config(&dev("a")).await.unwrap(),
        Some(ConfigRow::default())
    );
    assert_eq!(store.device_config(&dev("nobody")).await.unwrap(), None);
    let desired = flotilla_proto::DesiredConfig {
        telemetry_interval_s: Some(5),
        temp: Some(false),
        ..Default::default()
    };
    assert!(store.set_desired_config(&dev("a"), &desired).await.unwrap());
    assert!(
        !store
            .set_desired_config(&dev("nobody"), &desired)
            .await
            .unwrap()
    );
    let row = store.device_config(&dev("a")).await.unwrap().unwrap();
    assert_eq!(row.desired, Some(desired.clone()));
    assert!(row.desired_at.is_some());
    assert_eq!(row.reported, None);

    // The device's status carries what it applied; a status without it keeps the last one.
    let status = |config: Option<serde_json::Value>| -> flotilla_proto::Status {
        let mut v = json!({"online": true});
        if let Some(c) = config {
            v["config"] = c;
        }
        message(v)
    };
    let applied = json!({"telemetry_interval_s": 5, "heartbeat_interval_s": 30,
                         "pot": true, "switch": true, "temp": false});
    let mut tx = store.begin_write().await.unwrap();
    tx.apply_update(
        &dev("a"),
        &DeviceUpdate::Status(status(Some(applied.clone()))),
        20,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let reported_at = store
        .device_config(&dev("a"))
        .await
        .unwrap()
        .unwrap()
        .reported_at;
    let mut tx = store.begin_write().await.unwrap();
    tx.apply_update(&dev("a"), &DeviceUpdate::Status(status(None)), 20)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let row = store.device_config(&dev("a")).await.unwrap().unwrap();
    assert_eq!(row.reported, Some(message(applied)));
    assert_eq!(row.reported_at, reported_at);
    assert!(reported_at.is_some());
    assert_eq!(row.desired, Some(desired), "the desired half is untouched");
}

async fn token_keys_are_published_once_and_found_by_id(store: &Store) {
    assert_eq!(store.token_key("k1").await.unwrap(), None);
    store.publish_token_key("k1", "pem-1").await.unwrap();
    // Published again at every start: the first stays.
    store.publish_token_key("k1", "pem-1").await.unwrap();
    store.publish_token_key("k2", "pem-2").await.unwrap();
    assert_eq!(
        store.token_key("k1").await.unwrap().as_deref(),
        Some("pem-1")
    );
    assert_eq!(
        store.token_key("k2").await.unwrap().as_deref(),
        Some("pem-2")
    );
    assert_eq!(store.token_key("k3").await.unwrap(), None);
    let mut all = store.token_keys().await.unwrap();
    all.sort();
    assert_eq!(
        all,
        [
            ("k1".to_string(), "pem-1".to_string()),
            ("k2".into(), "pem-2".into())
        ]
    );
}

async fn attempts_are_counted_in_windows_given_back_and_cleared(store: &Store) {
    let hour = 3_600_000;
    assert_eq!(
        store.count_attempts(&["a", "b"], hour).await.unwrap(),
        [0, 0]
    );
    assert_eq!(
        store.count_attempts(&["a", "b"], hour).await.unwrap(),
        [1, 1]
    );
    assert_eq!(store.count_attempts(&["a"], hour).await.unwrap(), [2]);
    store.give_back_attempt("a").await.unwrap();
    assert_eq!(store.count_attempts(&["a"], hour).await.unwrap(), [2]);
    store.clear_attempts("b").await.unwrap();
    assert_eq!(store.count_attempts(&["b"], hour).await.unwrap(), [0]);
    // A window that has ended starts again at the next attempt (a window of 0 ms has always
    // ended), and ended windows are pruned.
    assert_eq!(store.count_attempts(&["a"], 0).await.unwrap(), [0]);
    assert_eq!(store.count_attempts(&["a"], hour).await.unwrap(), [1]);
    assert_eq!(store.prune_attempts(hour).await.unwrap(), 0);
    assert_eq!(store.prune_attempts(-1).await.unwrap(), 2);
    assert_eq!(store.count_attempts(&["a"], hour).await.unwrap(), [0]);
    // Concurrent attempts are each counted once.
    let counts =
        futures::future::join_all((0..8).map(|_| store.count_attempts(&["c"], hour))).await;
    let mut seen: Vec<i64> = counts.into_iter().map(|c| c.unwrap()[0]).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<i64>>());
}

/// The epoch `holder` takes or renews the lease `name` under, for a minute.
async fn epoch(store: &Store, name: &str, holder: &str) -> i64 {
    store
        .hold_lease(name, holder, 60_000)
        .await
        .unwrap()
        .unwrap()
        .epoch
}

async fn a_lease_has_one_holder_and_work_under_a_lost_lease_is_refused(store: &Store) {
    let long = 60_000;
    let a = store.hold_lease("bg", "a", long).await.unwrap().unwrap();
    assert_eq!(a.epoch, 1);
    // In Unix ms (the database's clock is this machine's here, so this checks the units only).
    let local = crate::now_ms() + long;
    assert!(
        (a.expires_at - local).abs() < 5_000,
        "expires at {} on the database's clock, {local} on ours",
        a.expires_at
    );
    assert_eq!(store.hold_lease("bg", "b", long).await.unwrap(), None);
    // Renewed in time by its holder: the same epoch.
    assert_eq!(epoch(store, "bg", "a").await, 1);
    // Another lease is another matter.
    assert_eq!(epoch(store, "other", "b").await, 1);
    let mut work = store
        .begin_fenced("bg", "a", 1, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    work.expire_commands().await.unwrap();
    work.commit().await.unwrap();
    assert!(
        store
            .begin_fenced("bg", "b", 1, LONG_STALL)
            .await
            .unwrap()
            .is_none()
    );

    // a stops renewing (a TTL of 0 lapses at once): b takes it under a higher epoch, and a's
    // work under its old epoch is refused from then on.
    store.hold_lease("bg", "a", 0).await.unwrap().unwrap();
    let b = store.hold_lease("bg", "b", long).await.unwrap().unwrap();
    assert_eq!(b.epoch, 2);
    assert!(
        store
            .begin_fenced("bg", "a", 1, LONG_STALL)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.hold_lease("bg", "a", long).await.unwrap(), None);
    assert!(
        store
            .begin_fenced("bg", "b", 2, LONG_STALL)
            .await
            .unwrap()
            .is_some()
    );
    // A clean release hands it over at once.
    store.release_lease("bg", "b").await.unwrap();
    assert_eq!(epoch(store, "bg", "a").await, 3);
    assert!(
        store
            .begin_fenced("bg", "b", 2, LONG_STALL)
            .await
            .unwrap()
            .is_none()
    );

    // Lapsed leases are found by prefix; a prefix is literal ('_' is no wildcard).
    store
        .hold_lease("ingest:r1", "r1", long)
        .await
        .unwrap()
        .unwrap();
    store
        .hold_lease("ingest:r2", "r2", 0)
        .await
        .unwrap()
        .unwrap();
    store
        .hold_lease("ingestXr3", "r3", 0)
        .await
        .unwrap()
        .unwrap();
    assert!(store.lapsed_leases("ingest_", 0).await.unwrap().is_empty());
    store.hold_lease("bg", "a", 0).await.unwrap().unwrap();
    assert_eq!(
        store.lapsed_leases("ingest:", 0).await.unwrap(),
        vec!["ingest:r2".to_string()]
    );
    // Not yet lapsed for a minute.
    assert!(
        store
            .lapsed_leases("ingest:", long)
            .await
            .unwrap()
            .is_empty()
    );
    // A lapsed lease is taken over; one held is not.
    let taken = store
        .take_lapsed_lease("ingest:r2", "r1/adopting", long)
        .await;
    assert_eq!(taken.unwrap().unwrap().epoch, 2);
    assert_eq!(
        store
            .take_lapsed_lease("ingest:r1", "x", long)
            .await
            .unwrap(),
        None
    );
    // Ended by its holder only; then it is gone: never taken over again, and taken afresh
    // at epoch 1 by whoever holds it next.
    assert!(!store.end_lease("ingest:r2", "r2").await.unwrap());
    assert!(store.end_lease("ingest:r2", "r1/adopting").await.unwrap());
    assert!(store.lapsed_leases("ingest:", 0).await.unwrap().is_empty());
    assert_eq!(
        store.take_lapsed_lease("ingest:r2", "x", 0).await.unwrap(),
        None
    );
    assert_eq!(epoch(store, "ingest:r2", "r1").await, 1);
}

async fn a_takeover_waits_for_work_begun_under_the_old_epoch(store: &Store) {
    let old = store.hold_lease("bg", "old", 300).await.unwrap().unwrap();
    let work = store
        .begin_fenced("bg", "old", old.epoch, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // The lease has lapsed, but the old holder's work still holds its row: the new holder
    // takes it only once that work has committed, so nothing of the old epoch lands after
    // the new one began.
    let store2 = store.clone();
    let takeover = tokio::spawn(async move { store2.hold_lease("bg", "new", 60_000).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover did not wait for the old epoch's work"
    );
    work.commit().await.unwrap();
    let new = takeover.await.unwrap().unwrap().unwrap();
    assert_eq!(new.epoch, old.epoch + 1);
}

/// The old holder stalls (frozen, paused) inside its work past its stall limit and past its
/// lease: PostgreSQL ends that work, so the new holder takes the lapsed lease without waiting
/// for the stalled one to come back (without the limit it waits until its own lock timeout
/// and fails), and the stalled work, when it resumes, commits nothing.
async fn a_holder_stalled_inside_its_work_loses_it_and_does_not_hold_up_the_takeover(
    store: &Store,
) {
    if store.backend == Backend::Sqlite {
        return; // one process owns the database: no other holder to hold up
    }
    let o = user(store, "o@x", Role::Operator).await;
    store
        .register_device(&dev("quiet"), "quiet", o)
        .await
        .unwrap();
    let mut tx = store.begin_write().await.unwrap();
    let hb: flotilla_proto::Heartbeat = message(json!({"heap": 1, "fw": "1.0.0"}));
    tx.apply_update(&dev("quiet"), &DeviceUpdate::Heartbeat(hb), 1_000)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let old = store.hold_lease("bg", "old", 300).await.unwrap().unwrap();
    let limit = std::time::Duration::from_millis(200);
    let mut work = store
        .begin_fenced("bg", "old", old.epoch, limit)
        .await
        .unwrap()
        .unwrap();
    // A write under the lease, then the stall.
    assert_eq!(work.expire_silent_devices(2_000).await.unwrap(), ["quiet"]);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;

    let new = store
        .hold_lease("bg", "new", 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.epoch, old.epoch + 1);
    assert!(
        work.commit().await.is_err(),
        "work stalled past its limit committed"
    );
    let quiet = store.device(&dev("quiet")).await.unwrap().unwrap();
    assert!(quiet.online, "the stalled work's write landed");
}

/// Applies one message of `d` received at `at` in its own transaction; whether it brought
/// the device online.
async fn commit_update(
    store: &Store,
    d: &flotilla_proto::DeviceId,
    update: DeviceUpdate,
    at: i64,
) -> bool {
    let mut tx = store.begin_write().await.unwrap();
    let came_online = tx.apply_update(d, &update, at).await.unwrap();
    tx.commit().await.unwrap();
    came_online
}

/// [`commit_update`] for one reading, through the batch path.
async fn commit_reading(
    store: &Store,
    d: &flotilla_proto::DeviceId,
    t: flotilla_proto::Telemetry,
    at: i64,
) -> bool {
    let mut tx = store.begin_write().await.unwrap();
    let came_online = tx.apply_readings(&[(d, &t, at)]).await.unwrap();
    tx.commit().await.unwrap();
    !came_online.is_empty()
}

/// One device's messages reach two replicas and commit in either order: each field group
/// (presence, health, reported status) takes a message only if it was received after the one
/// that set it last, through either ingest path.
async fn a_message_committed_after_a_newer_one_changes_only_what_is_older(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    let d = dev("d");
    let beat = |heap: u32| -> flotilla_proto::Heartbeat {
        message(json!({"heap": heap, "fw": format!("1.{heap}.0")}))
    };
    let status = |v: serde_json::Value| -> flotilla_proto::Status { message(v) };
    let reading = |seq: u64| -> flotilla_proto::Telemetry { message(json!({"seq": seq})) };
    let apply = |update: DeviceUpdate, at: i64| commit_update(store, &d, update, at);
    let readings = |seq: u64, at: i64| commit_reading(store, &d, reading(seq), at);
    let state = || async {
        let r = store.device(&dev("d")).await.unwrap().unwrap();
        (
            r.online,
            r.disconnect_reason,
            r.last_seen,
            r.heap,
            r.led,
            r.firmware_version,
        )
    };
    let reason = |r: &str| Some(r.to_string());

    assert!(apply(DeviceUpdate::Heartbeat(beat(100)), 100).await);
    // The will, received at 300 by one replica...
    let will = status(json!({"online": false, "reason": "connection lost"}));
    assert!(!apply(DeviceUpdate::Status(will.clone()), 300).await);
    // ...then a heartbeat the other replica received at 200: its health is newer than what
    // is stored, its presence is not.
    assert!(!apply(DeviceUpdate::Heartbeat(beat(200)), 200).await);
    assert_eq!(
        state().await,
        (
            false,
            reason("connection lost"),
            Some(200),
            Some(200),
            None,
            Some("1.200.0".into())
        )
    );
    // An older heartbeat still: nothing of it.
    assert!(!apply(DeviceUpdate::Heartbeat(beat(150)), 150).await);
    assert_eq!(state().await.3, Some(200));
    // A status received before the will: its report is kept, its "online" is not.
    let on = status(json!({"online": true, "led": "ON", "fw": "2.0.0"}));
    assert!(!apply(DeviceUpdate::Status(on), 250).await);
    // And an older status than that one changes no reported field.
    let older = status(json!({"online": true, "led": "OFF", "fw": "0.9.0"}));
    assert!(!apply(DeviceUpdate::Status(older), 240).await);
    assert_eq!(
        state().await,
        (
            false,
            reason("connection lost"),
            Some(250),
            Some(200),
            Some("ON".into()),
            Some("2.0.0".into())
        )
    );
    // Readings received before the will are stored, at their receive time, and leave the
    // device offline, through both paths.
    assert!(!apply(DeviceUpdate::Telemetry(reading(1)), 280).await);
    assert!(!readings(2, 290).await);
    let stored = store.telemetry(&d, 10).await.unwrap();
    let stored: Vec<_> = stored.iter().map(|r| (r.seq, r.received_at)).collect();
    assert_eq!(stored, [(2, 290), (1, 280)]);
    assert!(
        !state().await.0,
        "online through a reading older than the will"
    );
    // A reading received after the will brings it back.
    assert!(readings(3, 400).await);
    let (online, why, last_seen, ..) = state().await;
    assert!(online, "offline after a newer reading");
    assert_eq!((why, last_seen), (None, Some(400)));

    // A server-side disconnect is a presence change at the moment it is recorded: a
    // heartbeat received before it does not undo it.
    let before = now_ms() - 1;
    assert!(store.mark_offline(&d, "kicked").await.unwrap());
    assert!(!apply(DeviceUpdate::Heartbeat(beat(300)), before).await);
    assert_eq!(state().await.1, reason("kicked"));
    // A will received before the device's newest "online" leaves it online.
    let later = now_ms() + 1_000;
    let online = status(json!({"online": true}));
    assert!(apply(DeviceUpdate::Status(online), later).await);
    assert!(!apply(DeviceUpdate::Status(will), later - 500).await);
    assert!(
        state().await.0,
        "offline through a will older than the status"
    );

    // The version has its own time: a heartbeat older than the status that reported the new
    // version does not bring the old one back.
    let updated = status(json!({"online": true, "fw": "3.0.0"}));
    apply(DeviceUpdate::Status(updated), later + 130).await;
    apply(DeviceUpdate::Heartbeat(beat(1)), later + 100).await;
    let (.., heap, _, fw) = state().await;
    assert_eq!((heap, fw.as_deref()), (Some(1), Some("3.0.0")));

    // The heartbeat sweep is a presence change at its cutoff: a message received before the
    // cutoff and committed after the sweep does not bring the device back.
    let cutoff = later + 10_000;
    assert_eq!(
        store.expire_silent_devices(cutoff).await.unwrap(),
        ["d".to_string()]
    );
    assert!(!apply(DeviceUpdate::Heartbeat(beat(2)), cutoff - 1).await);
    assert!(
        !state().await.0,
        "revived by a heartbeat from before the sweep"
    );
    assert!(apply(DeviceUpdate::Heartbeat(beat(3)), cutoff + 1).await);
}

/// Messages of a device that numbers them ([`flotilla_proto::order_key`]) taken late (a
/// backlog a replica drains after a crash, a redelivery) carry a later receive time than the
/// newer ones another replica stored: their keys, not those times, decide, through both
/// ingest paths; a will ends its session and the next session outranks it; after a
/// server-side offline, presence goes by receive time until the device's next message; a
/// newly provisioned device starts afresh.
async fn a_numbered_message_is_ordered_by_its_key_not_by_when_it_was_taken(store: &Store) {
    use flotilla_proto::{WILL_N, order_key};
    let o = user(store, "o@x", Role::Operator).await;
    let d = dev("d");
    provision(store, o, "t1", "d", &issued("01", 1_900_000_000)).await;
    let beat = |heap: u32, ord: u64| -> flotilla_proto::Heartbeat {
        message(json!({"heap": heap, "fw": format!("1.{heap}.0"), "ord": ord}))
    };
    let status = |v: serde_json::Value| -> flotilla_proto::Status { message(v) };
    let apply = |update: DeviceUpdate, at: i64| commit_update(store, &d, update, at);
    let reading = |seq: u64, ord: u64, at: i64| {
        commit_reading(store, &d, message(json!({"seq": seq, "ord": ord})), at)
    };
    let state = || async {
        let r = store.device(&dev("d")).await.unwrap().unwrap();
        (
            r.online,
            r.disconnect_reason,
            r.heap,
            r.led,
            r.firmware_version,
        )
    };
    let reason = |r: &str| Some(r.to_string());
    let s1 = |n| order_key(1, n);
    let s2 = |n| order_key(2, n);

    // Session 1 says online, beats twice and ends; its will is stored at 200.
    let online = |led: &str, ord: u64| status(json!({"online": true, "led": led, "ord": ord}));
    assert!(apply(DeviceUpdate::Status(online("ON", s1(1))), 100).await);
    apply(DeviceUpdate::Heartbeat(beat(2, s1(2))), 110).await;
    let will = |ord: u64| status(json!({"online": false, "reason": "connection lost", "ord": ord}));
    apply(DeviceUpdate::Status(will(s1(WILL_N))), 200).await;
    // A heartbeat of session 1 taken at 900 (after the will) changes nothing of presence and
    // is older than the health on record: nothing of it.
    assert!(!apply(DeviceUpdate::Heartbeat(beat(1, s1(1))), 900).await);
    assert_eq!(
        state().await,
        (
            false,
            reason("connection lost"),
            Some(2),
            Some("ON".into()),
            Some("1.2.0".into())
        )
    );
    // A reading of session 1 taken late, through either path, leaves it offline.
    assert!(!reading(1, s1(3), 950).await);
    assert!(
        !apply(
            DeviceUpdate::Telemetry(message(json!({"seq": 2, "ord": s1(4)}))),
            960
        )
        .await
    );
    assert!(!state().await.0, "revived by a reading of an ended session");

    // Session 2 comes online (received at 300, before those late ones were taken)...
    assert!(apply(DeviceUpdate::Status(online("OFF", s2(1))), 300).await);
    apply(DeviceUpdate::Heartbeat(beat(5, s2(2))), 310).await;
    // ...and session 1's will, redelivered and taken at 1000, does not end session 2; nor does
    // session 1's status or heartbeat, taken later still.
    assert!(!apply(DeviceUpdate::Status(will(s1(WILL_N))), 1_000).await);
    assert!(!apply(DeviceUpdate::Status(online("ON", s1(1))), 1_010).await);
    assert!(!apply(DeviceUpdate::Heartbeat(beat(3, s1(3))), 1_020).await);
    assert_eq!(
        state().await,
        (
            true,
            None,
            Some(5),
            Some("OFF".into()),
            Some("1.5.0".into())
        )
    );

    // The server marks it offline: a message of session 2 received before that and committed
    // after it does not bring it back, whatever its key...
    let before = now_ms() - 1;
    assert!(store.mark_offline(&d, "kicked").await.unwrap());
    assert!(!apply(DeviceUpdate::Heartbeat(beat(6, s2(3))), before).await);
    assert_eq!(state().await.1, reason("kicked"));
    // ...one received after it does.
    assert!(apply(DeviceUpdate::Heartbeat(beat(7, s2(4))), now_ms() + 1).await);

    // A device provisioned again numbers from the start: its first session is not outranked
    // by the keys of the one before.
    apply(DeviceUpdate::Status(will(s2(WILL_N))), now_ms() + 2).await;
    provision(store, o, "t2", "d", &issued("02", 1_900_000_000)).await;
    let fresh = status(json!({"online": true, "led": "ON", "fw": "9.0.0", "ord": order_key(0, 1)}));
    assert!(apply(DeviceUpdate::Status(fresh), now_ms() + 3).await);
    let (online, _, _, led, fw) = state().await;
    assert_eq!(
        (online, led.as_deref(), fw.as_deref()),
        (true, Some("ON"), Some("9.0.0"))
    );

    // The old board's will, still in flight when the new one was provisioned, lands after
    // it: the new board's keys are below it and it is shut out ...
    let t = now_ms() + 10;
    apply(DeviceUpdate::Status(will(s2(WILL_N))), t).await;
    let fresh = |n, led: &str| status(json!({"online": true, "led": led, "ord": order_key(0, n)}));
    assert!(!apply(DeviceUpdate::Status(fresh(2, "OFF")), t + 1).await);
    assert!(!state().await.0, "online through a key below the last will");
    // ... but not for ever: once the group took nothing for the horizon, it is heard again.
    let later = t + super::devices::KEY_HORIZON_MS + 1;
    assert!(apply(DeviceUpdate::Status(fresh(3, "OFF")), later).await);
    assert_eq!(state().await.3.as_deref(), Some("OFF"));
    let keyed_beat = |heap: u32, n: u32, at: i64| {
        apply(DeviceUpdate::Heartbeat(beat(heap, order_key(0, n))), at)
    };
    // Of two messages with one key (a session past 2^23 - 2 messages), the later received wins.
    keyed_beat(11, 9, later + 20).await;
    keyed_beat(10, 9, later + 10).await;
    assert_eq!(state().await.2, Some(11));
    // A message without a key sets the group's key to none: it then goes by receive time, and
    // an older keyed message received before it does not override it.
    apply(
        DeviceUpdate::Heartbeat(message(json!({"heap": 12, "fw": "1.12.0"}))),
        later + 40,
    )
    .await;
    keyed_beat(13, 10, later + 30).await;
    assert_eq!(state().await.2, Some(12));
    // The health group's receive time never goes back: the health gate reads heartbeats
    // newer than what it saw, so a key that wins with an earlier receive time must not hide
    // the next one.
    keyed_beat(14, 11, later + 50).await;
    keyed_beat(15, 12, later + 45).await;
    assert_eq!(state().await.2, Some(15));
    let since = store.heartbeats_since(later + 48).await.unwrap();
    assert_eq!(since.len(), 1, "health stamped at 50, not moved back to 45");
}

/// What the leader's health gate reads: each device's newest heartbeat received after the
/// time given, with its crash count and uptime; older ones and other messages are not in it.
async fn the_heartbeats_stored_since_a_time_are_each_devices_newest(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for d in ["a", "b", "c"] {
        store.register_device(&dev(d), d, o).await.unwrap();
    }
    let beat = |crashes: u32, uptime: u64| -> flotilla_proto::Heartbeat {
        message(json!({"heap": 1, "fw": "1.0.0", "crashes": crashes, "uptime": uptime}))
    };
    let reading: flotilla_proto::Telemetry = message(json!({"seq": 1}));
    let mut tx = store.begin_write().await.unwrap();
    for (d, update, at) in [
        ("a", DeviceUpdate::Heartbeat(beat(1, 10)), 100),
        ("b", DeviceUpdate::Heartbeat(beat(2, 20)), 200),
        ("b", DeviceUpdate::Heartbeat(beat(3, 5)), 300),
        ("c", DeviceUpdate::Telemetry(reading), 400),
    ] {
        tx.apply_update(&dev(d), &update, at).await.unwrap();
    }
    tx.commit().await.unwrap();
    let rows = store.heartbeats_since(150).await.unwrap();
    assert_eq!(
        rows,
        [HeartbeatRow {
            device_id: "b".into(),
            crashes: Some(3),
            uptime_s: Some(5),
            received_at: 300,
        }]
    );
    assert_eq!(store.heartbeats_since(50).await.unwrap().len(), 2);
    assert!(store.heartbeats_since(300).await.unwrap().is_empty());
}

/// A batch of readings from several devices, each older or newer than its device's presence:
/// each device is judged on its own latest reading.
async fn a_batch_of_readings_judges_each_device_by_its_own_latest_reading(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for d in ["old", "new", "mixed"] {
        store.register_device(&dev(d), d, o).await.unwrap();
        let will: flotilla_proto::Status =
            message(json!({"online": false, "reason": "connection lost"}));
        let mut tx = store.begin_write().await.unwrap();
        tx.apply_update(&dev(d), &DeviceUpdate::Status(will), 1_000)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let t: Vec<flotilla_proto::Telemetry> = (0..4).map(|n| message(json!({"seq": n}))).collect();
    let (old, new, mixed) = (dev("old"), dev("new"), dev("mixed"));
    let batch = [
        (&old, &t[0], 900),
        (&new, &t[0], 1_100),
        (&mixed, &t[0], 950),
        (&old, &t[1], 990),
        (&mixed, &t[1], 1_200),
        (&mixed, &t[2], 980),
    ];
    let mut tx = store.begin_write().await.unwrap();
    let mut came_online: Vec<String> = tx
        .apply_readings(&batch)
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    tx.commit().await.unwrap();
    came_online.sort();
    assert_eq!(came_online, ["mixed", "new"]);
    for (d, online, last_seen) in [
        ("old", false, Some(990)),
        ("new", true, Some(1_100)),
        ("mixed", true, Some(1_200)),
    ] {
        let row = store.device(&dev(d)).await.unwrap().unwrap();
        assert_eq!((row.online, row.last_seen), (online, last_seen), "{d}");
    }
    // Every reading is stored at its own receive time.
    let mixed_rows = store.telemetry(&mixed, 10).await.unwrap();
    let stored: Vec<_> = mixed_rows.iter().map(|r| (r.seq, r.received_at)).collect();
    assert_eq!(stored, [(2, 980), (1, 1_200), (0, 950)]);
}

/// The resender's query: a queued command of an online device, not sent lately, until the
/// device accepts it; never one of an offline device, an expired one, or one sent recently.
async fn queued_commands_of_online_devices_are_resent_until_accepted(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    for d in ["on", "off"] {
        store.register_device(&dev(d), d, o).await.unwrap();
    }
    let mut tx = store.begin_write().await.unwrap();
    let hb: flotilla_proto::Heartbeat = message(json!({"heap": 1, "fw": "1.0.0"}));
    tx.apply_update(&dev("on"), &DeviceUpdate::Heartbeat(hb), now_ms())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let far = now_ms() + 600_000;
    for (id, device, expires) in [
        ("c-on", "on", far),
        ("c-off", "off", far),
        ("c-expired", "on", now_ms() - 1),
    ] {
        store
            .create_command(id, &dev(device), "ping", &json!({}), o, expires)
            .await
            .unwrap();
    }
    let due = |store: &Store, before: i64| {
        let store = store.clone();
        async move {
            let rows = store.commands_to_resend(before, 100).await.unwrap();
            rows.into_iter().map(|c| c.id).collect::<Vec<_>>()
        }
    };
    // Never sent: due once it is older than the cutoff, not while its first publish may
    // still be under way (created after the cutoff).
    assert!(due(store, now_ms() - 60_000).await.is_empty());
    assert_eq!(due(store, now_ms() + 1).await, ["c-on"]);
    store.mark_command_sent("c-on").await.unwrap();
    // Sent just now: not due until it is older than the cutoff.
    assert!(due(store, now_ms() - 60_000).await.is_empty());
    assert_eq!(due(store, now_ms() + 1).await, ["c-on"]);
    // Accepted: never again.
    let accepted: flotilla_proto::CommandReply =
        message(json!({"id": "c-on", "status": "accepted"}));
    let mut tx = store.begin_write().await.unwrap();
    assert!(
        tx.apply_reply(&dev("on"), &accepted, now_ms())
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
    assert!(due(store, now_ms() + 1).await.is_empty());
}

/// Retention deletes through the fenced transaction: nothing before its commit, and nothing
/// at all by a holder whose lease another took over.
async fn retention_under_the_lease_deletes_only_what_its_holder_commits(store: &Store) {
    let o = user(store, "o@x", Role::Operator).await;
    store.register_device(&dev("d"), "d", o).await.unwrap();
    for seq in 1..=6 {
        run_sql(
            store,
            "INSERT INTO telemetry (device_id, seq, received_at) VALUES ('d', $1, 1000)",
            &[seq],
        )
        .await;
    }
    let count = |store: &Store| {
        let store = store.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
                .fetch_one(&store.pool)
                .await
                .unwrap();
            n
        }
    };
    let lease = store.hold_lease("bg", "a", 60_000).await.unwrap().unwrap();
    let mut tx = store
        .begin_fenced("bg", "a", lease.epoch, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        tx.delete_expired(RetentionKind::Telemetry, 5_000, 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(tx.trim_device_telemetry(&dev("d"), 2, 10).await.unwrap(), 2);
    drop(tx); // not committed: rolled back
    assert_eq!(count(store).await, 6);
    let mut tx = store
        .begin_fenced("bg", "a", lease.epoch, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    tx.trim_device_telemetry(&dev("d"), 2, 10).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(store).await, 2);
    // The audit log's checkpoints (and the removals they stand for) too.
    store
        .audit(AuditRecord {
            actor: "system",
            action: "test",
            target: None,
            result: "success",
            detail: None,
        })
        .await;
    let head = store.audit_head().await.unwrap();
    let statement = flotilla_audit::Checkpoint::statement(head.seq, &head.hash, 5, 0);
    let head_mark = flotilla_audit::Checkpoint {
        seq: head.seq,
        hash: flotilla_audit::to_hex(&head.hash),
        at: 5,
        removed: 0,
        signature: hex_of(&test_signature(&statement)),
    };
    let mut tx = store
        .begin_fenced("bg", "a", lease.epoch, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    tx.add_audit_checkpoint(&head_mark).await.unwrap();
    drop(tx);
    assert!(store.audit_checkpoints().await.unwrap().is_empty());
    let mut tx = store
        .begin_fenced("bg", "a", lease.epoch, LONG_STALL)
        .await
        .unwrap()
        .unwrap();
    tx.add_audit_checkpoint(&head_mark).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.audit_checkpoints().await.unwrap().len(), 1);
    // Another holder takes the lapsed lease: the old one begins nothing more.
    store.hold_lease("bg", "a", 0).await.unwrap();
    store.hold_lease("bg", "b", 60_000).await.unwrap().unwrap();
    assert!(
        store
            .begin_fenced("bg", "a", lease.epoch, LONG_STALL)
            .await
            .unwrap()
            .is_none()
    );
}
