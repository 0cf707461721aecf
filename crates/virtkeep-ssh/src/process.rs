//! Remote processes over SSH channels: [`RemoteProcess`] with its streaming
//! [`RemoteStdin`] / [`RemoteStdout`], the collected [`Output`] of a short command,
//! [`ChannelStream`] for unix-socket forwarding, and the plumbing that runs a command
//! line on a channel of its own (exec, spawn) and turns how the channel ended into an
//! exit status or an error.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use russh::client;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::connect::Connection;
use crate::error::SshError;

/// Chunks (≤ 64 KiB each) buffered between a process's channel and its stdout reader.
const STDOUT_CHUNKS: usize = 64;
/// Stderr kept for a spawned process (the tail is kept, older bytes are dropped).
const STDERR_LIMIT: usize = 1024 * 1024;

/// What a finished command produced. A command killed by a signal reports
/// `status = 128 + signal number`, like a shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Tracks how a channel ended.
#[derive(Default)]
struct End {
    status: Option<u32>,
    signal: Option<String>,
    refused: bool,
    closed: bool,
}

impl End {
    /// Returns true when the channel is finished.
    fn on_msg(&mut self, msg: ChannelMsg) -> bool {
        match msg {
            ChannelMsg::ExitStatus { exit_status } => self.status = Some(exit_status),
            ChannelMsg::ExitSignal {
                signal_name,
                error_message,
                ..
            } => {
                self.status = Some(128 + signal_number(&signal_name));
                self.signal = Some(format!("{signal_name:?} {error_message}").trim().to_owned());
            }
            ChannelMsg::Failure => {
                self.refused = true;
                return true;
            }
            ChannelMsg::Close => {
                self.closed = true;
                return true;
            }
            _ => {}
        }
        false
    }

    /// [`finish`](Self::finish) once every handle of the session is gone.
    fn finish_detached(self, line: &str) -> Result<u32, SshError> {
        match self.status {
            Some(s) => Ok(s),
            None => Err(SshError::ChannelClosed {
                what: format!("`{line}` (session closed)"),
            }),
        }
    }

    fn finish(self, conn: &Connection, line: &str) -> Result<u32, SshError> {
        if self.refused {
            return Err(SshError::ChannelOpen {
                what: format!("exec of `{line}`"),
                detail: "the server refused the exec request".into(),
            });
        }
        if let Some(sig) = &self.signal {
            tracing::debug!(command = line, signal = %sig, "remote command killed by signal");
        }
        match self.status {
            Some(s) => Ok(s),
            None if !self.closed || conn.is_closed() => {
                Err(conn.disconnected(format!("while running `{line}`")))
            }
            None => Err(SshError::ChannelClosed {
                what: format!("`{line}`"),
            }),
        }
    }
}

fn signal_number(sig: &Sig) -> u32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 64,
    }
}

/// Keeps the last `limit` bytes.
struct TailBuffer {
    buf: std::collections::VecDeque<u8>,
    limit: usize,
}

impl TailBuffer {
    fn new(limit: usize) -> Self {
        TailBuffer {
            buf: std::collections::VecDeque::new(),
            limit,
        }
    }
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.limit {
            &data[data.len() - self.limit..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.limit);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }
    fn into_vec(self) -> Vec<u8> {
        self.buf.into()
    }
}

// ---------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------

/// A running remote command.
pub struct RemoteProcess {
    /// The command's stdout. Ends with an error (not EOF) if the connection is lost.
    pub stdout: RemoteStdout,
    /// The command's stdin; `shutdown()` sends EOF.
    pub stdin: RemoteStdin,
    pub(crate) command: String,
    pub(crate) done: oneshot::Receiver<Result<(u32, Vec<u8>), SshError>>,
}

impl fmt::Debug for RemoteProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteProcess")
            .field("command", &self.command)
            .finish()
    }
}

impl RemoteProcess {
    /// The command line as sent.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Wait for the command to end: exit status (128 + N for signal N) and the tail of
    /// stderr (last 1 MiB). Sends EOF on stdin if that was not done yet; stdout that
    /// has not been read is discarded. (If `stdout` was moved out of the struct, read
    /// it to the end or drop it first: unread stdout holds the command back.)
    pub async fn wait(self) -> Result<(u32, Vec<u8>), SshError> {
        use tokio::io::AsyncWriteExt;
        let RemoteProcess {
            stdout,
            mut stdin,
            done,
            ..
        } = self;
        drop(stdout);
        let _ = stdin.shutdown().await;
        drop(stdin);
        done.await.unwrap_or_else(|_| {
            Err(SshError::Protocol(
                "channel task ended without a result".into(),
            ))
        })
    }

    /// Like [`wait`](Self::wait), but a non-zero status is [`SshError::CommandFailed`].
    pub async fn wait_success(self) -> Result<Vec<u8>, SshError> {
        let command = self.command.clone();
        let (status, stderr) = self.wait().await?;
        if status != 0 {
            return Err(SshError::CommandFailed {
                command,
                status,
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            });
        }
        Ok(stderr)
    }
}

/// Stdout of a [`RemoteProcess`].
pub struct RemoteStdout {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    pending: Bytes,
    failed: bool,
}

impl AsyncRead for RemoteStdout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "remote stdout failed",
                )));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => self.pending = b,
                Poll::Ready(Some(Err(e))) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Stdin of a [`RemoteProcess`].
pub struct RemoteStdin {
    inner: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    shut_down: bool,
}

