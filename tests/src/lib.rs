//! End-to-end harness: real Tansu broker (sqlite storage), real Redis, and
//! the real `hooklog-ingest` / `hooklog-processor` binaries, on free ports.
//!
//! - [`Stack`]: a broker and a Redis. [`shared_stack`] starts one per test
//!   binary (or reuses `HOOKLOG_TEST_BROKERS` / `HOOKLOG_TEST_REDIS`); tests
//!   that kill a dependency start their own with [`Stack::start`].
//! - [`Service`]: a child process under a supervisor that kills it when the
//!   test process exits, even on panic or abort; [`Drop`] kills it too.
//! - [`TestEnv`]: a unique namespace (topics, group, Redis prefix), a
//!   generated `hooklog.toml`, and helpers to spawn the binaries.
//! - [`sign`]: request signing for every scheme; [`kafka`]: reading records.
//!
//! Logs of spawned processes go to files in the run directory; set
//! `TEST_LOG=1` to see them on the console instead.

pub mod events;
pub mod kafka;
pub mod otlp;
pub mod proxy;
pub mod receiver;
pub mod sign;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Path of a built workspace binary (`make test` builds them first).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    // HOOKLOG_BIN_PROFILE=release for benchmarks.
    let profile = std::env::var("HOOKLOG_BIN_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = target.join(profile).join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Listen ports are picked from here: below Linux's ephemeral range
/// (32768–60999 by default). A port the kernel hands out for `bind(0)` can
/// be taken by any outgoing connection (a broker or Redis client, `curl`)
/// between this check and the service's own bind, and the service then
/// fails to start; the parallel suite saw that once.
const LISTEN_PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A free loopback port for a service to listen on. Successive calls in a
/// process walk the range from a random start, so two tests never get the
/// same port before either has bound it.
pub fn free_port() -> u16 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let seed = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::process::id(),
        );
        AtomicU32::new(seed as u32)
    });
    let span = LISTEN_PORTS.end - LISTEN_PORTS.start;
    for _ in 0..span {
        let port = (LISTEN_PORTS.start + next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LISTEN_PORTS:?}");
}

/// A directory for this test process's files.
pub fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = root().join("target").join("e2e-run");
        // Keep only this run's files: earlier runs' logs can be large.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&d).expect("run dir");
        d
    })
}

/// Unique ids for namespaces.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// Kills the child when the test process (the parent) is gone.
const SUPERVISOR: &str = r#"parent=$1; pidfile=$2; shift 2
"$@" &
child=$!
echo $child > "$pidfile"
trap 'kill -9 $child 2>/dev/null; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.2; done
kill -9 $child 2>/dev/null
wait $child 2>/dev/null
exit 0"#;

/// A spawned process (restartable with the same command).
pub struct Service {
    /// Short name for messages.
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    cwd: PathBuf,
    /// Log file of stdout + stderr.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Service {
    /// Defines (does not start) a service.
    pub fn new(
        name: &str,
        program: impl Into<PathBuf>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let name = unique(&format!("{name}-"));
        let cwd = run_dir().join(&name);
        std::fs::create_dir_all(&cwd).expect("service dir");
        Self {
            log: cwd.join("out.log"),
            name,
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd,
            child: None,
        }
    }

    /// The directory it runs in (its files and log).
    pub fn dir(&self) -> &Path {
        &self.cwd
    }

    /// Adds an environment variable for the next start.
    pub fn env(&mut self, k: &str, v: &str) {
        self.envs.push((k.into(), v.into()));
    }

    /// Starts it under the supervisor.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let quiet = std::env::var("TEST_LOG").is_err();
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(SUPERVISOR)
            .arg("supervisor")
            .arg(std::process::id().to_string())
            .arg(self.cwd.join("pid"))
            .arg(&self.program)
            .args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        // Children must not take the test's own HOOKLOG_* settings.
        for (k, _) in std::env::vars() {
            if k.starts_with("HOOKLOG_") || k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        if quiet {
            cmd.stdout(log.try_clone().expect("log")).stderr(log);
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", self.program.display())),
        );
    }

