//! A test receiver for outbound deliveries (the seed's CustomerServiceAgent):
//! records every request it gets and answers from a script of statuses,
//! optionally after a delay.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Hit {
    /// When it arrived.
    pub at: Instant,
    /// Lower-case header names and values.
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
}

impl Hit {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Script {
    statuses: Vec<u16>,
    delay: Duration,
    hits: Mutex<Vec<Hit>>,
}

/// A running receiver on 127.0.0.1.
pub struct Receiver {
    /// Its callback URL.
    pub url: String,
    script: Arc<Script>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Answers the n-th request with `statuses[n]` (the last one repeats),
    /// each after `delay`.
    pub async fn start(statuses: &[u16], delay: Duration) -> Self {
        let script = Arc::new(Script {
            statuses: statuses.to_vec(),
            delay,
            hits: Mutex::default(),
        });
        let app = Router::new()
            .route("/hook", post(handle))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Self { url, script, task }
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.script.hits.lock().expect("lock").clone()
    }

    /// Stops listening.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(s): State<Arc<Script>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let status = {
        let mut hits = s.hits.lock().expect("lock");
        let status = *s
            .statuses
            .get(hits.len())
            .or(s.statuses.last())
            .unwrap_or(&200);
        hits.push(Hit {
            at,
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.to_vec(),
            status,
        });
        status
    };
    tokio::time::sleep(s.delay).await;
    StatusCode::from_u16(status).expect("status")
}
