//! Certificates renew themselves: the coordinator daemon, left alone,
//! renews a certificate when its configured share of lifetime is left and
//! rolls the new version out to every node's nginx; with a node down, the
//! renewal fails, is retried on the backoff schedule, and succeeds once the
//! node is back.

use std::time::Duration;

use certfleet_coordinator::renewal::RETRY_DELAYS;
use certfleet_proto::bundle::Bundle;
use certfleet_tests::cluster::{CERT, Cluster, ClusterSpec, NGINX_TARGETS, shared_name};
use certfleet_tests::process::eventually;
use certfleet_tests::verify::served_leaf_sha256;

/// Pebble's certificates last five years; renewing when all but 1e-7 of
/// that is left makes one due about 16 s after it is issued.
const RENEW_SOON: &str = r#"after_issue = "rollout"

[renewal]
share_left = 0.9999999
max_jitter_secs = 0
"#;

fn live_sha(cluster: &Cluster) -> String {
    let chain = std::fs::read_to_string(cluster.live_dir().join("fullchain.pem")).unwrap();
    Bundle::parse(&chain, None, &[]).unwrap().leaf_sha256_hex()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_due_certificate_renews_by_itself_and_is_rolled_out() {
    let (cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: RENEW_SOON.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    // The listing says when the next renewal is.
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let listed = out.last_json();
    assert!(
        listed[0]["next_renewal_unix"].as_i64().unwrap_or(0) > 0,
        "{listed}"
    );
    // Nobody types anything: a new version appears and every node's nginx
    // serves it, as `certfleet status` proves by its own handshakes.
    let v2 = eventually(
        "a renewed version served by every node",
        Duration::from_secs(90),
        || async {
            let out = cluster.ctl(&["--json", "status", CERT]).await.ok()?;
            let v = out.last_json();
            let live = v["live_sha256"].as_str()?.to_owned();
            (live != v1 && v["all_serving_live"] == true).then_some(live)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.coordinator_log()));
    assert_ne!(v1, v2);
    let out = cluster.ctl(&["--json", "certificates"]).await.unwrap();
    let listed = out.last_json();
    assert!(listed[0]["version"].as_u64().unwrap() >= 2, "{listed}");
    let log = cluster.coordinator_log();
    assert!(log.contains("renewal due: renewing"), "{log}");
}

/// The node whose agent is down when the renewal comes due.
const DOWN: usize = 1;
/// How long after issue a certificate comes due with [`RENEW_IN_45S`]:
/// long enough for the cluster to install and serve version 1 and stop
/// one agent first.
const DUE_AFTER_ISSUE: i64 = 45;
/// Pebble's five-year certificates (157,766,400 s) with 2.852e-7 of that
/// left: due [`DUE_AFTER_ISSUE`] seconds after issue, no jitter.
const RENEW_IN_45S: &str = r#"after_issue = "rollout"

[renewal]
share_left = 0.9999997148
max_jitter_secs = 0
"#;
/// The scheduler's first retry delay, in seconds.
const FIRST_RETRY: i64 = RETRY_DELAYS[0].as_secs() as i64;
/// How far a time the listing shows may be from the one we expect: the
/// listing has whole seconds, and the attempt, its failure and our polling
/// each take a moment.
const SLACK: i64 = 5;

fn unix_now() -> i64 {
    certfleet_proto::clock::now()
}

/// Unix seconds of a listing's `2026-11-23T10:00:00Z` (the CLI's JSON has
/// the last renewal only as a date).
fn unix_of(rfc3339: &str) -> Option<i64> {
    let digits = |range: std::ops::Range<usize>| rfc3339.get(range)?.parse::<i64>().ok();
    if rfc3339.len() != 20 || !rfc3339.ends_with('Z') {
        return None;
    }
    let month = u8::try_from(digits(5..7)?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(digits(0..4)?).ok()?,
        time::Month::try_from(month).ok()?,
        u8::try_from(digits(8..10)?).ok()?,
    )
    .ok()?;
    let midnight = date.midnight().assume_utc().unix_timestamp();
    Some(midnight + digits(11..13)? * 3600 + digits(14..16)? * 60 + digits(17..19)?)
}

/// When the listing says the last renewal started.
fn last_renewal(c: &serde_json::Value) -> i64 {
    c["last_renewal"]
        .as_str()
        .and_then(unix_of)
        .unwrap_or_else(|| panic!("no last renewal date in {c}"))
}

/// `certfleet --json certificates`' entry for [`CERT`].
async fn listing(cluster: &Cluster) -> Option<serde_json::Value> {
    let out = cluster.ctl(&["--json", "certificates"]).await.ok()?;
    let listed = out.last_json();
    listed
        .as_array()?
        .iter()
        .find(|c| c["name"] == CERT)
        .cloned()
}

/// Polls `check` every quarter second (each poll runs the CLI) for at most
/// `timeout`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually(what, timeout, || {
        let next = check();
        async move {
            let found = next.await;
            if found.is_none() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            found
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_node_down_the_renewal_fails_retries_after_a_minute_and_succeeds_once_it_is_back() {
    let (mut cluster, _nginx) = Cluster::serving_version_1(ClusterSpec {
        nodes: 2,
        agent_certificates: NGINX_TARGETS.to_owned(),
        coordinator_extra: RENEW_IN_45S.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let v1 = live_sha(&cluster);
    let down = cluster.nodes[DOWN].name.clone();
    let first = listing(&cluster).await.expect("the certificate is listed");
    let due = first["next_renewal_unix"].as_i64().unwrap_or(0);
    assert!(due > 0, "no next renewal listed: {first}");
    // The node goes down before the renewal comes due, so the attempt that
    // follows is the one that meets it down.
    assert!(
        unix_now() + 2 < due,
        "setting up took too long: the renewal is due at {due}, {DUE_AFTER_ISSUE} s after \
         issue, and it is {} now; raise DUE_AFTER_ISSUE",
        unix_now()
    );
    cluster.nodes[DOWN].stop_agent();

    // The renewal comes due and fails, naming the node that is down.
    let failed = poll(
        "the renewal to fail with a node down",
        Duration::from_secs(DUE_AFTER_ISSUE as u64 + 60),
        || async {
            let c = listing(&cluster).await?;
            let failed = c["last_renewal_outcome"].as_str()?.starts_with("failed:")
                && c["next_renewal_unix"].as_i64()? > 0;
            failed.then_some(c)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let seen = unix_now();
    let outcome = failed["last_renewal_outcome"].as_str().unwrap_or_default();
    eprintln!("with {down} down: {outcome}");
    assert!(
        outcome.contains(&down),
        "the outcome names {down}: {failed}"
    );
    let attempted = last_renewal(&failed);
    let retry = failed["next_renewal_unix"].as_i64().unwrap();
    assert!(
        attempted >= due,
        "attempted at {attempted}, before it was due at {due}"
    );
    // The next attempt is the first retry delay after the failure: never
    // sooner, and not much later than the attempt took.
    assert!(
        retry - attempted >= FIRST_RETRY && retry - attempted <= FIRST_RETRY + SLACK,
        "attempted at {attempted}, next at {retry}: not {FIRST_RETRY} s after the failure: {failed}"
    );
    assert!(
        (retry - (seen + FIRST_RETRY)).abs() <= SLACK,
        "the failure was listed at {seen}, the retry is at {retry}: {failed}"
    );
    // Nothing new was stored.
    assert_eq!(failed["version"], 1, "{failed}");
    assert_eq!(live_sha(&cluster), v1);

    // The node comes back before the retry; nobody types anything.
    cluster.nodes[DOWN].start_agent().await.unwrap();
    assert!(
        unix_now() < retry,
        "the agent came back after the retry was due"
    );
    let renewed = poll(
        "the retry to renew",
        Duration::from_secs((FIRST_RETRY + 60) as u64),
        || async {
            let c = listing(&cluster).await?;
            (c["last_renewal_outcome"] == "renewed").then_some(c)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let retried = last_renewal(&renewed);
    assert!(
        retried >= retry && retried <= retry + SLACK,
        "retried at {retried}, scheduled for {retry}: {renewed}"
    );
    // Exactly one new version: the failed attempt stored nothing.
    assert_eq!(renewed["version"], 2, "{renewed}");
    let v2 = live_sha(&cluster);
    assert_ne!(v1, v2);
    // Rolled out: every node's nginx serves version 2's leaf, by the test's
    // own TLS handshake.
    for node in &cluster.nodes {
        let addr = std::net::SocketAddr::new(node.ip, cluster.tls_port);
        let served = served_leaf_sha256(addr, &shared_name()).await.unwrap();
        assert_eq!(served, v2, "{} serves another leaf", node.name);
    }
}

#[test]
fn the_listings_dates_read_back_as_unix_seconds() {
    let t = 1_795_000_123;
    assert_eq!(unix_of(&certfleet_proto::clock::rfc3339(t)), Some(t));
    assert_eq!(unix_of("not a date"), None);
}
