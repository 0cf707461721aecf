//! Transmission phase: pipelined requests, a writer task and a reader task that
//! demultiplexes replies by handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::NbdError;
use crate::handshake::handshake;
use crate::proto::*;
use crate::{BlockSize, Extent};

/// Async NBD client. Cheap to clone; clones share one connection and may issue
/// requests concurrently (they are pipelined on the wire).
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

struct Inner {
    size: u64,
    flags: u16,
    structured: bool,
    contexts: Vec<(String, u32)>,
    block_size: Option<BlockSize>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Outgoing>,
    next_handle: AtomicU64,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last clone gone: the writer ends by itself when the channel closes (and shuts
        // the stream down); the reader may be blocked on a silent server, so stop it.
        if let Some(r) = lock(&self.reader).take() {
            r.abort();
        }
    }
}

struct Outgoing {
    header: [u8; 28],
    payload: Option<Bytes>,
    disc: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Requests registered and not yet answered (including one the reader holds).
    inflight: usize,
    dead: Option<String>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    idle: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fail_all(&self, reason: String) {
        let drained: Vec<Pending> = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                st.dead = Some(reason.clone());
            }
            let v: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
            st.inflight = st.inflight.saturating_sub(v.len());
            v
        };
        for p in drained {
            let _ = p.tx.send(Err(NbdError::Disconnected {
                reason: reason.clone(),
            }));
        }
        self.idle.notify_waiters();
    }

    fn take(&self, handle: u64) -> Option<Pending> {
        lock(&self.state).pending.remove(&handle)
    }

    fn put_back(&self, handle: u64, p: Pending) {
        let mut st = lock(&self.state);
        if let Some(reason) = st.dead.clone() {
            st.inflight = st.inflight.saturating_sub(1);
            drop(st);
            let _ = p.tx.send(Err(NbdError::Disconnected { reason }));
            self.idle.notify_waiters();
        } else {
            st.pending.insert(handle, p);
        }
    }

    fn finish(&self, p: Pending, result: Result<Reply, NbdError>) {
        let _ = p.tx.send(result);
        let mut st = lock(&self.state);
        st.inflight = st.inflight.saturating_sub(1);
        if st.inflight == 0 {
            drop(st);
            self.idle.notify_waiters();
        }
    }
}

enum Reply {
    Data(Bytes),
    Extents(Vec<Extent>),
    Done,
}

enum Kind {
    Read {
        offset: u64,
        len: u32,
        buf: Option<BytesMut>,
        covered: u64,
    },
    Status {
        ctx_id: u32,
        offset: u64,
        len: u32,
        extents: Option<Vec<Extent>>,
    },
    Other,
}

struct Pending {
    kind: Kind,
    error: Option<NbdError>,
    tx: oneshot::Sender<Result<Reply, NbdError>>,
}

