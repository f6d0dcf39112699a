//! A loopback TCP proxy that can be switched off, to simulate a broker
//! outage, and that can terminate TLS, to put a broker behind TLS. Tansu 0.6.0 cannot be killed and restarted under a live
//! idempotent producer: the first produce after the restart panics inside
//! its sqlite storage (`lite.rs:503`, "more or less than one row") and the
//! broker stops serving. Cutting the network in front of it is the same
//! outage from the client's point of view.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A running proxy.
pub struct Proxy {
    /// Listen port.
    pub port: u16,
    down: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    _runtime: std::thread::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `port` and forwards to `target`.
    pub fn start(port: u16, target: String) -> Self {
        Self::start_with(port, target, None)
    }

    /// Listens on `port` for TLS, and forwards the plaintext to `target`.
    pub fn start_tls(port: u16, target: String, tls: TlsAcceptor) -> Self {
        Self::start_with(port, target, Some(tls))
    }

    fn start_with(port: u16, target: String, tls: Option<TlsAcceptor>) -> Self {
        let down = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let d = down.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("proxy bind");
                ready_tx.send(()).expect("ready");
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if d.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let target = target.clone();
                    let mut cut_rx = cut_rx.clone();
                    // Only cuts after this connection was accepted count.
                    cut_rx.borrow_and_update();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => forward(client, &target, cut_rx).await,
                            Some(tls) => {
                                if let Ok(client) = tls.accept(client).await {
                                    forward(client, &target, cut_rx).await;
                                }
                            }
                        }
                    });
                }
            });
        });
        ready_rx.recv().expect("proxy ready");
        Self {
            port,
            down,
            cut,
            _runtime: runtime,
        }
    }

    /// Drops every connection and refuses new ones until [`Proxy::up`].
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Copies between `client` and a new connection to `target` until either
/// side closes or the proxy cuts its connections.
async fn forward(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    target: &str,
    mut cut_rx: watch::Receiver<u64>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut_rx.changed() => {}
    }
}

/// A TLS server for the certificate and key in PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> TlsAcceptor {
    let certs = CertificateDer::pem_file_iter(cert)
        .expect("certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("TLS server config");
    TlsAcceptor::from(Arc::new(config))
}