    /// Sends SIGKILL to the process (not the supervisor) and waits.
    pub fn kill(&mut self) {
        self.signal_child("-KILL");
    }

    /// The supervised process's pid, once started.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.cwd.join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// [`process_cpu_secs`] of the supervised process.
    pub fn cpu_secs(&self) -> Option<f64> {
        process_cpu_secs(self.pid()?)
    }

    /// [`Service::cpu_secs`] of the process and its live descendants, as
    /// the kernel lists each one's children (those its main thread started:
    /// gunicorn's workers); None where the kernel does not list them.
    pub fn tree_cpu_secs(&self) -> Option<f64> {
        fn tree(pid: u32) -> Option<f64> {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            let mut secs = process_cpu_secs(pid)?;
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                // A child that exited in between no longer counts.
                secs += tree(child).unwrap_or(0.0);
            }
            Some(secs)
        }
        tree(self.pid()?)
    }

    /// Sends a signal (e.g. `-TERM`) without waiting.
    pub fn send_signal(&self, sig: &str) {
        let pidfile = self.cwd.join("pid");
        let _ = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "kill {sig} $(cat {}) 2>/dev/null",
                pidfile.display()
            ))
            .status();
    }

    /// Sends SIGTERM to the process and waits for it to exit.
    pub fn terminate(&mut self) {
        self.signal_child("-TERM");
    }

    fn signal_child(&mut self, sig: &str) {
        if let Some(mut sup) = self.child.take() {
            // The supervisor wrote the process's pid; `kill` is a shell builtin.
            let pidfile = self.cwd.join("pid");
            let _ = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "kill {sig} $(cat {}) 2>/dev/null",
                    pidfile.display()
                ))
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = sup.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = sup.kill();
            let _ = sup.wait();
        }
    }

    /// Whether the supervised process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until the service exits by itself; returns false on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time (user + system) process `pid` has used so far, in seconds, from
/// /proc (in clock ticks of 1/100 s, as on every Linux here).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: utime is the 12th,
    // stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// A Kafka-protocol broker and a Redis.
pub struct Stack {
    /// `host:port` of the broker.
    pub brokers: String,
    /// `redis://…` URL.
    pub redis_url: String,
    /// The broker process (None when reused from env).
    pub tansu: Option<Service>,
    /// The Redis process (None when reused from env).
    pub redis: Option<Service>,
    tansu_port: u16,
}

