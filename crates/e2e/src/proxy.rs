//! A TCP proxy that cuts connections: forwards both ways, but closes each connection once the
//! server has sent it a chosen number of bytes — a link that drops mid-download — or, started
//! with [`CuttingProxy::stalling`], holds it open without forwarding another byte: a server
//! that stalls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CuttingProxy {
    pub addr: SocketAddr,
    /// Connections cut so far.
    pub cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    /// `budget(n)` is how many bytes connection `n` may carry from the server.
    pub async fn start(
        target: SocketAddr,
        budget: impl Fn(usize) -> usize + Send + Sync + 'static,
    ) -> anyhow::Result<CuttingProxy> {
        Self::run(target, budget, false).await
    }

    /// Like [`CuttingProxy::start`], but a connection past its budget stays open and silent
    /// (counted in `cuts`) until the client closes it.
    pub async fn stalling(
        target: SocketAddr,
        budget: impl Fn(usize) -> usize + Send + Sync + 'static,
    ) -> anyhow::Result<CuttingProxy> {
        Self::run(target, budget, true).await
    }

    async fn run(
        target: SocketAddr,
        budget: impl Fn(usize) -> usize + Send + Sync + 'static,
        stall: bool,
    ) -> anyhow::Result<CuttingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cuts = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(budget);
        let counter = cuts.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let limit = budget(n);
                n += 1;
                let cuts = counter.clone();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(k) = sr.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        let k = k.min(limit - sent);
                        if cw.write_all(&buf[..k]).await.is_err() {
                            break;
                        }
                        sent += k;
                        if sent >= limit {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                    if stall && sent >= limit {
                        // Silent until the client gives up and closes its side.
                        let _ = up.await;
                        return;
                    }
                    up.abort();
                });
            }
        });
        Ok(CuttingProxy { addr, cuts, task })
    }
}
