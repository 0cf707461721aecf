//! A read-only NBD server: fixed newstyle handshake (LIST, INFO, GO, EXPORT_NAME,
//! STRUCTURED_REPLY, SET/LIST_META_CONTEXT with `base:allocation`), READ with structured
//! data or hole chunks, BLOCK_STATUS from the export's allocation map, and EPERM for
//! every write-type command.
//!
//! Everything the client sends is bounded: option data ≤ 64 KiB, at most
//! [`MAX_OPTIONS`] options per connection, requests ≤ 32 MiB, and a connection that
//! breaks the protocol is closed.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

use crate::error::NbdError;
use crate::proto::*;
use crate::{BASE_ALLOCATION, Extent};

/// Most options one client may send before its connection is closed.
pub const MAX_OPTIONS: usize = 256;
/// Most concurrent connections one server accepts (more wait).
pub const MAX_CONNECTIONS: usize = 16;
const MAX_OPTION_DATA: u32 = 64 * 1024;
const MAX_STATUS_EXTENTS: usize = 1 << 16;
const META_ID_BASE: u32 = 1;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// What the server exports: a read-only byte range with an allocation map.
pub trait ExportSource: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// `len` bytes at `offset` (inside the export; the server checks the range).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = std::io::Result<Bytes>> + Send;
    /// Extents covering `offset..offset+len` in order, with `STATE_HOLE | STATE_ZERO`
    /// flags for ranges known to read as zeros.
    fn allocation(&self, offset: u64, len: u32) -> Vec<Extent>;
}

/// A read-only NBD server over named exports.
pub struct NbdServer<E> {
    exports: Vec<(String, Arc<E>)>,
    /// Bytes of the READ requests answered, over all connections.
    served: AtomicU64,
}

struct Conn {
    structured: bool,
    base_allocation: bool,
    no_zeroes: bool,
}

fn invalid(what: impl Into<String>) -> NbdError {
    NbdError::protocol("a valid client message", what)
}

fn take_string(data: &[u8], at: &mut usize) -> Result<String, NbdError> {
    let len = data
        .get(*at..*at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| invalid("short option data"))?;
    if len > MAX_STRING {
        return Err(invalid("string longer than 4096 bytes"));
    }
    let s = data
        .get(*at + 4..*at + 4 + len)
        .ok_or_else(|| invalid("string beyond the option data"))?;
    *at += 4 + len;
    String::from_utf8(s.to_vec()).map_err(|_| invalid("non-UTF-8 string"))
}

enum Next {
    Option,
    Transmit(usize),
    Close,
}

