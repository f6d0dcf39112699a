//! A loopback TCP proxy that can be switched off, to simulate a broker
//! outage. Tansu 0.6.0 cannot be killed and restarted under a live
//! idempotent producer: the first produce after the restart panics inside
//! its sqlite storage (`lite.rs:503`, "more or less than one row") and the
//! broker stops serving. Cutting the network in front of it is the same
//! outage from the client's point of view.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

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
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let (mut c, mut s) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut c, &mut s) => {}
                            _ = cut_rx.changed() => {}
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
