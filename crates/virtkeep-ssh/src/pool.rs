//! A per-host connection pool.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::connect::HostTarget;
use crate::error::SshError;
use crate::session::Session;

/// Connections to one host: one for control commands and up to `max_connections`
/// for data streams, each opened on first use and reopened if it was lost.
///
/// A russh connection is driven by a single task, so it uses at most one core and a
/// slow reader on one of its channels holds back the whole connection: give every
/// parallel data stream its own `data_session(i)`.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    target: HostTarget,
    control: Mutex<Option<Session>>,
    data: Vec<Mutex<Option<Session>>>,
}

impl Pool {
    /// A pool for `target` with `max_connections` data connections (at least 1).
    /// Nothing is connected until a session is asked for.
    pub fn new(target: HostTarget, max_connections: usize) -> Pool {
        let n = max_connections.max(1);
        Pool {
            inner: Arc::new(PoolInner {
                target,
                control: Mutex::new(None),
                data: (0..n).map(|_| Mutex::new(None)).collect(),
            }),
        }
    }

    pub fn target(&self) -> &HostTarget {
        &self.inner.target
    }

    /// Number of data connection slots.
    pub fn max_connections(&self) -> usize {
        self.inner.data.len()
    }

    /// The control connection (for short commands).
    pub async fn session(&self) -> Result<Session, SshError> {
        get_or_connect(&self.inner.control, &self.inner.target).await
    }

    /// Data connection `i % max_connections`.
    pub async fn data_session(&self, i: usize) -> Result<Session, SshError> {
        let slots = &self.inner.data;
        let slot = &slots[i % slots.len()];
        get_or_connect(slot, &self.inner.target).await
    }

    /// Close every open connection.
    pub async fn close(&self) {
        for slot in std::iter::once(&self.inner.control).chain(self.inner.data.iter()) {
            if let Some(s) = slot.lock().await.take() {
                let _ = s.close().await;
            }
        }
    }
}

async fn get_or_connect(
    slot: &Mutex<Option<Session>>,
    target: &HostTarget,
) -> Result<Session, SshError> {
    let mut guard = slot.lock().await;
    if let Some(s) = guard.as_ref()
        && !s.is_closed()
    {
        return Ok(s.clone());
    }
    let s = Session::connect(target).await?;
    *guard = Some(s.clone());
    Ok(s)
}
