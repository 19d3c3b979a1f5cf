//! One ACME order for one certificate, end to end (docs/ARCHITECTURE.md,
//! "Issue").
//!
//! The order of steps is the point: nothing is asked of the CA until every
//! node serves every token and the coordinator has fetched each one itself.
//! Tokens come off every node whatever happens after they were placed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use certfleet_proto::bundle::{Bundle, InvalidBundle};
use certfleet_proto::challenge::{Http01Response, InvalidChallenge, Token};
use instant_acme::{
    AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, Problem, RetryPolicy,
};
use tracing::{Instrument, info, info_span, warn};

use crate::acme::{AcmeAccount, AcmeSetupError};
use crate::challenge::{self, FanOut, FleetNode, NodeError, PendingChallenge, SelfCheckClient};
use crate::config::{CertificateSpec, Config, KeyType};
use crate::fleet::{Fleet, FleetError, OperationGuard};
use crate::progress::{Progress, Stage};
use crate::store::{Store, StoreError, Stored};

/// First wait before polling the CA for an order's state; instant-acme
/// grows it by [`POLL_BACKOFF`] and honours Retry-After when the CA sends it.
pub const POLL_INITIAL_DELAY: Duration = Duration::from_millis(100);
pub const POLL_BACKOFF: f32 = 1.5;

/// How many more times a request the CA refused with `badNonce` is sent.
/// instant-acme already retries each POST a few times; a CA that rejects
/// many nonces (Pebble's `PEBBLE_WFE_NONCEREJECT`, or a busy real CA) can
/// still exhaust that, and every step here is safe to repeat (RFC 8555 §6.5).
pub const BAD_NONCE_RETRIES: u32 = 8;

pub(crate) fn is_bad_nonce(err: &instant_acme::Error) -> bool {
    matches!(err, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some("urn:ietf:params:acme:error:badNonce"))
}

