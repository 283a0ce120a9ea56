//! Password hashing (argon2) off the async runtime and bounded in concurrency, so a flood of
//! logins costs at most [`Passwords`]'s share of the CPU and never stalls the broker or ingest
//! that share the runtime. The hashing threads are its own and run at a lower CPU priority
//! (nice 10): when the cores are contended, device traffic gets them first and logins wait.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

/// How long a request waits for a hashing slot before it is told the server is busy.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Every hashing slot was busy for [`QUEUE_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error("password hashing is busy")]
pub struct Busy;

/// The nice value of the hashing threads (0 is the default, 19 the lowest priority).
const HASHING_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// A bounded pool of argon2 workers on threads of their own.
#[derive(Debug, Clone)]
pub struct Passwords {
    slots: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
}

impl Default for Passwords {
    /// Half the cores (at least one): the other half stays with the broker and ingest.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Passwords::with_slots((cores / 2).max(1))
    }
}

impl Passwords {
    /// `slots` hashing threads; they end when the last clone of this is dropped.
    pub fn with_slots(slots: usize) -> Self {
        let slots = slots.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for k in 0..slots {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{k}"))
                .spawn(move || {
                    // Per thread on Linux; refused only by a seccomp policy, and then the
                    // thread hashes at the default priority.
                    let _ = rustix::process::setpriority_process(None, HASHING_NICE);
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "starting a password hashing thread");
            }
        }
        Passwords {
            slots: Arc::new(Semaphore::new(slots)),
            jobs,
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let permit = tokio::time::timeout(QUEUE_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _permit = permit;
                let _ = done.send(work());
            }))
            .map_err(|_| Busy)?;
        result.await.map_err(|_| Busy)
    }

    pub async fn hash(&self, password: &str) -> anyhow::Result<String> {
        let password = password.to_string();
        self.run(move || hash_password(&password)).await?
    }

    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, Busy> {
        let (password, hash) = (password.to_string(), hash.to_string());
        self.run(move || verify_password(&password, &hash)).await
    }
}

/// Hashes on the calling thread: for offline commands, not request handlers.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to verify against when the account does not exist, so a login for an unknown
/// email costs the same time as one for a known email.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("flotilla-dummy-password").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_wrong_passwords_do_not() {
        let p = Passwords::with_slots(1);
        let h = p.hash("correct horse").await.unwrap();
        assert!(p.verify("correct horse", &h).await.unwrap());
        assert!(!p.verify("wrong horse", &h).await.unwrap());
        assert!(!p.verify("x", "not a hash").await.unwrap());
    }

    #[tokio::test]
    async fn no_more_hashes_run_at_once_than_there_are_slots() {
        let p = Passwords::with_slots(1);
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (p, busy, peak) = (p.clone(), busy.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                p.run(move || {
                    let now = busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn hashing_runs_at_a_lower_priority_off_the_calling_thread() {
        let p = Passwords::with_slots(1);
        let caller = rustix::thread::gettid();
        let (tid, nice) = p
            .run(|| {
                (
                    rustix::thread::gettid(),
                    rustix::process::getpriority_process(None).unwrap(),
                )
            })
            .await
            .unwrap();
        assert_ne!(tid, caller);
        // At least: a run started under a higher nice value keeps it.
        assert!(nice >= HASHING_NICE, "hashing at nice {nice}");
    }
}