impl NbdClient {
    /// Fixed newstyle handshake on `stream`, negotiating structured replies, the
    /// requested metadata contexts (those the server lacks are simply not granted)
    /// and entering transmission with `NBD_OPT_GO` on `export_name`.
    /// Must be called inside a tokio runtime (it spawns a reader and a writer task).
    pub async fn connect<S>(
        mut stream: S,
        export_name: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let neg = handshake(&mut stream, export_name, meta_contexts).await?;
        tracing::debug!(
            size = neg.size,
            flags = neg.flags,
            structured = neg.structured,
            contexts = ?neg.contexts,
            block_size = ?neg.block_size,
            "NBD handshake done"
        );
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            idle: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_loop(
            BufWriter::with_capacity(256 * 1024, w),
            rx,
            shared.clone(),
        ));
        let reader = tokio::spawn(reader_loop(
            BufReader::with_capacity(256 * 1024, r),
            shared.clone(),
            neg.structured,
        ));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                size: neg.size,
                flags: neg.flags,
                structured: neg.structured,
                contexts: neg.contexts,
                block_size: neg.block_size,
                shared,
                tx,
                next_handle: AtomicU64::new(1),
                writer: Mutex::new(Some(writer)),
                reader: Mutex::new(Some(reader)),
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }
    /// Raw transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.inner.flags
    }
    pub fn read_only(&self) -> bool {
        self.inner.flags & TF_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.inner.flags & TF_SEND_FLUSH != 0
    }
    pub fn can_fua(&self) -> bool {
        self.inner.flags & TF_SEND_FUA != 0
    }
    pub fn can_trim(&self) -> bool {
        self.inner.flags & TF_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.inner.flags & TF_SEND_WRITE_ZEROES != 0
    }
    pub fn can_fast_zero(&self) -> bool {
        self.inner.flags & TF_SEND_FAST_ZERO != 0
    }
    pub fn can_df(&self) -> bool {
        self.inner.flags & TF_SEND_DF != 0
    }
    pub fn can_multi_conn(&self) -> bool {
        self.inner.flags & TF_CAN_MULTI_CONN != 0
    }
    pub fn can_cache(&self) -> bool {
        self.inner.flags & TF_SEND_CACHE != 0
    }
    pub fn is_rotational(&self) -> bool {
        self.inner.flags & TF_ROTATIONAL != 0
    }
    /// Whether structured replies were negotiated (needed for block status).
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }
    /// Granted metadata context names.
    pub fn meta_contexts(&self) -> Vec<String> {
        self.inner.contexts.iter().map(|(n, _)| n.clone()).collect()
    }
    /// Block size constraints from NBD_INFO_BLOCK_SIZE, if the server sent them.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.inner.block_size
    }
    /// Largest payload for one read/write: the server's maximum, capped at 32 MiB.
    pub fn max_block(&self) -> u32 {
        match self.inner.block_size {
            Some(b) => b.max.clamp(1, MAX_PAYLOAD),
            None => MAX_PAYLOAD,
        }
    }
    /// The server's preferred request size (4096 when not advertised).
    pub fn preferred_block(&self) -> u32 {
        self.inner
            .block_size
            .map_or(4096, |b| b.preferred)
            .min(self.max_block())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(NbdError::InvalidArgument(format!(
                "range {offset}+{len} outside export of {} bytes",
                self.inner.size
            ))),
        }
    }

    fn check_payload(&self, what: &'static str, len: u64) -> Result<(), NbdError> {
        let max = self.max_block();
        if len > u64::from(max) {
            return Err(NbdError::TooLarge {
                what,
                len,
                max: u64::from(max),
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.read_only() {
            Err(NbdError::ReadOnly)
        } else {
            Ok(())
        }
    }

    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
        kind: Kind,
    ) -> Result<Reply, NbdError> {
        let handle = self.inner.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.inner.shared.state);
            if let Some(reason) = &st.dead {
                return Err(NbdError::Disconnected {
                    reason: reason.clone(),
                });
            }
            if st.closing {
                return Err(NbdError::Disconnected {
                    reason: "disconnect() was called".into(),
                });
            }
            st.pending.insert(
                handle,
                Pending {
                    kind,
                    error: None,
                    tx,
                },
            );
            st.inflight += 1;
        }
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&cmd.to_be_bytes());
        header[8..16].copy_from_slice(&handle.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        if self
            .inner
            .tx
            .send(Outgoing {
                header,
                payload,
                disc: false,
            })
            .is_err()
        {
            if let Some(p) = self.inner.shared.take(handle) {
                self.inner.shared.finish(p, Ok(Reply::Done));
            }
            return Err(self.disconnected());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.disconnected()),
        }
    }

    fn disconnected(&self) -> NbdError {
        let st = lock(&self.inner.shared.state);
        NbdError::Disconnected {
            reason: st
                .dead
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        }
    }

    /// Read `len` bytes at `offset` (at most [`max_block`](Self::max_block)). Holes in
    /// structured replies come back as zeros.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.check_payload("read", u64::from(len))?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let kind = Kind::Read {
            offset,
            len,
            buf: None,
            covered: 0,
        };
        match self.request(CMD_READ, 0, offset, len, None, kind).await? {
            Reply::Data(b) => Ok(b),
            _ => Err(NbdError::protocol("read data", "another reply kind")),
        }
    }

    /// Read into `buf` (length at most `max_block`).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = u32::try_from(buf.len()).map_err(|_| NbdError::TooLarge {
            what: "read",
            len: buf.len() as u64,
            max: u64::from(self.max_block()),
        })?;
        let data = self.read(offset, len).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// `NBD_CMD_BLOCK_STATUS` for one granted metadata context. Returns consecutive
    /// extents with absolute offsets starting at `offset`; they may cover less than
    /// `len` (the server decides), never more.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, NbdError> {
        let ctx_id = self
            .inner
            .contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| NbdError::MetaContextNotNegotiated(context.to_string()))?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let kind = Kind::Status {
            ctx_id,
            offset,
            len,
            extents: None,
        };
        match self
            .request(CMD_BLOCK_STATUS, 0, offset, len, None, kind)
            .await?
        {
            Reply::Extents(e) => Ok(e),
            _ => Err(NbdError::protocol(
                "block status extents",
                "another reply kind",
            )),
        }
    }

    /// Block status over a whole range (`len` may exceed 4 GiB): repeats
    /// [`block_status`](Self::block_status) until `offset..offset+len` is covered.
    pub async fn block_status_all(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        // Largest request length, aligned to the server's minimum block size.
        let align = u64::from(self.inner.block_size.map_or(512, |b| b.min.max(512)));
        let step_max = (u64::from(u32::MAX) / align) * align;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let step = (end - pos).min(step_max) as u32;
            let ext = self.block_status(context, pos, step).await?;
            let Some(last) = ext.last() else {
                return Err(NbdError::protocol("at least one extent", "none"));
            };
            pos = last.offset + last.length;
            for e in ext {
                match out.last_mut() {
                    Some(prev)
                        if prev.flags == e.flags && prev.offset + prev.length == e.offset =>
                    {
                        prev.length += e.length;
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// `NBD_CMD_WRITE` (at most `max_block` bytes).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_payload("write", data.len() as u64)?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let payload = Bytes::copy_from_slice(data);
        self.request(
            CMD_WRITE,
            0,
            offset,
            data.len() as u32,
            Some(payload),
            Kind::Other,
        )
        .await
        .map(|_| ())
    }

    /// `NBD_CMD_WRITE_ZEROES`; with `no_hole` the server must allocate. When the
    /// server lacks write-zeroes, zeros are written with `NBD_CMD_WRITE`.
    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        if self.can_write_zeroes() {
            let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
            return self
                .request(CMD_WRITE_ZEROES, flags, offset, len, None, Kind::Other)
                .await
                .map(|_| ());
        }
        let chunk = self.max_block().min(4 * 1024 * 1024);
        let zeros = Bytes::from(vec![0u8; chunk as usize]);
        let mut done: u32 = 0;
        while done < len {
            let n = (len - done).min(chunk);
            self.request(
                CMD_WRITE,
                0,
                offset + u64::from(done),
                n,
                Some(zeros.slice(..n as usize)),
                Kind::Other,
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// `NBD_CMD_TRIM` (advisory: a no-op when the server does not offer it).
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.check_writable()?;
        self.check_range(offset, u64::from(len))?;
        if len == 0 || !self.can_trim() {
            return Ok(());
        }
        self.request(CMD_TRIM, 0, offset, len, None, Kind::Other)
            .await
            .map(|_| ())
    }

    /// `NBD_CMD_FLUSH` (a no-op when the server does not offer it: no write cache).
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, None, Kind::Other)
            .await
            .map(|_| ())
    }

    /// Clean shutdown: waits for requests in flight, sends `NBD_CMD_DISC`, closes the
    /// write side and waits (up to 5 s) for the server to close. Later requests on any
    /// clone fail with `Disconnected`.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let shared = &self.inner.shared;
        loop {
            let notified = shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&shared.state);
                if let Some(reason) = &st.dead {
                    return Err(NbdError::Disconnected {
                        reason: reason.clone(),
                    });
                }
                if st.inflight == 0 {
                    if st.closing {
                        return Ok(());
                    }
                    st.closing = true;
                    break;
                }
            }
            notified.await;
        }
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let handle = self.inner.next_handle.fetch_add(1, Ordering::Relaxed);
        header[8..16].copy_from_slice(&handle.to_be_bytes());
        let _ = self.inner.tx.send(Outgoing {
            header,
            payload: None,
            disc: true,
        });
        let writer = lock(&self.inner.writer).take();
        if let Some(w) = writer {
            let _ = w.await;
        }
        let dead = lock(&shared.state).dead.clone();
        if let Some(reason) = dead
            && reason != CLOSED_BY_CLIENT
        {
            return Err(NbdError::Disconnected { reason });
        }
        let reader = lock(&self.inner.reader).take();
        if let Some(mut r) = reader
            && tokio::time::timeout(std::time::Duration::from_secs(5), &mut r)
                .await
                .is_err()
        {
            r.abort();
        }
        Ok(())
    }
}