impl Stack {
    /// Starts a dedicated Tansu (sqlite storage) and Redis on free ports.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_with(port, port)
    }

    /// Like [`Stack::start`], with clients reaching the broker through a
    /// [`proxy::Proxy`] that the test can switch off.
    pub fn start_behind_proxy() -> (Self, proxy::Proxy) {
        let advertised = free_port();
        let stack = Self::start_with(free_port(), advertised);
        let target = stack
            .brokers
            .replace(&advertised.to_string(), &stack.tansu_port.to_string());
        let p = proxy::Proxy::start(advertised, target);
        stack.wait_ready();
        stack.index_tansu_headers();
        (stack, p)
    }

    /// A dedicated stack whose broker speaks only TLS to its clients: a
    /// TLS-terminating proxy at the address Tansu advertises, with a
    /// certificate for 127.0.0.1 made here ([`test_certificate`]). Returns
    /// the stack, the proxy, and the CA clients must trust.
    pub fn start_behind_tls_proxy() -> (Self, proxy::Proxy, PathBuf) {
        let advertised = free_port();
        let mut stack = Self::start_with(free_port(), advertised);
        let plain = stack
            .brokers
            .replace(&advertised.to_string(), &stack.tansu_port.to_string());
        let (ca, cert, key) = test_certificate();
        let p =
            proxy::Proxy::start_tls(advertised, plain.clone(), proxy::tls_acceptor(&cert, &key));
        // The harness's own readiness checks speak plaintext to Tansu.
        let tls_brokers = std::mem::replace(&mut stack.brokers, plain);
        stack.wait_ready();
        stack.index_tansu_headers();
        stack.brokers = tls_brokers;
        (stack, p, ca)
    }

    fn start_with(kport: u16, advertised: u16) -> Self {
        let rport = free_port();
        let url = format!("tcp://127.0.0.1:{kport}");
        let advertised_url = format!("tcp://127.0.0.1:{advertised}");
        let tansu_bin = std::env::var("TANSU_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root().join(".tools/bin/tansu"));
        assert!(
            tansu_bin.exists(),
            "Tansu is missing: run deploy/local/install.sh"
        );
        let mut tansu = Service::new(
            "tansu",
            tansu_bin,
            &[
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised_url,
                "--storage-engine",
                // TANSU_STORAGE=memory only for benchmarks that read from
                // the start of the log (DESIGN.md, "Local stack").
                if std::env::var("TANSU_STORAGE").as_deref() == Ok("memory") {
                    "memory://tansu/"
                } else {
                    "sqlite://tansu.db"
                },
            ],
            &[],
        );
        if let Ok(level) = std::env::var("TANSU_LOG") {
            tansu.env("RUST_LOG", &level);
        }
        tansu.start();
        let mut redis = Service::new(
            "redis",
            "redis-server",
            &[
                "--port",
                &rport.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                // Hooklog's recommended setting (docs/operations.md,
                // "Redis memory"): entity hashes whose clocks carry a long
                // event id stay compact.
                "--hash-max-listpack-value",
                "128",
                "--appendonly",
                "yes",
                "--appendfsync",
                // Tests: every acknowledged write on disk. The bench uses
                // Redis's recommended production setting (everysec).
                &std::env::var("REDIS_APPENDFSYNC").unwrap_or_else(|_| "always".into()),
            ],
            &[],
        );
        redis.start();
        let stack = Self {
            tansu_port: kport,
            brokers: format!("127.0.0.1:{advertised}"),
            redis_url: format!("redis://127.0.0.1:{rport}/"),
            tansu: Some(tansu),
            redis: Some(redis),
        };
        if advertised == kport {
            stack.wait_ready();
            stack.index_tansu_headers();
        }
        stack
    }

    /// Tansu 0.6's sqlite schema has no index on record headers, so every
    /// fetched record scans all headers of all topics: consuming N records
    /// costs O(N²) and a 20,000-event run stalls. Hooklog's records carry
    /// headers, so the harness adds the missing index once the broker has
    /// created its schema (docs/processor.md, "Tansu").
    fn index_tansu_headers(&self) {
        let Some(tansu) = &self.tansu else { return };
        let db = tansu.dir().join("tansu.db");
        if !db.exists() {
            return; // memory storage
        }
        // The SQL goes in on stdin, as in stack.sh (its leading `--`
        // comments would read as options on the command line).
        let mut child = Command::new("sqlite3")
            .args(["-cmd", ".timeout 10000"])
            .arg(&db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sqlite3 is missing: run deploy/local/install.sh");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(TANSU_HEADER_INDEX.as_bytes())
            .expect("write to sqlite3");
        let out = child.wait_with_output().expect("sqlite3");
        assert!(
            out.status.success(),
            "indexing Tansu headers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until Redis answers PING and the broker answers metadata.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let redis_ok = redis::Client::open(self.redis_url.as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if redis_ok && kafka::reachable(&self.brokers) {
                return;
            }
            assert!(Instant::now() < deadline, "stack did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A synchronous Redis connection.
    pub fn redis(&self) -> redis::Connection {
        redis::Client::open(self.redis_url.as_str())
            .expect("url")
            .get_connection()
            .expect("redis")
    }
}

/// A Redis of one test's own, without persistence, started on a free port
/// with `extra` arguments (e.g. Redis's defaults where the shared one
/// differs), once it answers; returns it (stopped when dropped) and its
/// URL.
pub fn private_redis(name: &str, extra: &[&str]) -> (Service, String) {
    let port = free_port().to_string();
    let mut args = vec!["--port", &port];
    args.extend_from_slice(extra);
    let redis = start_redis(name, &args);
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).expect("url");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err()
    {
        assert!(Instant::now() < deadline, "{name} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (redis, url)
}

/// A replica of the Redis at `primary_url` ([`private_redis`]), once in
/// sync with it.
pub fn private_replica(name: &str, primary_url: &str) -> Service {
    let port = primary_url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let (replica, _) = private_redis(name, &["--replicaof", "127.0.0.1", &port]);
    let mut conn = redis::Client::open(primary_url)
        .and_then(|c| c.get_connection())
        .expect("primary");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut conn)
            .expect("INFO");
        if info
            .lines()
            .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
        {
            return replica;
        }
        assert!(Instant::now() < deadline, "{name} never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A certificate for 127.0.0.1, its key, and the CA that signed it (PEM
/// files made with `openssl`, valid for a day): servers use the first two,
/// clients trust the CA. Returns (CA, certificate, key).
pub fn test_certificate() -> (PathBuf, PathBuf, PathBuf) {
    let dir = run_dir().join(unique("tls-"));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let file = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is missing: run deploy/local/install.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key) = (file("ca.pem"), file("ca-key.pem"));
    let (cert, key, csr) = (file("cert.pem"), file("key.pem"), file("cert.csr"));
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-days", "1", "-subj", "/CN=hooklog test CA"],
            &["-keyout", &ca_key, "-out", &ca],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr],
        ]
        .concat(),
    );
    let ext = file("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (ca.into(), cert.into(), key.into())
}

/// A Redis of one test's own that speaks only TLS (with
/// [`test_certificate`]); returns it, its `rediss://` URL and the CA to
/// trust.
pub fn private_tls_redis(name: &str) -> (Service, String, PathBuf) {
    let (ca, cert, key) = test_certificate();
    let port = free_port().to_string();
    let [ca_s, cert_s, key_s] = [&ca, &cert, &key].map(|p| p.display().to_string());
    let redis = start_redis(
        name,
        &[
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            &cert_s,
            "--tls-key-file",
            &key_s,
            "--tls-ca-cert-file",
            &ca_s,
            "--tls-auth-clients",
            "no",
        ],
    );
    (redis, format!("rediss://127.0.0.1:{port}/"), ca)
}

/// Starts a loopback redis-server without persistence, with `args`.
fn start_redis(name: &str, args: &[&str]) -> Service {
    let mut all = vec!["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    all.extend_from_slice(args);
    let mut redis = Service::new(name, "redis-server", &all, &[]);
    redis.start();
    redis
}

/// The index Tansu 0.6's sqlite schema lacks (shared with `stack.sh`).
const TANSU_HEADER_INDEX: &str = include_str!("../../deploy/local/tansu-header-index.sql");

/// One stack per test binary, or the one named by `HOOKLOG_TEST_BROKERS`
/// and `HOOKLOG_TEST_REDIS`.
pub fn shared_stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        match (
            std::env::var("HOOKLOG_TEST_BROKERS"),
            std::env::var("HOOKLOG_TEST_REDIS"),
        ) {
            (Ok(brokers), Ok(redis_url)) => {
                let s = Stack {
                    brokers,
                    redis_url,
                    tansu: None,
                    redis: None,
                    tansu_port: 0,
                };
                s.wait_ready();
                s
            }
            _ => Stack::start(),
        }
    })
}

