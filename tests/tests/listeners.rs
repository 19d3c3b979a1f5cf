//! Idle connections cannot take a node offline. A real agent, its file
//! limit cut to the 1024 systemd gives a service by default, gets 1,100
//! connections that send nothing, on its HTTP-01 port and on its gRPC
//! port: the coordinator still reaches it, the CA still validates, and
//! the agent closes the idle connections within its configured timeouts.
//! Nor can idle connections keep it from stopping. On the coordinator's
//! enrollment listener, where anyone can finish a TLS handshake, a
//! connection that then idles is closed too.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use certfleet_agent::SHUTDOWN_GRACE;
use certfleet_coordinator::enrollment::MAX_CONNECTION_LIFE;
use certfleet_proto::tls::HANDSHAKE_TIMEOUT;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, Http01, Node};
use certfleet_tests::process::eventually;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// More idle connections than the agent has file descriptors.
const IDLE_CONNECTIONS: usize = 1100;
/// systemd's default `LimitNOFILE` for a service.
const AGENT_FILE_LIMIT: u32 = 1024;
/// `http01.header_timeout_secs` and `idle_timeout_secs` of the agents here.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Slack for a loaded machine on top of a timeout the agent should meet.
const MARGIN: Duration = Duration::from_secs(3);
/// Longest `certfleet status` may take to reach one node.
const STATUS_BOUND: Duration = Duration::from_secs(15);

/// A one-node standalone cluster whose agent runs with `http01` keys added
/// to its config and its file limit at [`AGENT_FILE_LIMIT`].
async fn cluster(http01: &str) -> Cluster {
    raise_own_file_limit();
    let mut cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        http01: Http01::Standalone,
        ..Default::default()
    })
    .await
    .unwrap();
    let node = &mut cluster.nodes[0];
    let config = std::fs::read_to_string(&node.config_path).unwrap();
    let config = config.replacen("[http01]\n", &format!("[http01]\n{http01}"), 1);
    std::fs::write(&node.config_path, config).unwrap();
    node.start_agent().await.unwrap();
    let pid = node.agent.as_ref().and_then(|a| a.pid()).unwrap();
    let limit = format!("--nofile={AGENT_FILE_LIMIT}:{AGENT_FILE_LIMIT}");
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit {limit} on the agent failed");
    cluster
}

/// This process holds thousands of sockets at once; a shell's limit may be
/// 1024.
fn raise_own_file_limit() {
    const NEEDED: u64 = 16384;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft = line
        .split_whitespace()
        .nth(3)
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if soft < NEEDED {
        let status = Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string()])
            .arg(format!("--nofile={NEEDED}:{NEEDED}"))
            .status()
            .unwrap();
        assert!(status.success(), "raising this test's file limit failed");
    }
}

fn http01_addr(cluster: &Cluster) -> SocketAddr {
    SocketAddr::new(cluster.nodes[0].ip, cluster.pebble.http_port)
}

/// Connections that send nothing, each watched for the server closing it.
struct IdleConnections {
    /// Per connection: how long after it opened the server closed it.
    watchers: Vec<JoinHandle<Duration>>,
}

impl IdleConnections {
    async fn open(addr: SocketAddr, count: usize) -> Self {
        let mut watchers = Vec::with_capacity(count);
        for i in 0..count {
            let mut tcp = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"));
            let opened = Instant::now();
            watchers.push(tokio::spawn(async move {
                let mut buf = [0u8; 64];
                // End of file or a reset: either way the server closed it.
                while let Ok(n) = tcp.read(&mut buf).await
                    && n > 0
                {}
                opened.elapsed()
            }));
        }
        Self { watchers }
    }

    /// Asserts the server closed every connection within `bound` (and
    /// [`MARGIN`]) of its opening.
    async fn assert_closed_within(self, bound: Duration, what: &str) {
        let total = self.watchers.len();
        let deadline = Instant::now() + bound + MARGIN;
        let mut open = 0;
        let mut slowest = Duration::ZERO;
        for watcher in self.watchers {
            match tokio::time::timeout_at(deadline, watcher).await {
                Ok(closed_after) => slowest = slowest.max(closed_after.unwrap()),
                Err(_) => open += 1,
            }
        }
        assert_eq!(
            open, 0,
            "{open} of {total} idle {what} connections still open"
        );
        assert!(
            slowest <= bound + MARGIN,
            "an idle {what} connection stayed open {slowest:?}, past {bound:?} + {MARGIN:?}"
        );
    }
}

/// Connections to the listener at `addr` the kernel holds that the process
/// has not accepted yet (`ss`'s Recv-Q of a listening socket).
fn not_yet_accepted(addr: SocketAddr) -> usize {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("src {addr}")])
        .output()
        .expect("running ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum()
}

/// Waits until the agent has accepted every connection made to `addr`:
/// one still in the kernel's queue at SIGTERM is never the agent's to wait
/// for.
async fn accepted(addr: SocketAddr) {
    eventually(
        "the agent to accept every connection",
        Duration::from_secs(10),
        || async move { (not_yet_accepted(addr) == 0).then_some(()) },
    )
    .await
    .unwrap();
}

