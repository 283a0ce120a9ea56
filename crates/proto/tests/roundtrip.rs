//! Every payload type survives encode -> decode, and the seeds' example payloads parse.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_proto::*;
use proptest::prelude::*;
use serde_json::json;

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

fn finite_f32() -> impl Strategy<Value = f32> {
    proptest::num::f32::NORMAL | proptest::num::f32::ZERO | proptest::num::f32::SUBNORMAL
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        text().prop_map(|s| json!({ "state": s })),
        (0u8..=100).prop_map(|v| json!({ "value": v })),
    ]
}

fn led() -> impl Strategy<Value = LedState> {
    prop_oneof![Just(LedState::On), Just(LedState::Off)]
}

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value);
    let back: T = decode(&bytes).expect("decodes what it encoded");
    assert_eq!(&back, value);
}

proptest! {
    #[test]
    fn heartbeat(heap in any::<u32>(), uptime in opt(any::<u64>()), fw in text(), rssi in opt(any::<i16>()), crashes in opt(any::<u32>()), ord in opt(any::<u64>())) {
        round_trip(&Heartbeat { heap, uptime, fw, rssi, crashes, ord });
    }

    #[test]
    fn status(online in any::<bool>(), led in opt(led()), brightness in opt(0u8..=100), fw in opt(text()), reason in opt(text()), interval in opt(any::<u32>()), temp in opt(any::<bool>()), ord in opt(any::<u64>())) {
        let config = interval.map(|s| DesiredConfig { telemetry_interval_s: Some(s), temp, ..DesiredConfig::default() });
        round_trip(&Status { online, led, brightness, fw, hw: None, reason, config, ord });
    }

    #[test]
    fn telemetry(seq in any::<u64>(), ts in opt(any::<u64>()), pot in opt(0u16..4096), switch in opt(any::<bool>()), temp in opt(finite_f32()), ord in opt(any::<u64>())) {
        round_trip(&Telemetry { seq, ts, pot, switch, temp, ord });
    }

    #[test]
    fn command(id in text(), name in text(), args in json_value(), expires_at in any::<u64>()) {
        round_trip(&Command { id, name, args, expires_at });
    }

    #[test]
    fn reply(id in text(), status in prop_oneof![Just(CommandStatus::Accepted), Just(CommandStatus::Succeeded), Just(CommandStatus::Failed)],
             result in opt(json_value().prop_filter("null is absent", |v| !v.is_null())), error in opt(text())) {
        round_trip(&CommandReply { id, status, result, error });
    }

    #[test]
    fn ota_status(status in prop_oneof![Just(OtaPhase::Started), Just(OtaPhase::InProgress), Just(OtaPhase::Success), Just(OtaPhase::Failed), Just(OtaPhase::RolledBack)],
                  progress in opt(0u8..=100), version in opt(text()), error in opt(text())) {
        round_trip(&OtaStatus { status, id: None, progress, version, error });
    }

    #[test]
    fn config(t in opt(any::<u32>()), h in opt(any::<u32>()), pot in opt(any::<bool>()), switch in opt(any::<bool>()), temp in opt(any::<bool>())) {
        round_trip(&DesiredConfig { telemetry_interval_s: t, heartbeat_interval_s: h, pot, switch, temp });
    }

    #[test]
    fn firmware_manifests_and_offers(version in text(), hardware in text(), size in any::<u64>(), counter in any::<u32>(),
                                     issued in any::<u64>(), expires in opt(any::<u64>()), sig in "[0-9a-f]{128}", url in text(), force in any::<bool>()) {
        let m = FirmwareManifest { version, hardware, size, sha256: "ab".repeat(32), security_counter: counter, issued_at: issued, expires_at: expires };
        round_trip(&m);
        let signed = SignedManifest { manifest: serde_json::to_string(&m).unwrap(), signature: sig };
        round_trip(&OtaOffer { id: "ota-1".into(), manifest: signed, url, force });
    }

    #[test]
    fn versions(major in any::<u32>(), minor in any::<u32>(), patch in any::<u32>()) {
        let v = FirmwareVersion { major, minor, patch };
        prop_assert_eq!(v.to_string().parse::<FirmwareVersion>(), Ok(v));
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode::<Heartbeat>(&bytes);
        let _ = decode::<Status>(&bytes);
        let _ = decode::<Telemetry>(&bytes);
        let _ = decode::<Command>(&bytes);
        let _ = decode::<CommandReply>(&bytes);
        let _ = decode::<OtaStatus>(&bytes);
        let _ = decode::<DesiredConfig>(&bytes);
        let _ = decode::<OtaOffer>(&bytes);
        let _ = decode::<FirmwareManifest>(&bytes);
    }
}

#[test]
fn seed_003_examples_parse() {
    let hb: Heartbeat = decode(br#"{"heap":18000,"fw":"1.0.0"}"#).unwrap();
    assert_eq!((hb.heap, hb.fw.as_str(), hb.uptime), (18000, "1.0.0", None));
    let hb: Heartbeat = decode(br#"{"heap": 20000, "uptime": 120, "fw": "1.0.0"}"#).unwrap();
    assert_eq!(hb.uptime, Some(120));
    let led: serde_json::Value = json!({"state": "ON"});
    assert_eq!(
        serde_json::from_value::<LedState>(led["state"].clone()).unwrap(),
        LedState::On
    );
    let ota: OtaStatus = decode(br#"{"status":"IN_PROGRESS","progress":40}"#).unwrap();
    assert_eq!(ota.status, OtaPhase::InProgress);
}

#[test]
fn oversized_payload_is_refused_before_parsing() {
    let big = vec![b' '; MAX_PAYLOAD + 1];
    assert_eq!(
        decode::<Heartbeat>(&big),
        Err(DecodeError::TooLarge {
            len: MAX_PAYLOAD + 1
        })
    );
}

#[test]
fn unknown_fields_are_ignored_for_forward_compatibility() {
    let hb: Heartbeat = decode(br#"{"heap":1,"fw":"1.0.0","future":{"x":1}}"#).unwrap();
    assert_eq!(hb.heap, 1);
}

#[test]
fn a_nul_character_in_a_string_is_refused_and_an_escaped_backslash_before_u0000_is_not() {
    assert_eq!(
        decode::<Heartbeat>(br#"{"heap":1,"fw":"1.0\u0000"}"#),
        Err(DecodeError::NulCharacter)
    );
    assert_eq!(
        decode::<Heartbeat>(br#"{"heap":1,"fw":"\\\u0000"}"#),
        Err(DecodeError::NulCharacter)
    );
    // A backslash, then the text "u0000".
    let hb: Heartbeat = decode(br#"{"heap":1,"fw":"\\u0000"}"#).unwrap();
    assert_eq!(hb.fw, "\\u0000");
}

proptest::proptest! {
    #[test]
    fn decoded_strings_never_hold_nul(fw in "\\PC{0,12}", nul in proptest::bool::ANY) {
        let fw = if nul { format!("{fw}\0") } else { fw };
        let json = serde_json::json!({"heap": 1, "fw": fw}).to_string();
        match decode::<Heartbeat>(json.as_bytes()) {
            Ok(hb) => proptest::prop_assert!(!hb.fw.contains('\0') && !nul),
            Err(e) => proptest::prop_assert!(nul && e == DecodeError::NulCharacter),
        }
    }
}