/// Secrets of the generated config, one per source (test values).
pub const SECRETS: &[(&str, &str, &str)] = &[
    ("fulfillment", "hmac-sha256", "e2e-fulfillment-secret-7f3a"),
    ("accounts", "hmac-sha256", "e2e-accounts-secret-91bc"),
    ("stripe", "stripe", "whsec_e2eStripeSecret5d2e"),
    ("github", "github", "e2e-github-secret-44aa"),
    ("slack", "slack", "e2e-slack-secret-0c1d"),
    ("shopify", "shopify", "e2e-shopify-secret-8e8e"),
    (
        "resend",
        "standard-webhooks",
        "whsec_ZTJlLXJlc2VuZC1zZWNyZXQta2V5",
    ),
];

/// The subscription API key of the generated config (test value).
pub const API_KEY: &str = "e2e-delivery-api-key-3b9f";
/// The bearer key of the processor's admin endpoints in every test config.
pub const ADMIN_KEY: &str = "e2e-admin-key-71c4";

/// The secret of a source.
pub fn secret(source: &str) -> &'static str {
    SECRETS
        .iter()
        .find(|(s, _, _)| *s == source)
        .map(|(_, _, k)| *k)
        .expect("source")
}

/// One test's namespace and config.
pub struct TestEnv {
    /// Unique id.
    pub id: String,
    /// Broker and Redis.
    pub brokers: String,
    /// Redis URL.
    pub redis_url: String,
    /// Redis key prefix.
    pub prefix: String,
    /// Config file path.
    pub config_path: PathBuf,
    /// Ingest listen port.
    pub ingest_port: u16,
    /// Processor listen port.
    pub processor_port: u16,
    /// Deliverer (`hooklog-processor deliver`) listen port.
    pub delivery_port: u16,
    /// Extra TOML appended to the config (tests that tune settings).
    extra: String,
    /// `HOOKLOG_LOG` of the spawned binaries.
    log: String,
}