/// `certfleet --json status`, which must reach the node within
/// [`STATUS_BOUND`]; returns the node's entry.
async fn status_of_node(cluster: &Cluster) -> Value {
    let started = Instant::now();
    let out = tokio::time::timeout(STATUS_BOUND, cluster.ctl(&["--json", "status", CERT]))
        .await
        .expect("certfleet status hung")
        .unwrap();
    let status: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status output {:?}: {e}: {}", out.stdout, out.stderr));
    let node = status["nodes"][0].clone();
    assert_eq!(node["node"], cluster.nodes[0].name.as_str(), "{status}");
    assert!(
        node["error"].is_null(),
        "status did not reach the node: {node}\n{}",
        cluster.logs()
    );
    assert!(started.elapsed() <= STATUS_BOUND);
    node
}

fn timeouts() -> String {
    let secs = HEADER_TIMEOUT.as_secs();
    format!("header_timeout_secs = {secs}\nidle_timeout_secs = {secs}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_http01_connections_neither_cut_the_node_off_nor_stay_open() {
    let cluster = cluster(&timeouts()).await;
    let idle = IdleConnections::open(http01_addr(&cluster), IDLE_CONNECTIONS).await;

    status_of_node(&cluster).await;
    // The CA's validation requests displace idle connections.
    let out = cluster.issue().await.unwrap();
    assert_eq!(
        out.code,
        0,
        "issue failed: {}\n{}",
        out.stderr,
        cluster.logs()
    );

    idle.assert_closed_within(HEADER_TIMEOUT, "HTTP-01").await;
    let log = cluster.nodes[0].agent.as_ref().unwrap().log_text();
    assert!(
        !log.contains("Too many open files"),
        "the agent ran out of file descriptors:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_to_the_grpc_port_do_not_keep_the_coordinator_out() {
    let cluster = cluster(&timeouts()).await;
    // The coordinator has not connected to this agent yet: its first
    // connection has to get past the idle ones.
    let idle = IdleConnections::open(cluster.nodes[0].grpc, IDLE_CONNECTIONS).await;

    status_of_node(&cluster).await;

    idle.assert_closed_within(HANDSHAKE_TIMEOUT, "gRPC").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_do_not_hold_up_shutdown() {
    // Long timeouts, so only shutdown can close the connections.
    let mut cluster = cluster("header_timeout_secs = 600\nidle_timeout_secs = 600\n").await;
    // The coordinator's own (authenticated, idle) connection, too.
    status_of_node(&cluster).await;
    let http01 = IdleConnections::open(http01_addr(&cluster), 100).await;
    let grpc = IdleConnections::open(cluster.nodes[0].grpc, 100).await;
    // Half a request: graceful shutdown waits for the rest of it.
    let mut stuck = TcpStream::connect(http01_addr(&cluster)).await.unwrap();
    stuck
        .write_all(b"GET /.well-known/acme-challenge/")
        .await
        .unwrap();

    accepted(http01_addr(&cluster)).await;
    accepted(cluster.nodes[0].grpc).await;
    let node: &mut Node = &mut cluster.nodes[0];
    let agent = node.agent.as_mut().unwrap();
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    let started = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exited = eventually(
        "the agent to exit after SIGTERM",
        SHUTDOWN_GRACE + MARGIN,
        || {
            let exited = agent.check_running().err().map(|e| e.to_string());
            async move { exited }
        },
    )
    .await
    .unwrap();
    assert!(started.elapsed() <= SHUTDOWN_GRACE + MARGIN);
    assert!(exited.contains("exit status: 0"), "{exited}");
    assert!(
        exited.contains("shutdown grace period"),
        "no warning that the grace ran out: {exited}"
    );

    http01
        .assert_closed_within(SHUTDOWN_GRACE + MARGIN, "HTTP-01")
        .await;
    grpc.assert_closed_within(SHUTDOWN_GRACE + MARGIN, "gRPC")
        .await;
}

/// Connections to the enrollment listener that finish the TLS handshake
/// (trusting the cluster CA, as a joining node does) and then send nothing
/// (`preface: false`) or only HTTP/2's connection preface; each watched for
/// the coordinator closing it.
async fn idle_enrollment_connections(
    cluster: &Cluster,
    count: usize,
    preface: bool,
) -> Vec<JoinHandle<Duration>> {
    let (connector, name) = cluster.coordinator_tls(&[b"h2"]);
    let mut watchers = Vec::with_capacity(count);
    for i in 0..count {
        let tcp = TcpStream::connect(cluster.enrollment).await.unwrap();
        let opened = Instant::now();
        let mut stream = connector
            .connect(name.clone(), tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS to the enrollment listener, connection {i}: {e}"));
        if preface {
            // The client preface and an empty SETTINGS frame.
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .unwrap();
            stream.flush().await.unwrap();
        }
        watchers.push(tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf).await
                && n > 0
            {}
            opened.elapsed()
        }));
    }
    watchers
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_to_the_enrollment_listener_are_closed() {
    let mut cluster = cluster(&timeouts()).await;
    let mut watchers = idle_enrollment_connections(&cluster, 50, false).await;
    watchers.extend(idle_enrollment_connections(&cluster, 50, true).await);
    IdleConnections { watchers }
        .assert_closed_within(MAX_CONNECTION_LIFE, "enrollment")
        .await;
    // The listener still serves: one more node joins through it.
    cluster.grow().await.unwrap();
}