const CLOSED_BY_CLIENT: &str = "disconnected by client";

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    async fn put<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, m: &Outgoing) -> std::io::Result<()> {
        w.write_all(&m.header).await?;
        if let Some(p) = &m.payload {
            w.write_all(p).await?;
        }
        Ok(())
    }
    loop {
        let Some(first) = rx.recv().await else {
            let _ = w.shutdown().await;
            return;
        };
        let mut disc = first.disc;
        let mut res = put(&mut w, &first).await;
        while res.is_ok() && !disc {
            match rx.try_recv() {
                Ok(m) => {
                    disc = m.disc;
                    res = put(&mut w, &m).await;
                }
                Err(_) => break,
            }
        }
        if res.is_ok() {
            res = w.flush().await;
        }
        if let Err(e) = res {
            shared.fail_all(format!("write to server failed: {e}"));
            return;
        }
        if disc {
            let _ = w.shutdown().await;
            shared.fail_all(CLOSED_BY_CLIENT.to_string());
            return;
        }
    }
}

async fn reader_loop<R: AsyncRead + Unpin>(
    mut r: BufReader<R>,
    shared: Arc<Shared>,
    structured: bool,
) {
    let reason = match read_replies(&mut r, &shared, structured).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    let closing = lock(&shared.state).closing;
    if closing {
        shared.fail_all(CLOSED_BY_CLIENT.to_string());
    } else {
        tracing::warn!(%reason, "NBD connection lost");
        shared.fail_all(reason);
    }
}