impl<E: ExportSource> NbdServer<E> {
    /// A server for `exports` (names unique, at most 4096 bytes; the empty name selects
    /// the first export).
    pub fn new(exports: Vec<(String, E)>) -> Result<Self, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::InvalidArgument("no export to serve".into()));
        }
        for (i, (n, _)) in exports.iter().enumerate() {
            if n.len() > MAX_STRING || exports[..i].iter().any(|(m, _)| m == n) {
                return Err(NbdError::InvalidArgument(format!(
                    "export name {n:?} too long or not unique"
                )));
            }
        }
        Ok(NbdServer {
            exports: exports.into_iter().map(|(n, e)| (n, Arc::new(e))).collect(),
            served: AtomicU64::new(0),
        })
    }

    /// The export named `name`.
    pub fn export(&self, name: &str) -> Option<&E> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.as_ref())
    }

    /// Bytes of the READ requests answered so far (data and holes alike), over all
    /// connections: what clients read through this server.
    pub fn served_bytes(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Names of the exports.
    pub fn export_names(&self) -> Vec<&str> {
        self.exports.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|(n, _)| n == name)
    }

    /// Serve one client until it disconnects.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = tokio::io::BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let mut msg = Vec::with_capacity(18);
        msg.extend_from_slice(&NBDMAGIC.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&msg).await?;
        wr.flush().await?;
        let cflags = rd.read_u32().await?;
        if cflags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
            return Err(invalid(format!("client flags {cflags:#x}")));
        }
        let mut conn = Conn {
            structured: false,
            base_allocation: false,
            no_zeroes: cflags & u32::from(FLAG_NO_ZEROES) != 0,
        };
        for _ in 0..MAX_OPTIONS {
            match self.option(&mut rd, &mut wr, &mut conn).await? {
                Next::Option => continue,
                Next::Close => return Ok(()),
                Next::Transmit(i) => {
                    return self
                        .transmit(&mut rd, &mut wr, &conn, &self.exports[i].1)
                        .await;
                }
            }
        }
        Err(invalid(format!("more than {MAX_OPTIONS} options")))
    }

    async fn option<R, W>(&self, rd: &mut R, wr: &mut W, conn: &mut Conn) -> Result<Next, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let magic = rd.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(invalid(format!("option magic {magic:#x}")));
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_DATA {
            return Err(invalid(format!("{len} bytes of option data")));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(i) = self.find(&name) else {
                    // This option cannot fail politely: the protocol says close.
                    return Ok(Next::Close);
                };
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&self.exports[i].1.size().to_be_bytes());
                m.extend_from_slice(&self.tflags(conn).to_be_bytes());
                if !conn.no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&m).await?;
                Ok(Next::Transmit(i))
            }
            OPT_ABORT => {
                reply(wr, opt, REP_ACK, &[]).await?;
                Ok(Next::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return error_reply(wr, opt, REP_ERR_INVALID, "LIST takes no data").await;
                }
                for (n, _) in &self.exports {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    reply(wr, opt, REP_SERVER, &d).await?;
                }
                reply(wr, opt, REP_ACK, &[]).await?;
                Ok(Next::Option)
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error_reply(wr, opt, REP_ERR_INVALID, "no data expected").await;
                }
                conn.structured = true;
                reply(wr, opt, REP_ACK, &[]).await?;
                Ok(Next::Option)
            }
            OPT_INFO | OPT_GO => self.info_go(wr, opt, &data, conn).await,
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                self.meta_context(wr, opt, &data, conn).await
            }
            _ => error_reply(wr, opt, REP_ERR_UNSUP, "not supported by this server").await,
        }
    }

    fn tflags(&self, conn: &Conn) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_READ_ONLY | TF_CAN_MULTI_CONN;
        if conn.structured {
            f |= TF_SEND_DF;
        }
        f
    }

    async fn info_go<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        opt: u32,
        data: &[u8],
        conn: &Conn,
    ) -> Result<Next, NbdError> {
        let mut at = 0;
        let parsed = take_string(data, &mut at).and_then(|name| {
            let n = data
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                .ok_or_else(|| invalid("no information request count"))?;
            if data.len() != at + 2 + 2 * n {
                return Err(invalid("information request count"));
            }
            Ok(name)
        });
        let name = match parsed {
            Ok(n) => n,
            Err(e) => return error_reply(wr, opt, REP_ERR_INVALID, &e.to_string()).await,
        };
        let Some(i) = self.find(&name) else {
            return error_reply(wr, opt, REP_ERR_UNKNOWN, &format!("no export {name:?}")).await;
        };
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&self.exports[i].1.size().to_be_bytes());
        info.extend_from_slice(&self.tflags(conn).to_be_bytes());
        reply(wr, opt, REP_INFO, &info).await?;
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, MAX_PAYLOAD] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        reply(wr, opt, REP_INFO, &bs).await?;
        reply(wr, opt, REP_ACK, &[]).await?;
        Ok(if opt == OPT_GO {
            Next::Transmit(i)
        } else {
            Next::Option
        })
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        opt: u32,
        data: &[u8],
        conn: &mut Conn,
    ) -> Result<Next, NbdError> {
        if opt == OPT_SET_META_CONTEXT && !conn.structured {
            return error_reply(wr, opt, REP_ERR_INVALID, "structured replies first").await;
        }
        let mut at = 0;
        let mut queries = Vec::new();
        let parsed = take_string(data, &mut at).and_then(|name| {
            let n = data
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| invalid("no query count"))?;
            at += 4;
            for _ in 0..n.min(1024) {
                queries.push(take_string(data, &mut at)?);
            }
            if at != data.len() {
                return Err(invalid("query count"));
            }
            Ok(name)
        });
        let name = match parsed {
            Ok(n) => n,
            Err(e) => return error_reply(wr, opt, REP_ERR_INVALID, &e.to_string()).await,
        };
        if self.find(&name).is_none() {
            return error_reply(wr, opt, REP_ERR_UNKNOWN, &format!("no export {name:?}")).await;
        }
        // LIST with no query (or "base:") lists everything; SET selects exact names.
        let wanted = queries.iter().any(|q| {
            q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && (q == "base:" || q.is_empty()))
        }) || (opt == OPT_LIST_META_CONTEXT && queries.is_empty());
        if wanted {
            let mut d = META_ID_BASE.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            reply(wr, opt, REP_META_CONTEXT, &d).await?;
        }
        if opt == OPT_SET_META_CONTEXT {
            conn.base_allocation = wanted;
        }
        reply(wr, opt, REP_ACK, &[]).await?;
        Ok(Next::Option)
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    rep: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rep.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    wr.write_all(&m).await?;
    wr.flush().await?;
    Ok(())
}