/// Tests log at debug: a failure's log then shows what happened.
const TEST_LOG_LEVEL: &str = "debug,rdkafka=info,librdkafka=warn,h2=info,hyper=info,tower=info";

impl TestEnv {
    /// A namespace on the shared stack.
    pub fn new(name: &str) -> Self {
        let s = shared_stack();
        Self::on(name, &s.brokers, &s.redis_url, "")
    }

    /// A namespace on a given stack with extra `[server]`/`[processor]` keys.
    pub fn on(name: &str, brokers: &str, redis_url: &str, extra: &str) -> Self {
        let id = unique(&format!("{name}-"));
        let env = Self {
            prefix: format!("e2e:{id}:"),
            config_path: run_dir().join(format!("{id}.toml")),
            brokers: brokers.into(),
            redis_url: redis_url.into(),
            ingest_port: free_port(),
            processor_port: free_port(),
            delivery_port: free_port(),
            extra: extra.into(),
            log: TEST_LOG_LEVEL.into(),
            id,
        };
        env.write_config(&env.projections_toml(false));
        env
    }

    /// Sets `HOOKLOG_LOG` for the binaries started from here on (benchmarks
    /// run at the production default, `info`).
    pub fn with_log(mut self, level: &str) -> Self {
        self.log = level.into();
        self
    }

    /// The raw topic of a source in this namespace.
    pub fn topic(&self, source: &str) -> String {
        format!("e2e.{}.{source}", self.id)
    }

    /// The seed projections; `extra_field` adds `carrier_upper_hint` to
    /// orders (a definition change for the rebuild test).
    pub fn projections_toml(&self, extra_field: bool) -> String {
        let extra = if extra_field {
            ", tracking = \"/tracking_number\""
        } else {
            ""
        };
        format!(
            r#"
[[projection]]
name = "orders"
status_field = "status"
status_precedence = ["created", "paid", "shipped", "delivered"]
  [[projection.rule]]
  source = "fulfillment"
  event_type = "order.shipped"
  key = "/order_id"
  time = "/shipped_at"
  status = "shipped"
  set = {{ order_id = "/order_id", shipping_carrier = "/shipping_carrier", tracking_number = "/tracking_number", shipped_at = "/shipped_at"{extra} }}
  [[projection.rule]]
  source = "fulfillment"
  event_type = "order.delivered"
  key = "/order_id"
  time = "/delivered_at"
  status = "delivered"
  set = {{ delivered_at = "/delivered_at" }}

[[projection]]
name = "charges"
  [[projection.rule]]
  source = "stripe"
  event_type = "charge.succeeded"
  key = "/data/object/id"
  time = "/created"
  set = {{ amount = "/data/object/amount", currency = "/data/object/currency", status = "/data/object/status", payment_intent = "/data/object/payment_intent", customer = "/data/object/customer" }}

[[projection]]
name = "customers"
  [[projection.rule]]
  source = "accounts"
  event_type = "customer.signed_up"
  key = "/customer_id"
  time = "/signed_up_at"
  set = {{ customer_id = "/customer_id", email = "/email", plan = "/plan" }}
  [[projection.rule]]
  source = "stripe"
  event_type = "charge.succeeded"
  key = "/data/object/customer"
  time = "/created"
  sum = {{ total_charged = "/data/object/amount" }}
  count = ["charges"]
"#
        )
    }