/// Reads the next 4 bytes; `None` on a clean EOF at a message boundary.
async fn read_magic<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<u32>> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut b[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(Some(u32::from_be_bytes(b)))
}

async fn skip<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn server_error(errno: u32, message: String, offset: Option<u64>) -> NbdError {
    NbdError::Server {
        errno: if errno == 0 { 5 } else { errno },
        message,
        offset,
    }
}

async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    structured: bool,
) -> Result<(), NbdError> {
    loop {
        let Some(magic) = read_magic(r).await? else {
            return Ok(());
        };
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let errno = r.read_u32().await?;
                let handle = r.read_u64().await?;
                let Some(mut p) = shared.take(handle) else {
                    return Err(NbdError::protocol(
                        "a reply to a pending request",
                        format!("simple reply for unknown handle {handle}"),
                    ));
                };
                let result = if errno != 0 {
                    Err(server_error(errno, String::new(), None))
                } else {
                    match &mut p.kind {
                        Kind::Read { len, .. } => {
                            if structured {
                                let e = NbdError::protocol(
                                    "structured reply to NBD_CMD_READ",
                                    "simple reply",
                                );
                                shared.finish(
                                    p,
                                    Err(NbdError::protocol(
                                        "structured reply to NBD_CMD_READ",
                                        "simple reply",
                                    )),
                                );
                                return Err(e);
                            }
                            let mut buf = BytesMut::zeroed(*len as usize);
                            r.read_exact(&mut buf).await?;
                            Ok(Reply::Data(buf.freeze()))
                        }
                        Kind::Status { .. } => Err(NbdError::protocol(
                            "block status chunk",
                            "simple reply without data",
                        )),
                        Kind::Other => Ok(Reply::Done),
                    }
                };
                shared.finish(p, result);
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                let flags = r.read_u16().await?;
                let typ = r.read_u16().await?;
                let handle = r.read_u64().await?;
                let length = r.read_u32().await?;
                let Some(mut p) = shared.take(handle) else {
                    return Err(NbdError::protocol(
                        "a reply to a pending request",
                        format!("chunk for unknown handle {handle}"),
                    ));
                };
                if let Err(e) = read_chunk(r, &mut p, typ, length).await {
                    let fatal = e.to_string();
                    shared.finish(p, Err(e));
                    return Err(NbdError::Disconnected { reason: fatal });
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    let result = complete(&mut p);
                    shared.finish(p, result);
                } else {
                    shared.put_back(handle, p);
                }
            }
            other => {
                return Err(NbdError::protocol("reply magic", format!("{other:#x}")));
            }
        }
    }
}