async fn error_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    rep: u32,
    msg: &str,
) -> Result<Next, NbdError> {
    tracing::debug!(
        option = opt_name(opt),
        reply = rep_name(rep),
        msg,
        "option refused"
    );
    reply(wr, opt, rep, msg.as_bytes()).await?;
    Ok(Next::Option)
}

/// Serve `server` on a new unix socket at `path` until `shutdown` completes; the socket
/// file is removed on return. An existing file at `path` is refused, not replaced.
pub async fn serve_unix<E: ExportSource>(
    server: Arc<NbdServer<E>>,
    path: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NbdError> {
    let listener = tokio::net::UnixListener::bind(path)?;
    let res = serve_listener(server, listener, shutdown).await;
    let _ = std::fs::remove_file(path);
    res
}

/// Serve `server` on connections accepted from `listener` until `shutdown` completes
/// (at most [`MAX_CONNECTIONS`] at once; one failing connection does not stop the rest).
pub async fn serve_listener<E: ExportSource>(
    server: Arc<NbdServer<E>>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NbdError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = slots.clone().acquire_owned() => p.map_err(|e| NbdError::Io(std::io::Error::other(e)))?,
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            a = listener.accept() => a?,
        };
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve_connection(stream).await {
                tracing::info!(error = %e, "NBD connection ended");
            }
            drop(permit);
        });
    }
}

#[derive(Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// A reply, in the order of the requests: built already, or a read still running
/// (holding its share of the connection's in-flight byte budget).
enum Pending {
    Ready(Vec<u8>),
    Read(
        tokio::task::JoinHandle<Vec<u8>>,
        tokio::sync::OwnedSemaphorePermit,
    ),
}

/// Replies queued per connection.
const MAX_INFLIGHT: usize = 16;
/// Read payload in flight per connection, in KiB (64 MiB).
const INFLIGHT_KIB: usize = 64 * 1024;

impl<E: ExportSource> NbdServer<E> {
    /// Requests are read and reads started in order while earlier replies are still
    /// being produced (qemu-img keeps several requests in flight); replies go out in
    /// request order.
    async fn transmit<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        conn: &Conn,
        export: &Arc<E>,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.flush().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_INFLIGHT);
        let (r, w) = tokio::join!(
            requests(rd, conn, export, tx, &self.served),
            replies(wr, rx)
        );
        r.and(w)
    }
}

async fn read_request<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Request, NbdError> {
    let magic = rd.read_u32().await?;
    if magic != REQUEST_MAGIC {
        return Err(invalid(format!("request magic {magic:#x}")));
    }
    Ok(Request {
        flags: rd.read_u16().await?,
        kind: rd.read_u16().await?,
        handle: rd.read_u64().await?,
        offset: rd.read_u64().await?,
        len: rd.read_u32().await?,
    })
}

async fn requests<R: AsyncRead + Unpin, E: ExportSource>(
    rd: &mut R,
    conn: &Conn,
    export: &Arc<E>,
    tx: tokio::sync::mpsc::Sender<Pending>,
    served: &AtomicU64,
) -> Result<(), NbdError> {
    let budget = Arc::new(tokio::sync::Semaphore::new(INFLIGHT_KIB));
    let st = conn.structured;
    loop {
        let req = read_request(rd).await?;
        let in_range = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= export.size());
        let mut out = Vec::new();
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    return Err(invalid(format!("write of {} bytes", req.len)));
                }
                // Drain the payload to stay in step with the client, then refuse.
                let mut sink = rd.take(u64::from(req.len));
                tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
                fail(&mut out, st, &req, EPERM, "read-only export").await?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                fail(&mut out, st, &req, EPERM, "read-only export").await?
            }
            CMD_FLUSH => simple(&mut out, &req, 0, &[]).await?,
            CMD_READ if !in_range || req.len > MAX_PAYLOAD => {
                fail(&mut out, st, &req, EINVAL, "read outside the export").await?
            }
            CMD_READ => {
                served.fetch_add(u64::from(req.len), Ordering::Relaxed);
                let kib = (req.len as usize / 1024).clamp(1, INFLIGHT_KIB) as u32;
                let permit = budget
                    .clone()
                    .acquire_many_owned(kib)
                    .await
                    .map_err(|e| NbdError::Io(std::io::Error::other(e)))?;
                let export = export.clone();
                let task = tokio::spawn(async move { read_reply(&export, st, req).await });
                if tx.send(Pending::Read(task, permit)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            CMD_BLOCK_STATUS if !conn.base_allocation => {
                fail(&mut out, st, &req, EINVAL, "no metadata context negotiated").await?
            }
            CMD_BLOCK_STATUS if !in_range || req.len == 0 => {
                fail(&mut out, st, &req, EINVAL, "range outside the export").await?
            }
            CMD_BLOCK_STATUS => block_status(&mut out, &req, export).await?,
            _ => fail(&mut out, st, &req, EINVAL, "unknown command").await?,
        }
        // The writer is gone only when the client is: stop reading too.
        if tx.send(Pending::Ready(out)).await.is_err() {
            return Ok(());
        }
    }
}