    /// (Re)writes the config with the given projections.
    pub fn write_config(&self, projections: &str) {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\npublish_timeout_ms = 3000\nretry_after_secs = 2\n\n\
             [kafka]\nbrokers = \"{}\"\n\n\
             [processor]\nlisten = \"127.0.0.1:{}\"\ngroup_id = \"e2e-{}\"\npartitions = 3\nbatch_wait_ms = 10\n\
             admin_keys = [\"env:E2E_ADMIN_KEY\"]\n\n\
             [redis]\nurl = \"{}\"\nkey_prefix = \"{}\"\n\n\
             [delivery]\nlisten = \"127.0.0.1:{}\"\ngroup_id = \"e2e-dlv-{}\"\napi_keys = [\"env:E2E_API_KEY\"]\n\
             allow_http = true\nallow_private_networks = true\nretry_schedule_secs = [1, 1]\ntimeout_ms = 2000\n\n",
            self.ingest_port, self.brokers, self.processor_port, self.id, self.redis_url, self.prefix,
            self.delivery_port, self.id
        );
        text = merge_extra(text, &self.extra);
        for (source, scheme, _) in SECRETS {
            text.push_str(&format!(
                "[[source]]\nname = \"{source}\"\nscheme = \"{scheme}\"\nsecrets = [\"env:E2E_SECRET_{}\"]\ntopic = \"{}\"\n\n",
                source.to_uppercase(),
                self.topic(source)
            ));
        }
        text.push_str(projections);
        std::fs::write(&self.config_path, text).expect("write config");
    }

    fn envs(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = SECRETS
            .iter()
            .map(|(s, _, k)| (format!("E2E_SECRET_{}", s.to_uppercase()), k.to_string()))
            .collect();
        v.push(("E2E_API_KEY".into(), API_KEY.into()));
        v.push(("E2E_ADMIN_KEY".into(), ADMIN_KEY.into()));
        v.push((
            "HOOKLOG_CONFIG".into(),
            self.config_path.display().to_string(),
        ));
        v.push(("HOOKLOG_LOG".into(), self.log.clone()));
        v
    }

    /// Runs `hooklog-processor <args>` to completion; returns (success, stdout+stderr).
    pub fn processor_cmd(&self, args: &[&str]) -> (bool, String) {
        self.processor_cmd_env(args, &[])
    }

    /// [`TestEnv::processor_cmd`] with extra environment variables.
    pub fn processor_cmd_env(&self, args: &[&str], extra: &[(&str, String)]) -> (bool, String) {
        let mut cmd = Command::new(bin("hooklog-processor"));
        for (k, _) in std::env::vars() {
            if k.starts_with("HOOKLOG_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args(args)
            .envs(self.envs())
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run processor");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Creates every topic of the config.
    pub fn create_topics(&self) {
        let (ok, out) = self.processor_cmd(&["create-topics"]);
        assert!(ok, "create-topics failed: {out}");
    }

    /// Defines `hooklog-processor <args>` as a service (not started), for
    /// commands a test must be able to kill or time out.
    pub fn processor_command(&self, name: &str, args: &[&str]) -> Service {
        self.service(name, "hooklog-processor", args)
    }

    fn service(&self, name: &str, binary: &str, args: &[&str]) -> Service {
        let envs = self.envs();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Service::new(name, bin(binary), args, &envs)
    }

    /// Defines the ingest service (not started).
    pub fn ingest_service(&self) -> Service {
        self.service("ingest", "hooklog-ingest", &[])
    }

    /// Starts ingest and waits for `/readyz`.
    pub fn ingest(&self) -> Service {
        let mut s = self.ingest_service();
        s.start();
        wait_http_ok(
            &format!("{}/readyz", self.ingest_url()),
            Duration::from_secs(30),
        );
        s
    }

    /// Defines the processor service (not started).
    pub fn processor_service(&self) -> Service {
        self.service("processor", "hooklog-processor", &[])
    }

    /// Starts the processor and waits for `/readyz`.
    pub fn processor(&self) -> Service {
        let mut s = self.processor_service();
        s.start();
        wait_http_ok(
            &format!("{}/readyz", self.processor_url()),
            Duration::from_secs(30),
        );
        s
    }

    /// Defines the deliverer service (`hooklog-processor deliver`, not started).
    pub fn deliverer_service(&self) -> Service {
        self.service("deliverer", "hooklog-processor", &["deliver"])
    }

    /// Starts the deliverer and waits for `/readyz`.
    pub fn deliverer(&self) -> Service {
        let mut s = self.deliverer_service();
        s.start();
        wait_http_ok(
            &format!("{}/readyz", self.delivery_url()),
            Duration::from_secs(30),
        );
        s
    }

    /// Deliverer base URL.
    pub fn delivery_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.delivery_port)
    }

    /// Starts one more ingest replica on `port` (same config otherwise).
    pub fn ingest_on(&self, port: u16) -> Service {
        let mut s = self.service("ingest", "hooklog-ingest", &[]);
        s.env("HOOKLOG_SERVER__LISTEN", &format!("127.0.0.1:{port}"));
        s.start();
        wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(30),
        );
        s
    }

    /// Starts one more processor replica (same group) on `port`.
    pub fn processor_on(&self, port: u16) -> Service {
        let mut s = self.processor_service();
        s.env("HOOKLOG_PROCESSOR__LISTEN", &format!("127.0.0.1:{port}"));
        s.start();
        wait_http_ok(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(30),
        );
        s
    }

    /// Ingest base URL.
    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingest_port)
    }

    /// Processor base URL.
    pub fn processor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.processor_port)
    }

    /// A synchronous Redis connection.
    pub fn redis(&self) -> redis::Connection {
        redis::Client::open(self.redis_url.as_str())
            .expect("url")
            .get_connection()
            .expect("redis")
    }
}

