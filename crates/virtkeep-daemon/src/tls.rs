//! HTTPS for the API (rustls): the certificate and key PEM files of `[daemon.api]`,
//! read at start and again on SIGHUP. New connections get the certificate loaded last;
//! open ones keep theirs. A reload that fails (a half-copied file) keeps the previous
//! certificate and says why in the log, so a renewal mistake never takes the API down.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::{DaemonError, Result};
use crate::policy::TlsFiles;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 64;

/// Reads the certificate chain and key into a server configuration (HTTP/1.1).
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    let fail = |message: String| DaemonError::Tls {
        certificate: files.certificate.clone(),
        key: files.key.clone(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.certificate)
        .and_then(|i| i.collect::<std::result::Result<_, _>>())
        .map_err(|e| fail(format!("reading the certificate: {e}")))?;
    if chain.is_empty() {
        return Err(fail("the certificate file holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| fail(format!("reading the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| fail(format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration new connections get; replaced by [`Reloader::reload`].
#[derive(Clone)]
pub struct Reloader {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Reloader {
    pub fn new(files: TlsFiles) -> Result<Reloader> {
        let config = load(&files)?;
        Ok(Reloader {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Reads the files again; on failure the previous certificate stays in use.
    pub fn reload(&self) -> Result<()> {
        let config = load(&self.files)?;
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(p) => *p.into_inner() = config,
        }
        Ok(())
    }
}

/// Handles SIGHUP for the daemon's lifetime: reloads the certificate when there is one,
/// else only logs (so `systemctl reload` never stops a daemon without TLS). Installed
/// before the API is announced, so a SIGHUP sent after start never kills the daemon.
pub fn handle_sighup(tls: Option<Reloader>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(me) = &tls else {
                tracing::info!("SIGHUP: nothing to reload (no TLS certificate configured)");
                continue;
            };
            match me.reload() {
                Ok(()) => tracing::info!(
                    certificate = %me.files.certificate.display(),
                    "SIGHUP: TLS certificate reloaded"
                ),
                Err(e) => tracing::error!(
                    "SIGHUP: TLS reload failed, the previous certificate stays in use: {e}"
                ),
            }
        }
    });
    Ok(())
}

/// TLS connections for `axum::serve`: a task accepts TCP connections and runs each
/// handshake in its own task (with a deadline), so a slow client never holds up others.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: Reloader) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning.
                        tracing::warn!("API accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let done =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    drop(permit);
                    match done {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, rx })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task ended (runtime shutting down): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