/// Reads one structured chunk payload into the pending request. Any error is fatal to
/// the connection (the stream is no longer in sync or the server is misbehaving).
async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    typ: u16,
    length: u32,
) -> Result<(), NbdError> {
    match typ {
        REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(NbdError::protocol(
                    "empty NBD_REPLY_TYPE_NONE",
                    format!("{length} bytes"),
                ));
            }
        }
        REPLY_TYPE_OFFSET_DATA => {
            let Kind::Read {
                offset,
                len,
                buf,
                covered,
            } = &mut p.kind
            else {
                return Err(NbdError::protocol(
                    "OFFSET_DATA only for reads",
                    "OFFSET_DATA for another command",
                ));
            };
            if length <= 8 {
                return Err(NbdError::protocol(
                    "OFFSET_DATA with data",
                    format!("payload of {length} bytes"),
                ));
            }
            let dlen = u64::from(length - 8);
            let at = r.read_u64().await?;
            let rel = at
                .checked_sub(*offset)
                .filter(|rel| rel + dlen <= u64::from(*len))
                .ok_or_else(|| {
                    NbdError::protocol(
                        format!("data within {}+{}", offset, len),
                        format!("{at}+{dlen}"),
                    )
                })?;
            let b = buf.get_or_insert_with(|| BytesMut::zeroed(*len as usize));
            r.read_exact(&mut b[rel as usize..(rel + dlen) as usize])
                .await?;
            *covered += dlen;
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let Kind::Read {
                offset,
                len,
                buf,
                covered,
            } = &mut p.kind
            else {
                return Err(NbdError::protocol(
                    "OFFSET_HOLE only for reads",
                    "OFFSET_HOLE for another command",
                ));
            };
            if length != 12 {
                return Err(NbdError::protocol(
                    "12-byte OFFSET_HOLE",
                    format!("{length} bytes"),
                ));
            }
            let at = r.read_u64().await?;
            let hlen = u64::from(r.read_u32().await?);
            let rel = at
                .checked_sub(*offset)
                .filter(|rel| hlen > 0 && rel + hlen <= u64::from(*len))
                .ok_or_else(|| {
                    NbdError::protocol(
                        format!("hole within {}+{}", offset, len),
                        format!("{at}+{hlen}"),
                    )
                })?;
            if let Some(b) = buf {
                b[rel as usize..(rel + hlen) as usize].fill(0);
            }
            *covered += hlen;
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let Kind::Status {
                ctx_id,
                offset,
                len,
                extents,
            } = &mut p.kind
            else {
                return Err(NbdError::protocol(
                    "BLOCK_STATUS only for block status",
                    "BLOCK_STATUS for another command",
                ));
            };
            if length < 12 || !(length - 4).is_multiple_of(8) {
                return Err(NbdError::protocol(
                    "BLOCK_STATUS of 4+8n bytes (n>0)",
                    format!("{length} bytes"),
                ));
            }
            if length > MAX_STATUS_PAYLOAD {
                return Err(NbdError::TooLarge {
                    what: "block status reply",
                    len: u64::from(length),
                    max: u64::from(MAX_STATUS_PAYLOAD),
                });
            }
            let id = r.read_u32().await?;
            let n = (length - 4) / 8;
            if id != *ctx_id || extents.is_some() {
                skip(r, u64::from(length - 4)).await?;
                return Ok(());
            }
            let end = *offset + u64::from(*len);
            let mut pos = *offset;
            let mut out = Vec::with_capacity(n.min(4096) as usize);
            let mut bad = None;
            for _ in 0..n {
                let elen = u64::from(r.read_u32().await?);
                let eflags = r.read_u32().await?;
                if elen == 0 {
                    bad.get_or_insert("zero-length extent");
                }
                if pos < end && elen > 0 {
                    let l = elen.min(end - pos);
                    out.push(Extent {
                        offset: pos,
                        length: l,
                        flags: eflags,
                    });
                    pos += l;
                }
            }
            if let Some(b) = bad {
                p.error
                    .get_or_insert(NbdError::protocol("extents of non-zero length", b));
            }
            *extents = Some(out);
        }
        t if t & REPLY_TYPE_ERROR_BIT != 0 => {
            if !(6..=MAX_ERROR_PAYLOAD).contains(&length) {
                return Err(NbdError::protocol(
                    "error chunk of 6..4110 bytes",
                    format!("{length} bytes"),
                ));
            }
            let mut data = vec![0u8; length as usize];
            r.read_exact(&mut data).await?;
            let errno = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            let mlen = usize::from(u16::from_be_bytes([data[4], data[5]]));
            let msg_end = 6 + mlen;
            if msg_end > data.len() {
                return Err(NbdError::protocol(
                    "error message within the chunk",
                    format!("message of {mlen} bytes in {length}"),
                ));
            }
            let message = String::from_utf8_lossy(&data[6..msg_end]).to_string();
            let offset = if t == REPLY_TYPE_ERROR_OFFSET {
                let o = data
                    .get(msg_end..msg_end + 8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .ok_or_else(|| {
                        NbdError::protocol("ERROR_OFFSET with an offset", "short chunk")
                    })?;
                Some(u64::from_be_bytes(o))
            } else {
                None
            };
            if t != REPLY_TYPE_ERROR && t != REPLY_TYPE_ERROR_OFFSET {
                tracing::debug!(typ = t, "unknown error chunk type");
            }
            let e = server_error(errno, message, offset);
            // Keep the first error; for reads the lowest offset is the most useful.
            match (&p.error, offset) {
                (None, _) => p.error = Some(e),
                (
                    Some(NbdError::Server {
                        offset: Some(prev), ..
                    }),
                    Some(o),
                ) if o < *prev => p.error = Some(e),
                _ => {}
            }
        }
        t => {
            return Err(NbdError::protocol(
                "a known structured reply type",
                format!("type {t}"),
            ));
        }
    }
    Ok(())
}

fn complete(p: &mut Pending) -> Result<Reply, NbdError> {
    if let Some(e) = p.error.take() {
        return Err(e);
    }
    match &mut p.kind {
        Kind::Read {
            len, buf, covered, ..
        } => {
            if *covered != u64::from(*len) {
                return Err(NbdError::protocol(
                    format!("read reply covering {len} bytes"),
                    format!("{covered} bytes"),
                ));
            }
            Ok(Reply::Data(
                buf.take()
                    .unwrap_or_else(|| BytesMut::zeroed(*len as usize))
                    .freeze(),
            ))
        }
        Kind::Status { extents, .. } => match extents.take() {
            Some(e) if !e.is_empty() => Ok(Reply::Extents(e)),
            _ => Err(NbdError::protocol(
                "a block status chunk for the context",
                "none",
            )),
        },
        Kind::Other => Ok(Reply::Done),
    }
}