/// Puts `extra` lines under their `[table]` headers in `text`.
fn merge_extra(mut text: String, extra: &str) -> String {
    let mut table = String::new();
    for line in extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('[') {
            table = line.to_owned();
        } else {
            // A key given again replaces the template's value.
            let key = format!("{} =", line.split('=').next().unwrap_or_default().trim());
            text = text
                .lines()
                .filter(|l| !l.starts_with(&key))
                .map(|l| format!("{l}\n"))
                .collect();
            match text.find(&format!("{table}\n")) {
                Some(at) => text.insert_str(at + table.len() + 1, &format!("{line}\n")),
                // A table the template lacks, e.g. [kafka.properties].
                None => text.push_str(&format!("\n{table}\n{line}\n")),
            }
        }
    }
    text
}

/// Polls `url` until it answers 2xx.
pub fn wait_http_ok(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(out) = Command::new("curl")
            .args(["-fs", "-o", "/dev/null", "--max-time", "2", url])
            .status()
        {
            if out.success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a killed consumer's group session (10 s) has expired, before
/// its replacement joins: Tansu 0.6.0 can stall a join for minutes while a
/// dead member is still registered (Apache Kafka does not). The dead
/// member's partitions wait meanwhile: lag, no loss.
pub async fn let_killed_member_expire() {
    tokio::time::sleep(Duration::from_secs(12)).await;
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads with `read` eight times, 300 ms apart, and fails unless each
/// read succeeds within a second: the reads of a process whose writers wait
/// for a replica (`WAIT`, seconds at a time) must not queue behind them.
pub async fn reads_answer_at_once<F, Fut>(what: &str, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for i in 0..8 {
        let started = Instant::now();
        assert!(read().await, "{what}: read {i} failed");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{what}: read {i} took {took:?}, behind a writer's WAIT?"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// GET a JSON document; None on non-2xx.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Sum of a counter over the series whose line contains every `labels` part.
pub async fn metric(base_url: &str, name: &str, labels: &[&str]) -> f64 {
    let Ok(resp) = reqwest::get(format!("{base_url}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for &p in &ports {
            assert!(LISTEN_PORTS.contains(&u32::from(p)), "{p}");
        }
        // Free: a service can bind it.
        let port = free_port();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "{port}");
    }
}