async fn replies<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
) -> Result<(), NbdError> {
    while let Some(p) = rx.recv().await {
        let (bytes, permit) = match p {
            Pending::Ready(b) => (b, None),
            Pending::Read(task, permit) => {
                let b = task
                    .await
                    .map_err(|e| NbdError::Io(std::io::Error::other(e)))?;
                (b, Some(permit))
            }
        };
        wr.write_all(&bytes).await?;
        drop(permit);
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    Ok(())
}

/// The whole reply to an in-range READ: one hole chunk when the allocation map says
/// zeros, else one data chunk (or a simple reply), or an EIO error.
async fn read_reply<E: ExportSource>(export: &Arc<E>, st: bool, req: Request) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = read_into(&mut out, export, st, &req).await;
    out
}

async fn read_into<E: ExportSource>(
    out: &mut Vec<u8>,
    export: &Arc<E>,
    st: bool,
    req: &Request,
) -> Result<(), NbdError> {
    if st && req.len > 0 {
        let alloc = export.allocation(req.offset, req.len);
        if alloc.iter().all(|e| e.flags & crate::STATE_ZERO != 0) {
            let mut p = req.offset.to_be_bytes().to_vec();
            p.extend_from_slice(&req.len.to_be_bytes());
            return chunk(out, req, REPLY_TYPE_OFFSET_HOLE, &p).await;
        }
    }
    let data = match export.read(req.offset, req.len).await {
        Ok(d) if d.len() == req.len as usize => d,
        Ok(d) => {
            let msg = format!("short read: {} of {} bytes", d.len(), req.len);
            return fail(out, st, req, EIO, &msg).await;
        }
        Err(e) => {
            tracing::warn!(offset = req.offset, error = %e, "NBD read failed");
            return fail(out, st, req, EIO, &e.to_string()).await;
        }
    };
    if st {
        let mut p = Vec::with_capacity(8 + data.len());
        p.extend_from_slice(&req.offset.to_be_bytes());
        p.extend_from_slice(&data);
        chunk(out, req, REPLY_TYPE_OFFSET_DATA, &p).await
    } else {
        simple(out, req, 0, &data).await
    }
}

async fn block_status<W: AsyncWrite + Unpin, E: ExportSource>(
    wr: &mut W,
    req: &Request,
    export: &Arc<E>,
) -> Result<(), NbdError> {
    let end = req.offset + u64::from(req.len);
    let mut p = META_ID_BASE.to_be_bytes().to_vec();
    let mut pos = req.offset;
    let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_STATUS_EXTENTS
    };
    // Clip the source's extents to the request: the reply must not overshoot it.
    for e in export.allocation(req.offset, req.len).iter().take(limit) {
        let e_end = e.offset.saturating_add(e.length).min(end);
        if e.offset != pos || e_end <= pos {
            break;
        }
        p.extend_from_slice(&((e_end - pos) as u32).to_be_bytes());
        p.extend_from_slice(&(e.flags & (crate::STATE_HOLE | crate::STATE_ZERO)).to_be_bytes());
        pos = e_end;
    }
    if pos == req.offset {
        // The source gave nothing usable: report the range as data.
        p.extend_from_slice(&req.len.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
    }
    chunk(wr, req, REPLY_TYPE_BLOCK_STATUS, &p).await
}

async fn simple<W: AsyncWrite + Unpin>(
    wr: &mut W,
    req: &Request,
    errno: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&errno.to_be_bytes());
    h.extend_from_slice(&req.handle.to_be_bytes());
    wr.write_all(&h).await?;
    wr.write_all(data).await?;
    Ok(())
}

/// One structured reply chunk with NBD_REPLY_FLAG_DONE.
async fn chunk<W: AsyncWrite + Unpin>(
    wr: &mut W,
    req: &Request,
    kind: u16,
    payload: &[u8],
) -> Result<(), NbdError> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&req.handle.to_be_bytes());
    h.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    wr.write_all(&h).await?;
    wr.write_all(payload).await?;
    Ok(())
}

async fn fail<W: AsyncWrite + Unpin>(
    wr: &mut W,
    structured: bool,
    req: &Request,
    errno: u32,
    msg: &str,
) -> Result<(), NbdError> {
    if !structured {
        return simple(wr, req, errno, &[]).await;
    }
    let msg = &msg.as_bytes()[..msg.floor_char_boundary(1024)];
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    chunk(wr, req, REPLY_TYPE_ERROR, &p).await
}