impl AsyncWrite for RemoteStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.shut_down {
            return Poll::Ready(Ok(()));
        }
        let r = self.inner.as_mut().poll_shutdown(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.shut_down = true;
        }
        r
    }
}

/// A byte stream over an SSH channel (see [`crate::Session::open_unix_socket`]).
pub struct ChannelStream {
    inner: russh::ChannelStream<client::Msg>,
}

impl ChannelStream {
    pub(crate) fn from_channel(ch: russh::Channel<client::Msg>) -> ChannelStream {
        ChannelStream {
            inner: ch.into_stream(),
        }
    }
}

impl fmt::Debug for ChannelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChannelStream")
    }
}

impl AsyncRead for ChannelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChannelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------
// Running a command line on a channel of its own
// ---------------------------------------------------------------------------------

/// Start `line` on a new channel; the server's reply to the exec request is awaited
/// by the caller's read loop (`Success`/`Failure`).
async fn start(conn: &Connection, line: &str) -> Result<russh::Channel<client::Msg>, SshError> {
    let ch = conn
        .handle()
        .channel_open_session()
        .await
        .map_err(|e| conn.map_russh("opening a session channel", e))?;
    ch.exec(true, line.as_bytes())
        .await
        .map_err(|e| conn.map_russh("sending the exec request", e))?;
    Ok(ch)
}

/// Run `line` on a channel of its own with stdin at EOF, collecting its output.
pub(crate) async fn exec_on_channel(conn: &Connection, line: &str) -> Result<Output, SshError> {
    let mut ch = start(conn, line).await?;
    ch.eof()
        .await
        .map_err(|e| conn.map_russh("closing stdin", e))?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut end = End::default();
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => stderr.extend_from_slice(&data),
            other => {
                if end.on_msg(other) {
                    break;
                }
            }
        }
    }
    let status = end.finish(conn, line)?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Start `line` on a channel of its own with streaming stdin and stdout; a
/// background task feeds stdout, keeps the tail of stderr and reports the end.
pub(crate) async fn spawn_on_channel(
    conn: &Arc<Connection>,
    line: String,
) -> Result<RemoteProcess, SshError> {
    let ch = start(conn, &line).await?;
    let (rd, wr) = ch.split();
    let stdin = RemoteStdin {
        inner: Box::pin(wr.make_writer()),
        shut_down: false,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(STDOUT_CHUNKS);
    let (done_tx, done_rx) = oneshot::channel();
    // Weak: a pooled command shell's channel lives as long as the session, and a
    // strong reference here would keep the connection open after its last user.
    let pump = Pump {
        conn: Arc::downgrade(conn),
        line: line.clone(),
        stdout: tx,
        done: done_tx,
    };
    tokio::spawn(pump.run(rd, wr));
    Ok(RemoteProcess {
        stdout: RemoteStdout {
            rx,
            pending: Bytes::new(),
            failed: false,
        },
        stdin,
        command: line,
        done: done_rx,
    })
}

/// The background half of a spawned process.
struct Pump {
    conn: Weak<Connection>,
    line: String,
    stdout: mpsc::Sender<Result<Bytes, std::io::Error>>,
    done: oneshot::Sender<Result<(u32, Vec<u8>), SshError>>,
}

impl Pump {
    async fn run(self, mut rd: ChannelReadHalf, wr: ChannelWriteHalf<client::Msg>) {
        // Keep the write half alive until the remote side is done, so the
        // channel is not closed under the process.
        let _wr = wr;
        let Pump {
            conn,
            line,
            stdout,
            done,
        } = self;
        let mut stderr = TailBuffer::new(STDERR_LIMIT);
        let mut end = End::default();
        let mut tx = Some(stdout);
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(t) = &tx
                        && t.send(Ok(data)).await.is_err()
                    {
                        // Reader dropped: keep draining so the connection flows.
                        tx = None;
                    }
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
                other => {
                    let eof = matches!(other, ChannelMsg::Eof);
                    let stop = end.on_msg(other);
                    if eof {
                        // Stdout complete: let the reader see EOF now.
                        tx = None;
                    }
                    if stop {
                        break;
                    }
                }
            }
        }
        let result = match conn.upgrade() {
            Some(conn) => end.finish(&conn, &line),
            None => end.finish_detached(&line),
        };
        if let Some(t) = tx.take() {
            // Stdout ended without the server's EOF: never let a truncated stream
            // look like a complete one.
            let detail = match &result {
                Err(e) => e.to_string(),
                Ok(_) => "channel closed before end of stdout".to_owned(),
            };
            let _ = t
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    detail,
                )))
                .await;
        }
        let _ = done.send(result.map(|status| (status, stderr.into_vec())));
    }
}

/// Open a byte stream to the unix socket `remote_path` on the host.
pub(crate) async fn open_unix_socket(
    conn: &Connection,
    remote_path: &str,
) -> Result<ChannelStream, SshError> {
    let ch = conn
        .handle()
        .channel_open_direct_streamlocal(remote_path)
        .await
        .map_err(|e| conn.map_russh(&format!("forwarding to unix socket {remote_path}"), e))?;
    Ok(ChannelStream {
        inner: ch.into_stream(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_tail() {
        let mut t = TailBuffer::new(4);
        t.push(b"ab");
        t.push(b"cdef");
        assert_eq!(t.into_vec(), b"cdef");
        let mut t = TailBuffer::new(3);
        t.push(b"123456");
        t.push(b"7");
        assert_eq!(t.into_vec(), b"567");
    }
}
