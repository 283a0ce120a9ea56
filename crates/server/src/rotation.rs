//! Certificates the server makes for itself, renewed while it runs: each is re-issued after
//! two thirds of its life (counted on the monotonic clock, so a wall-clock step neither
//! hastens nor delays it) and handed to its users through a watch channel; they pick it up
//! at their next connection.

use std::sync::Arc;
use std::time::Duration;

use flotilla_pki::KeyedCertificate;
use tokio::sync::watch;

/// The current certificate of one of the server's own identities.
pub type Identity = watch::Receiver<Arc<KeyedCertificate>>;

/// How long to wait before retrying an issue that failed.
const RETRY: Duration = Duration::from_secs(60);

/// Issues a first certificate now (an error stops the start), then a fresh one every two
/// thirds of `validity`, for as long as anyone holds the returned receiver.
pub fn keep_fresh(
    what: &'static str,
    validity: Duration,
    issue: impl Fn() -> anyhow::Result<KeyedCertificate> + Send + 'static,
) -> anyhow::Result<Identity> {
    let (tx, rx) = watch::channel(Arc::new(issue()?));
    let renew_after = validity * 2 / 3;
    tokio::spawn(async move {
        let mut wait = renew_after;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
            match issue() {
                Ok(cert) => {
                    tracing::info!(what, "certificate renewed");
                    if tx.send(Arc::new(cert)).is_err() {
                        return;
                    }
                    wait = renew_after;
                }
                Err(e) => {
                    tracing::error!(what, error = %format!("{e:#}"), "renewing a certificate failed; retrying");
                    wait = RETRY.min(renew_after);
                }
            }
        }
    });
    Ok(rx)
}

/// Writes a certificate and its key (mode 0600) where a reader that takes paths finds them,
/// each replaced in one rename so a reader never sees half a file. The pair is not swapped at
/// once: the key goes first, so a reader outside this process may see the new key with the
/// old certificate for a moment (the embedded broker reads them only after this returns).
pub fn write_files(
    cert: &KeyedCertificate,
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> anyhow::Result<()> {
    let next = |p: &std::path::Path| p.with_extension("next");
    flotilla_pki::write_secret_file(&next(key_path), cert.private_key_pem.as_bytes())?;
    std::fs::rename(next(key_path), key_path)?;
    std::fs::write(next(cert_path), &cert.certificate_pem)?;
    std::fs::rename(next(cert_path), cert_path)?;
    Ok(())
}

/// An identity that never changes (a short-lived one used once).
pub fn fixed(cert: KeyedCertificate) -> Identity {
    watch::channel(Arc::new(cert)).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn numbered(n: &AtomicU32) -> anyhow::Result<KeyedCertificate> {
        let k = n.fetch_add(1, Ordering::SeqCst);
        Ok(KeyedCertificate {
            certificate_pem: format!("cert-{k}"),
            private_key_pem: format!("key-{k}"),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_is_replaced_after_two_thirds_of_its_life() {
        let n = Arc::new(AtomicU32::new(0));
        let counter = n.clone();
        let mut id =
            keep_fresh("test", Duration::from_secs(30), move || numbered(&counter)).unwrap();
        assert_eq!(id.borrow_and_update().certificate_pem, "cert-0");
        tokio::time::sleep(Duration::from_secs(19)).await;
        assert!(!id.has_changed().unwrap());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(id.has_changed().unwrap());
        assert_eq!(id.borrow_and_update().certificate_pem, "cert-1");
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(id.borrow_and_update().certificate_pem, "cert-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_issue_is_retried_and_the_old_certificate_kept() {
        let n = Arc::new(AtomicU32::new(0));
        let counter = n.clone();
        let mut id = keep_fresh("test", Duration::from_secs(600), move || {
            let k = counter.load(Ordering::SeqCst);
            if k == 1 {
                counter.fetch_add(1, Ordering::SeqCst);
                anyhow::bail!("CA unavailable");
            }
            numbered(&counter)
        })
        .unwrap();
        id.borrow_and_update();
        tokio::time::sleep(Duration::from_secs(401)).await;
        assert!(
            !id.has_changed().unwrap(),
            "the failed issue changed nothing"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(id.borrow_and_update().certificate_pem, "cert-2");
    }
}
