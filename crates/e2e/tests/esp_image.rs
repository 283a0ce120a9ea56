//! The agent's firmware images are ESP32-C3 app images: esptool (PyPI, installed by
//! `scripts/setup`) reads them as such, and `flotilla release sign` takes the version, the
//! hardware and the security counter from their app descriptor.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_e2e::bin;
use flotilla_e2e::release_kit::signed_manifest;

fn esptool() -> PathBuf {
    let venv = std::env::var("FLOTILLA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/flotilla/venv")
        });
    let exe = venv.join("bin/esptool");
    assert!(
        exe.exists(),
        "{} missing: run scripts/setup (installs esptool from PyPI)",
        exe.display()
    );
    exe
}

fn run(dir: &Path, exe: &Path, args: &[&str]) -> Output {
    Command::new(exe)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn agent_image(dir: &Path, out: &str, extra: &[&str]) {
    let mut args = vec!["image", "--out", out];
    args.extend_from_slice(extra);
    let made = run(dir, &bin("flotilla-agent"), &args);
    assert!(made.status.success(), "{}", text(&made));
}

#[test]
fn esptool_reads_an_agent_image_as_a_valid_esp32c3_app() {
    let dir = tempfile::tempdir().unwrap();
    agent_image(
        dir.path(),
        "fw.bin",
        &[
            "--version",
            "1.4.2",
            "--hardware",
            "devkit-c3",
            "--security-counter",
            "3",
            "--size",
            "300000",
        ],
    );
    let out = run(
        dir.path(),
        &esptool(),
        &["--chip", "esp32c3", "image-info", "fw.bin"],
    );
    let info = text(&out);
    assert!(out.status.success(), "{info}");
    for expected in [
        "ESP32-C3",
        "Segments: 2",
        "DROM",
        "IROM",
        "(valid)",
        "1.4.2",
        "devkit-c3",
    ] {
        assert!(info.contains(expected), "no {expected:?} in:\n{info}");
    }
    assert!(!info.contains("invalid"), "{info}");
    // Both the checksum and the appended SHA-256 were checked and found valid.
    assert_eq!(info.matches("(valid)").count(), 2, "{info}");
    assert!(
        info.lines()
            .any(|l| l.contains("Secure version") && l.trim_end().ends_with('3')),
        "{info}"
    );

    // A damaged image is one esptool refuses too: the check above can fail.
    let mut bytes = std::fs::read(dir.path().join("fw.bin")).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(dir.path().join("bad.bin"), &bytes).unwrap();
    let bad = run(
        dir.path(),
        &esptool(),
        &["--chip", "esp32c3", "image-info", "bad.bin"],
    );
    assert!(text(&bad).contains("invalid"), "{}", text(&bad));
}

#[test]
fn release_sign_reads_the_app_descriptor_and_refuses_what_disagrees_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cli = bin("flotilla");
    assert!(
        run(dir.path(), &cli, &["release", "keygen", "--out", "release"])
            .status
            .success()
    );
    agent_image(
        dir.path(),
        "fw.bin",
        &[
            "--version",
            "2.1.0",
            "--hardware",
            "devkit-c3",
            "--security-counter",
            "4",
        ],
    );
    let signed = run(dir.path(), &cli, &["release", "sign", "fw.bin"]);
    assert!(signed.status.success(), "{}", text(&signed));
    let inner = signed_manifest(&dir.path().join("fw.bin"));
    assert_eq!(
        (
            inner["version"].as_str(),
            inner["hardware"].as_str(),
            inner["security_counter"].as_u64()
        ),
        (Some("2.1.0"), Some("devkit-c3"), Some(4))
    );

    // Flags that agree are fine; a version, hardware or counter that disagrees is a usage
    // error (2) and writes nothing.
    std::fs::remove_file(dir.path().join("fw.bin.manifest.json")).unwrap();
    for (args, code) in [
        (&["--version", "2.1.1"][..], 2),
        (&["--security-counter", "5"][..], 2),
        (&["--version", "2.1.0", "--hardware", "esp32c3"][..], 2),
        (&["--version", "2.1.0", "--hardware", "devkit-c3"][..], 0),
    ] {
        let mut all = vec!["release", "sign", "fw.bin"];
        all.extend_from_slice(args);
        let out = run(dir.path(), &cli, &all);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        let written = dir.path().join("fw.bin.manifest.json").exists();
        assert_eq!(written, code == 0, "{args:?}");
    }

    // A truncated ESP32 image is refused, and a file of another kind even with every flag.
    let bytes = std::fs::read(dir.path().join("fw.bin")).unwrap();
    std::fs::write(dir.path().join("cut.bin"), &bytes[..bytes.len() / 2]).unwrap();
    let out = run(dir.path(), &cli, &["release", "sign", "cut.bin"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a valid ESP32 app image"),
        "{}",
        text(&out)
    );
    std::fs::write(dir.path().join("other.bin"), vec![0xA5u8; 4096]).unwrap();
    let out = run(
        dir.path(),
        &cli,
        &[
            "release",
            "sign",
            "other.bin",
            "--version",
            "2.1.0",
            "--hardware",
            "esp32c3",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("not a valid ESP32 app image"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("other.bin.manifest.json").exists());
}
