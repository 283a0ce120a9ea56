//! Helpers shared by the benchmark binaries.

use anyhow::{Context, Result};
use futures::StreamExt;

use crate::{DeviceIdentity, Server};

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Enrolls `n` devices named `{prefix}-00000`... through `/sign-csr`, 16 at a time.
pub async fn enroll_all(
    server: &Server,
    jwt: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<DeviceIdentity>> {
    let ids: Vec<Result<DeviceIdentity>> = futures::stream::iter((0..n).map(|i| {
        let id = format!("{prefix}-{i:05}");
        async move { server.enroll(jwt, &id).await }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    ids.into_iter().collect()
}
