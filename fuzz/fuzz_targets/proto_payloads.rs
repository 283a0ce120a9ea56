//! Every payload a device or the server decodes from the wire: never a panic, and what
//! decodes encodes and decodes again.
#![no_main]

use flotilla_proto::{
    Command, CommandReply, DesiredConfig, FirmwareManifest, Heartbeat, OtaOffer, OtaStatus,
    SignedManifest, Status, Telemetry, decode, encode,
};
use libfuzzer_sys::fuzz_target;

fn again<T: serde::Serialize + serde::de::DeserializeOwned>(payload: &[u8]) {
    if let Ok(v) = decode::<T>(payload) {
        let bytes = encode(&v);
        assert!(
            decode::<T>(&bytes).is_ok(),
            "re-encoded payload does not decode"
        );
    }
}

fuzz_target!(|payload: &[u8]| {
    again::<Heartbeat>(payload);
    again::<Status>(payload);
    again::<Telemetry>(payload);
    again::<CommandReply>(payload);
    again::<OtaStatus>(payload);
    again::<Command>(payload);
    again::<OtaOffer>(payload);
    again::<SignedManifest>(payload);
    again::<DesiredConfig>(payload);
    again::<FirmwareManifest>(payload);
});
