//! `flotilla audit verify` and `flotilla audit export`: the audit chain downloaded page by page
//! and checked here, on the operator's machine, against the CA certificate that signed its
//! checkpoints — so a server that lies about its log does not also grade it.

use std::io::Write;
use std::path::Path;

use flotilla_audit::{Break, ChainedRecord, Checkpoint, Hash, Summary, Verifier};
use serde_json::json;

use crate::api::{Api, ApiFailure};

const PAGE: usize = 1_000;

/// Whether `signature` (DER) over `statement` verifies with the key of `ca_pem`.
pub fn ca_signature_ok(ca_pem: &str) -> Result<impl Fn(&[u8], &[u8]) -> bool, ApiFailure> {
    let spki = flotilla_pki::certificate_public_key_der(ca_pem)
        .ok_or_else(|| ApiFailure::other("the CA certificate is not a PEM certificate"))?;
    flotilla_audit::p256_signature_check(&spki)
        .map_err(|e| ApiFailure::other(format!("the CA certificate: {e}")))
}

/// Every record after `after`, oldest first, handed to `each` one page at a time until it
/// returns `false`.
async fn each_page(
    api: &Api,
    mut after: u64,
    mut each: impl FnMut(&[ChainedRecord]) -> Result<bool, ApiFailure>,
) -> Result<(), ApiFailure> {
    loop {
        let page = api
            .get(&format!(
                "/api/admin/audit/chain?after={after}&limit={PAGE}"
            ))
            .await?;
        let page: Vec<ChainedRecord> = serde_json::from_value(page)
            .map_err(|e| ApiFailure::other(format!("the server sent no audit chain: {e}")))?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        if last.seq <= after {
            return Err(ApiFailure::other("the server sent records out of order"));
        }
        after = last.seq;
        if !each(&page)? {
            return Ok(());
        }
    }
}

/// The outcome of a verification: the chain's summary, or where it breaks. `expect` is a head
/// noted from an earlier run (`seq`, hash) that the chain must still hold. A break is checked
/// a second time before it is reported, since retention removing records between the
/// download of the checkpoints and of the records looks like a break.
pub async fn verify(
    api: &Api,
    ca_pem: &str,
    expect: Option<(u64, Hash)>,
) -> Result<Result<Summary, Break>, ApiFailure> {
    match verify_once(api, ca_pem, expect).await? {
        Err(_) => verify_once(api, ca_pem, expect).await,
        intact => Ok(intact),
    }
}

async fn verify_once(
    api: &Api,
    ca_pem: &str,
    expect: Option<(u64, Hash)>,
) -> Result<Result<Summary, Break>, ApiFailure> {
    let checkpoints: Vec<Checkpoint> =
        serde_json::from_value(api.get("/api/admin/audit/checkpoints").await?)
            .map_err(|e| ApiFailure::other(format!("the server sent no checkpoints: {e}")))?;
    let mut verifier = match Verifier::new(&checkpoints, ca_signature_ok(ca_pem)?) {
        Ok(v) => v,
        Err(b) => return Ok(Err(b)),
    };
    if let Some((seq, hash)) = expect
        && let Err(b) = verifier.expect(seq, hash)
    {
        return Ok(Err(b));
    }
    let mut broken = None;
    each_page(api, 0, |page| {
        for r in page {
            if let Err(b) = verifier.push_record(r) {
                broken = Some(b);
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    Ok(match broken {
        Some(b) => Err(b),
        None => verifier.finish(),
    })
}

/// A head as `verify` prints it, `SEQ:HASH`.
pub fn parse_head(s: &str) -> Result<(u64, Hash), String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or("a head is SEQ:HASH, as `audit verify` prints it")?;
    let seq = seq.parse().map_err(|_| format!("{seq:?} is not a seq"))?;
    let hash = flotilla_audit::from_hex(hash).ok_or("the hash is not 64 hex digits")?;
    Ok((seq, hash))
}

/// Writes every record after `after` to `out` as JSON lines, synced to disk, and then tells
/// the server it may remove them once they are old enough. Returns (records, last seq).
pub async fn export(api: &Api, after: u64, out: &Path) -> Result<(u64, u64), ApiFailure> {
    let fail = |e: std::io::Error| ApiFailure::other(format!("writing {}: {e}", out.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(fail)?;
    let mut w = std::io::BufWriter::new(file);
    let (mut count, mut last) = (0u64, after);
    each_page(api, after, |page| {
        for r in page {
            let line = serde_json::to_string(r).map_err(|e| ApiFailure::other(e.to_string()))?;
            writeln!(w, "{line}").map_err(fail)?;
            (count, last) = (count + 1, r.seq);
        }
        Ok(true)
    })
    .await?;
    let file = w.into_inner().map_err(|e| fail(e.into_error()))?;
    // The mark goes to the server only once the copy is on disk.
    file.sync_all().map_err(fail)?;
    if count > 0 {
        api.post(
            "/api/admin/audit/exported",
            &json!({ "after": after, "through": last }),
        )
        .await?;
    }
    Ok((count, last))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_head_parses_as_verify_prints_it() {
        let hash = format!("{:064x}", 7);
        assert_eq!(parse_head(&format!("12:{hash}")).unwrap().0, 12);
        for bad in ["12", "x:00", &format!("12:{}", &hash[1..])] {
            assert!(parse_head(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_checkpoint_signed_by_the_ca_verifies_and_a_changed_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = flotilla_pki::CertificateAuthority::load_or_create(dir.path()).unwrap();
        let ok = ca_signature_ok(ca.certificate_pem()).unwrap();
        let statement = Checkpoint::statement(4, &[7; 32], 1_000, 4);
        let signature = ca.sign_statement(&statement).unwrap();
        assert!(ok(&statement, &signature));
        assert!(!ok(
            &Checkpoint::statement(4, &[7; 32], 1_000, 3),
            &signature
        ));
        assert!(!ok(&statement, &signature[1..]));
        // Another CA's signature does not pass.
        let other_dir = tempfile::tempdir().unwrap();
        let other = flotilla_pki::CertificateAuthority::load_or_create(other_dir.path()).unwrap();
        assert!(!ok(&statement, &other.sign_statement(&statement).unwrap()));
    }
}