/// Evaluates `$call` (an `.await`ed ACME request) again while the CA
/// answers `badNonce`, up to [`BAD_NONCE_RETRIES`] times.
macro_rules! nonce_retry {
    ($call:expr) => {{
        let mut retries = 0;
        loop {
            match $call {
                Err(e)
                    if $crate::issue::is_bad_nonce(&e)
                        && retries < $crate::issue::BAD_NONCE_RETRIES =>
                {
                    retries += 1
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use nonce_retry;

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Setup(#[from] AcmeSetupError),
    #[error("{}", join_lines(.errors))]
    Nodes {
        stage: Stage,
        errors: Vec<NodeError>,
    },
    #[error("ACME {context}: {}", describe(.source))]
    Acme {
        context: String,
        source: instant_acme::Error,
    },
    #[error("authorization for {identifier} is {status:?}, not pending or valid")]
    Authorization {
        identifier: String,
        status: AuthorizationStatus,
    },
    #[error("the CA offered no http-01 challenge for {0}")]
    NoHttp01(String),
    #[error("the CA sent a token certfleet refuses for {identifier}: {source}")]
    BadToken {
        identifier: String,
        source: InvalidChallenge,
    },
    #[error("the CA returned a certificate certfleet refuses: {0}")]
    Certificate(#[from] InvalidBundle),
    #[error("generating the certificate key or CSR: {0}")]
    Key(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    NotStored(#[from] crate::store::NotStored),
}

impl IssueError {
    fn acme(context: impl Into<String>) -> impl FnOnce(instant_acme::Error) -> Self {
        let context = context.into();
        move |source| Self::Acme { context, source }
    }

    /// The CA's problem document, when the CA refused.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Acme {
                source: instant_acme::Error::Api(problem),
                ..
            } => Some(problem),
            _ => None,
        }
    }
}

fn join_lines(errors: &[NodeError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A problem document's `type` and `detail`, unchanged (RFC 7807).
fn describe(err: &instant_acme::Error) -> String {
    match err {
        instant_acme::Error::Api(p) => {
            let mut s = format!(
                "{}: {}",
                p.r#type.as_deref().unwrap_or("(no type)"),
                p.detail.as_deref().unwrap_or("(no detail)")
            );
            for sub in &p.subproblems {
                s.push_str(&format!("; {sub}"));
            }
            s
        }
        other => other.to_string(),
    }
}

/// An order that failed, with its URL when the CA had created it.
#[derive(Debug)]
pub struct Failed {
    pub error: IssueError,
    pub order_url: Option<String>,
}

/// Where an order's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub total: Duration,
    /// Waiting on the CA: its requests and its validation and issuance polls.
    pub ca: Duration,
    /// Placement on every node plus the self-check.
    pub placement: Duration,
    pub cleanup: Duration,
}

/// A successful order.
#[derive(Debug)]
pub struct Issued {
    pub stored: Stored,
    pub order_url: String,
    pub timings: Timings,
    /// Authorizations the CA already held as valid (authorization reuse).
    pub reused_authorizations: usize,
}

/// Runs orders. Cheap to share: one per coordinator.
pub struct Issuer {
    /// The nodes, their transports and the certificate locks.
    fleet: Arc<Fleet>,
    /// The fleet's own config and store, which every step of an order reads.
    config: Arc<Config>,
    store: Arc<Store>,
    acme: AcmeAccount,
    self_check: SelfCheckClient,
}

impl Issuer {
    pub fn new(fleet: Arc<Fleet>, acme: AcmeAccount) -> Self {
        Self {
            config: Arc::clone(fleet.shared_config()),
            store: Arc::clone(fleet.shared_store()),
            fleet,
            acme,
            self_check: SelfCheckClient::default(),
        }
    }

    /// Issues a new version of the certificate `op` holds the lock of. The
    /// lock keeps a second order from racing this one for the same
    /// authorizations and version number, and a rollout from seeing the
    /// live version change under it.
    pub async fn issue(&self, op: &OperationGuard, progress: &Progress) -> Result<Issued, Failed> {
        let name = op.certificate();
        let failed = |error: FleetError| Failed {
            error: error.into(),
            order_url: None,
        };
        let spec = self.fleet.spec(name).map_err(failed)?;
        let nodes = self.fleet.nodes(spec).map_err(failed)?;
        let span = info_span!("issue", cert = %name, sans = spec.sans.len(), nodes = nodes.len());
        let mut order = OrderRun {
            issuer: self,
            spec,
            nodes: &nodes,
            progress,
            order_url: None,
            placed: Vec::new(),
            timings: Timings::default(),
        };
        let start = Instant::now();
        let result = order.run().instrument(span.clone()).await;
        order.cleanup().instrument(span.clone()).await;
        order.timings.total = start.elapsed();
        let _enter = span.enter();
        match result {
            Ok((stored, reused)) => {
                info!(
                    version = stored.version,
                    ms = order.timings.total.as_millis() as u64,
                    "issued"
                );
                Ok(Issued {
                    stored,
                    order_url: order.order_url.unwrap_or_default(),
                    timings: order.timings,
                    reused_authorizations: reused,
                })
            }
            Err(error) => {
                warn!(%error, "order failed");
                Err(Failed {
                    error,
                    order_url: order.order_url,
                })
            }
        }
    }
}

/// Fetches every authorization of `order` (they are cached in the order
/// afterwards). A fetch that fails ends instant-acme's stream at that entry,
/// so on `badNonce` the walk starts again; the ones already fetched cost
/// nothing the second time.
async fn fetch_authorizations(order: &mut instant_acme::Order) -> Result<(), IssueError> {
    let mut retries = 0;
    'walk: loop {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            match authz {
                Ok(_) => {}
                Err(e) if is_bad_nonce(&e) && retries < BAD_NONCE_RETRIES => {
                    retries += 1;
                    continue 'walk;
                }
                Err(e) => return Err(IssueError::acme("reading an authorization")(e)),
            }
        }
        return Ok(());
    }
}

struct OrderRun<'a> {
    issuer: &'a Issuer,
    spec: &'a CertificateSpec,
    nodes: &'a [FleetNode],
    progress: &'a Progress,
    order_url: Option<String>,
    placed: Vec<Token>,
    timings: Timings,
}

impl OrderRun<'_> {
    fn limits(&self) -> FanOut {
        self.issuer.fleet.fan_out()
    }

    async fn run(&mut self) -> Result<(Stored, usize), IssueError> {
        let config = &self.issuer.config;
        if let Some(stored) = self.store_rescued()? {
            return Ok((stored, 0));
        }
        self.issuer.store.preflight()?;
        let ca_start = Instant::now();
        let account = self.issuer.acme.get().await?;
        let identifiers: Vec<Identifier> = self
            .spec
            .sans
            .iter()
            .map(|s| Identifier::Dns(s.clone()))
            .collect();
        let mut order = nonce_retry!(account.new_order(&NewOrder::new(&identifiers)).await)
            .map_err(IssueError::acme("creating the order"))?;
        self.order_url = Some(order.url().to_owned());
        fetch_authorizations(&mut order).await?;

        // Authorizations come back in the CA's order, not the SANs'; each
        // carries its own identifier. Valid ones are reused, not redone.
        let mut pending = Vec::new();
        let mut reused = 0;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(IssueError::acme("reading an authorization"))?;
            let identifier = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Valid => reused += 1,
                AuthorizationStatus::Pending => {
                    let challenge = authz
                        .challenge(ChallengeType::Http01)
                        .ok_or_else(|| IssueError::NoHttp01(identifier.clone()))?;
                    let key_authorization = challenge.key_authorization();
                    let response = Token::parse(&challenge.token)
                        .and_then(|t| Http01Response::new(t, key_authorization.as_str()))
                        .map_err(|source| IssueError::BadToken {
                            identifier: identifier.clone(),
                            source,
                        })?;
                    pending.push(PendingChallenge {
                        identifier,
                        response,
                    });
                }
                status => return Err(IssueError::Authorization { identifier, status }),
            }
        }
        self.timings.ca += ca_start.elapsed();
        self.progress.step(
            Stage::Order,
            format!(
                "order {} for {} names: {} to validate, {} already valid",
                order.url(),
                self.spec.sans.len(),
                pending.len(),
                reused
            ),
        );

        if !pending.is_empty() {
            let start = Instant::now();
            let limits = self.limits();
            self.placed = pending.iter().map(|p| p.response.token().clone()).collect();
            challenge::place_all(
                self.nodes,
                &pending,
                config.placement.token_ttl,
                limits,
                self.progress,
            )
            .await
            .map_err(|errors| IssueError::Nodes {
                stage: Stage::Placement,
                errors,
            })?;
            challenge::self_check_all(
                self.nodes,
                &pending,
                challenge::ValidationPorts {
                    http: config.acme.validation_port,
                    https: config.acme.validation_tls_port,
                },
                &self.issuer.self_check,
                limits,
                self.progress,
            )
            .await
            .map_err(|errors| IssueError::Nodes {
                stage: Stage::SelfCheck,
                errors,
            })?;
            self.timings.placement = start.elapsed();

            // Every node serves every token: now, and only now, the CA may look.
            let ca_start = Instant::now();
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(IssueError::acme("reading an authorization"))?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                let identifier = authz.identifier().to_string();
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| IssueError::NoHttp01(identifier.clone()))?;
                nonce_retry!(challenge.set_ready().await).map_err(IssueError::acme(format!(
                    "answering the challenge for {identifier}"
                )))?;
            }
            self.progress
                .step(Stage::Validation, "challenges answered; waiting for the CA");
            let retry = self.retry_policy();
            let status = nonce_retry!(order.poll_ready(&retry).await)
                .map_err(IssueError::acme("waiting for validation"))?;
            if status != OrderStatus::Ready {
                return Err(self.validation_failure(&mut order).await);
            }
            self.timings.ca += ca_start.elapsed();
        } else {
            let ca_start = Instant::now();
            nonce_retry!(order.poll_ready(&self.retry_policy()).await)
                .map_err(IssueError::acme("waiting for the order to be ready"))?;
            self.timings.ca += ca_start.elapsed();
        }
        self.progress
            .step(Stage::Validation, "the CA validated every name");

        let (key_pem, csr_der) = self.key_and_csr()?;
        let ca_start = Instant::now();
        nonce_retry!(order.finalize_csr(&csr_der).await)
            .map_err(IssueError::acme("finalizing the order"))?;
        let chain = nonce_retry!(order.poll_certificate(&self.retry_policy()).await)
            .map_err(IssueError::acme("downloading the certificate"))?;
        self.timings.ca += ca_start.elapsed();
        self.progress
            .step(Stage::Finalize, "certificate downloaded");

        let bundle = Bundle::parse(&chain, Some(&key_pem), &self.spec.sans)?;
        let (version, _) = self.issuer.store.save_or_rescue(
            &self.spec.name,
            &bundle,
            &key_pem,
            &config.rescue_dir(),
        )?;
        let stored = self
            .issuer
            .store
            .live(&self.spec.name)?
            .filter(|s| s.version == version)
            .ok_or_else(|| StoreError {
                path: self
                    .issuer
                    .config
                    .state_dir
                    .join("live")
                    .join(&self.spec.name),
                source: std::io::Error::other("live/ does not point at the version just written"),
            })?;
        self.progress.step(
            Stage::Store,
            format!(
                "stored version {version} in {} (serial {})",
                stored.live_dir.display(),
                stored.bundle.serial
            ),
        );
        Ok((stored, reused))
    }

    /// Stores the certificate an earlier order got but could not store,
    /// instead of ordering a new one (the CA counted that one already).
    fn store_rescued(&self) -> Result<Option<Stored>, IssueError> {
        let rescue = self.issuer.config.rescue_dir();
        let name = &self.spec.name;
        let Some((version, bundle)) =
            self.issuer
                .store
                .store_rescued(name, &self.spec.sans, &rescue)?
        else {
            return Ok(None);
        };
        let stored = self
            .issuer
            .store
            .live(name)?
            .filter(|s| s.version == version);
        self.progress.step(
            Stage::Store,
            format!(
                "stored version {version} (serial {}) from {}: the certificate an earlier order could not store; no new order placed",
                bundle.serial,
                rescue.join(name).display()
            ),
        );
        Ok(stored)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new()
            .initial_delay(POLL_INITIAL_DELAY)
            .backoff(POLL_BACKOFF)
            .timeout(self.issuer.config.acme.ca_timeout)
    }

    /// The order went invalid: find the challenge the CA failed and pass its
    /// problem document through.
    async fn validation_failure(&self, order: &mut instant_acme::Order) -> IssueError {
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            let identifier = authz.identifier().to_string();
            let Ok(state) = nonce_retry!(authz.refresh().await) else {
                continue;
            };
            if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
                return IssueError::Acme {
                    context: format!("validating {identifier}"),
                    source: instant_acme::Error::Api(problem),
                };
            }
        }
        IssueError::Acme {
            context: "validating".into(),
            source: instant_acme::Error::Str("order became invalid without a challenge error"),
        }
    }

    fn key_and_csr(&self) -> Result<(String, Vec<u8>), IssueError> {
        use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize};
        let key_err = |e: rcgen::Error| IssueError::Key(e.to_string());
        let key = match self.spec.key {
            KeyType::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
            KeyType::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
            KeyType::Rsa4096 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_4096),
        }
        .map_err(key_err)?;
        let mut params = rcgen::CertificateParams::new(self.spec.sans.clone()).map_err(key_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(key_err)?;
        Ok((key.serialize_pem(), csr.der().to_vec()))
    }

    /// Takes this order's tokens off every node, whether it succeeded or not.
    async fn cleanup(&mut self) {
        if self.placed.is_empty() {
            return;
        }
        let start = Instant::now();
        challenge::remove_all(self.nodes, &self.placed, self.limits(), self.progress).await;
        self.placed.clear();
        self.timings.cleanup = start.elapsed();
    }
}
