//! One ACME order for one certificate, end to end (docs/ARCHITECTURE.md,
//! "Issue").
//!
//! The order of steps is the point: nothing is asked of the CA until every
//! node serves every token and the coordinator has fetched each one itself.
//! Tokens come off every node whatever happens after they were placed.
//!
//! `OrderRun::run` reads as the steps the progress stream names: authorize
//! ([`Stage::Order`]), place and check ([`Stage::Placement`],
//! [`Stage::SelfCheck`]), answer and wait ([`Stage::Validation`]), finalize
//! ([`Stage::Finalize`]) and store ([`Stage::Store`]). `run` times each step
//! once, into [`Timings`]. How to talk to the CA (`badNonce` retries, when
//! to poll) is `acme.rs`'s business; this module decides what to ask it.

use std::sync::Arc;
use std::time::Duration;

use certfleet_proto::bundle::{Bundle, InvalidBundle};
use certfleet_proto::challenge::{Http01Response, InvalidChallenge, Token};
use instant_acme::{
    AuthorizationStatus, ChallengeType, Identifier, NewOrder, Order, OrderStatus, Problem,
};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::acme::{self, AcmeAccount, AcmeSetupError, nonce_retry};
use crate::challenge::{self, FanOut, FleetNode, NodeError, PendingChallenge, SelfCheckClient};
use crate::config::KeyType;
use crate::fleet::{Fleet, FleetError, OperationGuard, Spec};
use crate::journal::{Journal, JournalError, step};
use crate::progress::{Progress, Stage};
use crate::store::{Store, StoreError, Stored};

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
    /// certfleet's own rate-limit guard refused the order before the CA
    /// was asked (`ratelimit`); `--force` skips it.
    #[error("refused by the rate-limit guard, before asking the CA: {0}")]
    RateLimited(#[from] crate::ratelimit::Limited),
    #[error("reading the certificate's past orders for the rate-limit guard: {0}")]
    History(crate::db::DbError),
    #[error(
        "--dry-run needs a staging CA: set acme.staging_directory in the coordinator's config \
         to its ACME directory URL (e.g. https://acme-staging-v02.api.letsencrypt.org/directory)"
    )]
    NoStagingDirectory,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    NotStored(#[from] crate::store::NotStored),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "the order was finalized, but the key its CSR was made from is gone; the certificate cannot be used"
    )]
    KeyLost,
    #[error("the CA no longer allows the order {0} to be finished (it is invalid)")]
    OrderGone(String),
    #[error("saving the certificate's key for the order at {path}: {source}")]
    SaveKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
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

/// The steps of an order, as [`OrderRun::run`] takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The account, a new order, its authorizations.
    Authorize,
    /// Every token onto every node, then fetched back from each.
    PlaceAndCheck,
    /// The challenges answered, then the CA polled until it has validated.
    AnswerAndWait,
    /// The CSR sent, then the CA polled until the certificate is issued.
    Finalize,
    /// The chain checked and written to the store.
    Store,
}

/// Where an order's time went, step by step (the `issued` log line shows
/// each).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub total: Duration,
    /// Waiting on the CA: the sum of [`Self::authorize`],
    /// [`Self::answer_and_wait`] and [`Self::finalize`].
    pub ca: Duration,
    /// Place and check: placement on every node plus the self-check.
    pub placement: Duration,
    pub cleanup: Duration,
    /// The account, the new order and its authorizations.
    pub authorize: Duration,
    /// The challenges answered and the order polled until ready.
    pub answer_and_wait: Duration,
    /// The CSR sent, the order polled until valid, the chain downloaded.
    pub finalize: Duration,
    /// The chain checked and written to the store.
    pub store: Duration,
}

impl Timings {
    /// Runs one step of an order and adds its wall time to the step's.
    async fn time<T>(&mut self, step: Step, work: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = work.await;
        self.record(step, start.elapsed());
        out
    }

    fn record(&mut self, step: Step, took: Duration) {
        let slot = match step {
            Step::Authorize => &mut self.authorize,
            Step::PlaceAndCheck => &mut self.placement,
            Step::AnswerAndWait => &mut self.answer_and_wait,
            Step::Finalize => &mut self.finalize,
            Step::Store => &mut self.store,
        };
        *slot += took;
        self.ca = self.authorize + self.answer_and_wait + self.finalize;
    }
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
    /// The fleet's own store, which every step of an order reads. (Each
    /// order reads the config once, with its certificate: `OrderRun::spec`.)
    store: Arc<Store>,
    acme: AcmeAccount,
    /// The dry runs' account at `acme.staging_directory`, set up on the
    /// first dry run (`None` inside: none configured).
    staging: tokio::sync::OnceCell<Option<AcmeAccount>>,
    self_check: SelfCheckClient,
}

impl Issuer {
    pub fn new(fleet: Arc<Fleet>, acme: AcmeAccount) -> Self {
        Self {
            store: Arc::clone(fleet.shared_store()),
            fleet,
            acme,
            staging: tokio::sync::OnceCell::new(),
            self_check: SelfCheckClient::default(),
        }
    }

    /// Runs a new order with `options`: past the rate-limit guard with
    /// `force`; with `dry_run`, against `acme.staging_directory` with its
    /// own account, storing nothing.
    pub async fn issue_with(
        &self,
        op: &OperationGuard,
        progress: &Progress,
        options: IssueOptions,
    ) -> Result<Ordered, Failed> {
        self.run_order(op, progress, Start::New, options).await
    }

    /// The account an order with `options` talks to the CA with.
    async fn account_for(&self, options: IssueOptions) -> Result<&AcmeAccount, IssueError> {
        if !options.dry_run {
            return Ok(&self.acme);
        }
        let config = self.fleet.config();
        let staging = self
            .staging
            .get_or_try_init(|| async { AcmeAccount::staging(&config.acme, &config.state_dir) })
            .await?;
        staging.as_ref().ok_or(IssueError::NoStagingDirectory)
    }

    /// The ACME account every order uses; the account commands and revoke
    /// go through it too, so a key rollover reaches the next order.
    pub fn acme(&self) -> &AcmeAccount {
        &self.acme
    }

    /// Issues a new version of the certificate `op` holds the lock of. The
    /// lock keeps a second order from racing this one for the same
    /// authorizations and version number, and a rollout from seeing the
    /// live version change under it.
    pub async fn issue(&self, op: &OperationGuard, progress: &Progress) -> Result<Issued, Failed> {
        self.order(op, progress, Start::New).await
    }

    /// Runs an order from `start`: a new one, or one an interrupted
    /// operation left (`recovery`).
    pub async fn order(
        &self,
        op: &OperationGuard,
        progress: &Progress,
        start: Start,
    ) -> Result<Issued, Failed> {
        match self
            .run_order(op, progress, start, IssueOptions::default())
            .await?
        {
            Ordered::Issued(issued) => Ok(issued),
            Ordered::DryRun(_) => unreachable!("a dry run only runs when asked for"),
        }
    }

    async fn run_order(
        &self,
        op: &OperationGuard,
        progress: &Progress,
        start: Start,
        options: IssueOptions,
    ) -> Result<Ordered, Failed> {
        let name = op.certificate();
        let failed = |error: IssueError| Failed {
            error,
            order_url: None,
        };
        let spec = self.fleet.spec(name).map_err(|e| failed(e.into()))?;
        let nodes = self.fleet.nodes(&spec).map_err(|e| failed(e.into()))?;
        let acme = self.account_for(options).await.map_err(failed)?;
        let span = info_span!("issue", cert = %name, sans = spec.sans.len(), nodes = nodes.len());
        let mut order = OrderRun {
            issuer: self,
            spec: &spec,
            nodes: &nodes,
            progress,
            journal: op.journal(),
            order_url: None,
            placed: Vec::new(),
            acme,
            options,
        };
        let mut timings = Timings::default();
        let began = Instant::now();
        let result = order
            .run(&mut timings, start)
            .instrument(span.clone())
            .await;
        timings.cleanup = order.cleanup().instrument(span.clone()).await;
        timings.total = began.elapsed();
        // The key saved for a CSR is stored with its certificate, kept in
        // the rescue directory, or of no use: only a crash leaves it for
        // recovery.
        if let Some(id) = op.journal().id() {
            let _ = std::fs::remove_file(pending_key_path(&spec.config().state_dir, id));
        }
        let _enter = span.enter();
        match result {
            Ok((Kept::Checked(bundle), reused)) => {
                info!(
                    serial = %bundle.serial,
                    ms = timings.total.as_millis() as u64,
                    "dry run: the staging CA issued; nothing stored"
                );
                Ok(Ordered::DryRun(DryRun {
                    bundle,
                    order_url: order.order_url.unwrap_or_default(),
                    timings,
                    reused_authorizations: reused,
                }))
            }
            Ok((Kept::Stored(stored), reused)) => {
                let ms = |d: Duration| d.as_millis() as u64;
                let t = &timings;
                info!(
                    version = stored.version,
                    ms = ms(t.total),
                    authorize_ms = ms(t.authorize),
                    place_and_check_ms = ms(t.placement),
                    answer_and_wait_ms = ms(t.answer_and_wait),
                    finalize_ms = ms(t.finalize),
                    store_ms = ms(t.store),
                    cleanup_ms = ms(t.cleanup),
                    "issued"
                );
                Ok(Ordered::Issued(Issued {
                    stored,
                    order_url: order.order_url.unwrap_or_default(),
                    timings,
                    reused_authorizations: reused,
                }))
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

/// How to run an order (`certfleet issue --force`, `--dry-run`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IssueOptions {
    /// Order even when the rate-limit guard refuses.
    pub force: bool,
    /// Against `acme.staging_directory` with its own account; the whole
    /// order runs, placement and self-check on the real nodes, and nothing
    /// is stored, rescued or made live.
    pub dry_run: bool,
}

/// A successful dry run: what the staging CA issued, checked, not stored.
#[derive(Debug)]
pub struct DryRun {
    pub bundle: Bundle,
    pub order_url: String,
    pub timings: Timings,
    pub reused_authorizations: usize,
}

/// What a successful order produced.
#[derive(Debug)]
pub enum Ordered {
    Issued(Issued),
    DryRun(DryRun),
}

/// What [`OrderRun::run`] kept of the certificate.
enum Kept {
    /// Stored as the next version and made live.
    Stored(Stored),
    /// A dry run's: checked, then dropped.
    Checked(Bundle),
}

/// Where an order starts.
#[derive(Debug)]
pub enum Start {
    /// A new order.
    New,
    /// The order an interrupted operation created, with the key it had
    /// saved for its CSR, if it got that far.
    Resume {
        order_url: String,
        key_pem: Option<String>,
    },
}

/// What [`OrderRun::authorize`] leaves for the later steps.
struct Authorized {
    order: Order,
    /// The challenges still to answer, one per pending authorization.
    pending: Vec<PendingChallenge>,
    /// Authorizations the CA already held as valid.
    reused: usize,
}

struct OrderRun<'a> {
    issuer: &'a Issuer,
    /// The certificate, and the config every step of this order reads.
    spec: &'a Spec,
    nodes: &'a [FleetNode],
    progress: &'a Progress,
    /// Each step is journaled before it is taken (`recovery` reads it).
    journal: &'a Journal,
    order_url: Option<String>,
    placed: Vec<Token>,
    /// The production account, or the staging one for a dry run.
    acme: &'a AcmeAccount,
    options: IssueOptions,
}

impl OrderRun<'_> {
    fn limits(&self) -> FanOut {
        self.spec.fan_out()
    }

    /// When a step that talks to the CA gives up: its requests, their
    /// `badNonce` retries and its polls all share this budget.
    fn ca_deadline(&self) -> Instant {
        Instant::now() + self.spec.config().acme.ca_timeout
    }

    async fn run(
        &mut self,
        timings: &mut Timings,
        start: Start,
    ) -> Result<(Kept, usize), IssueError> {
        if !self.options.dry_run {
            if let Some(stored) = self.store_rescued()? {
                return Ok((Kept::Stored(stored), 0));
            }
            self.issuer.store.preflight()?;
            if !self.options.force && matches!(start, Start::New) {
                self.rate_limit_guard()?;
            }
        }
        let (authorized, saved_key) = match start {
            Start::New => (self.authorize().await, None),
            Start::Resume { order_url, key_pem } => (self.reopen(order_url).await, key_pem),
        };
        let Authorized {
            mut order,
            pending,
            reused,
        } = timings.time(Step::Authorize, async { authorized }).await?;
        let answer = !pending.is_empty();
        if answer {
            let placed = self.place_and_check(&pending);
            timings.time(Step::PlaceAndCheck, placed).await?;
        }
        // An order resumed after the CA took its CSR only waits for the
        // certificate, which must match the key saved with it.
        let finalized = matches!(
            order.state().status,
            OrderStatus::Processing | OrderStatus::Valid
        );
        if !finalized {
            let ready = self.answer_and_wait(&mut order, answer);
            timings.time(Step::AnswerAndWait, ready).await?;
        }
        let key_pem = match saved_key {
            Some(key) => key,
            None if finalized => return Err(IssueError::KeyLost),
            None => self.new_key()?,
        };
        let csr_der = self.csr(&key_pem)?;
        // A dry run's key goes nowhere: nothing of it is ever stored.
        let key_file = match self.options.dry_run {
            true => None,
            false => self.save_key(&key_pem)?,
        };
        let chain = self.finalize(&mut order, (!finalized).then_some(&csr_der[..]));
        let chain = timings.time(Step::Finalize, chain).await?;
        if self.options.dry_run {
            let checked = async { self.check_dry_run(&chain, &key_pem) };
            let bundle = timings.time(Step::Store, checked).await?;
            return Ok((Kept::Checked(bundle), reused));
        }
        let stored = async { self.store(&chain, &key_pem) };
        let stored = timings.time(Step::Store, stored).await?;
        if let Some(path) = key_file {
            // Stored with its certificate now; recovery no longer needs it.
            let _ = std::fs::remove_file(path);
        }
        Ok((Kept::Stored(stored), reused))
    }

    /// The rate-limit guard: refuses an order that would pass the CA's
    /// limits, counted from this certificate's journaled orders.
    fn rate_limit_guard(&self) -> Result<(), IssueError> {
        use crate::ratelimit::{DUPLICATE_WINDOW, FAILED_VALIDATION_WINDOW, check};
        let now = certfleet_proto::clock::now();
        let since = now - DUPLICATE_WINDOW.max(FAILED_VALIDATION_WINDOW);
        let history = self
            .issuer
            .fleet
            .db()
            .past_orders(&self.spec.name, since)
            .map_err(IssueError::History)?;
        let names = self.spec.sans.iter().cloned().collect();
        Ok(check(now, &names, &history)?)
    }

    /// A dry run's last step: the chain checked as a real one would be
    /// (PEM, order, names, key), and nothing written anywhere.
    fn check_dry_run(&self, chain: &str, key_pem: &str) -> Result<Bundle, IssueError> {
        let bundle = Bundle::parse(chain, Some(key_pem), &self.spec.sans)?;
        self.progress.step(
            Stage::Store,
            format!(
                "dry run: the staging CA issued serial {} for {} names and the chain checks out; nothing stored",
                bundle.serial,
                bundle.sans.len()
            ),
        );
        Ok(bundle)
    }

    /// The certificate this order replaces, for the CA's ARI (RFC 9773
    /// §5): the live one, when the CA is known to offer ARI (instant-acme
    /// refuses `replaces` otherwise) and this is not a dry run.
    fn replaces(&self) -> Option<instant_acme::CertificateIdentifier<'static>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        if self.options.dry_run || self.acme.ari_offered() != Some(true) {
            return None;
        }
        let live = self.issuer.store.live(&self.spec.name).ok()??;
        let leaf = CertificateDer::from_pem_slice(live.bundle.leaf_pem.as_bytes()).ok()?;
        instant_acme::CertificateIdentifier::try_from(&leaf)
            .ok()
            .map(instant_acme::CertificateIdentifier::into_owned)
    }

    /// Authorize: the account, a new order for every name, and its
    /// authorizations. Authorizations come back in the CA's order, not the
    /// SANs'; each carries its own identifier. Valid ones are reused, not
    /// redone.
    async fn authorize(&mut self) -> Result<Authorized, IssueError> {
        let deadline = self.ca_deadline();
        let account = self.acme.get().await?;
        let identifiers: Vec<Identifier> = self
            .spec
            .sans
            .iter()
            .map(|s| Identifier::Dns(s.clone()))
            .collect();
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(replaced) = self.replaces() {
            new_order = new_order.replaces(replaced);
        }
        let mut order = nonce_retry!(deadline, account.new_order(&new_order).await)
            .map_err(IssueError::acme("creating the order"))?;
        self.order_url = Some(order.url().to_owned());
        self.journal.order(order.url(), &self.spec.sans)?;
        acme::fetch_authorizations(&mut order, deadline)
            .await
            .map_err(IssueError::acme("reading an authorization"))?;
        let (pending, reused) = pending_challenges(&mut order).await?;
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
        Ok(Authorized {
            order,
            pending,
            reused,
        })
    }

    /// Reopens an order an earlier, interrupted operation created
    /// (`recovery`): a pending one is authorized again from the CA's
    /// current state; one the CA has since invalidated is refused.
    async fn reopen(&mut self, url: String) -> Result<Authorized, IssueError> {
        let deadline = self.ca_deadline();
        let account = self.issuer.acme.get().await?;
        let mut order = nonce_retry!(deadline, account.order(url.clone()).await)
            .map_err(IssueError::acme(format!("reopening the order {url}")))?;
        self.order_url = Some(url.clone());
        self.journal.order(&url, &self.spec.sans)?;
        let status = order.state().status;
        let (pending, reused) = match status {
            OrderStatus::Pending => {
                acme::fetch_authorizations(&mut order, deadline)
                    .await
                    .map_err(IssueError::acme("reading an authorization"))?;
                pending_challenges(&mut order).await?
            }
            OrderStatus::Ready | OrderStatus::Processing | OrderStatus::Valid => (Vec::new(), 0),
            OrderStatus::Invalid => return Err(IssueError::OrderGone(url)),
        };
        self.progress.step(
            Stage::Order,
            format!(
                "reopened order {url} ({status:?}): {} to validate",
                pending.len()
            ),
        );
        Ok(Authorized {
            order,
            pending,
            reused,
        })
    }

    /// Place and check: every token onto every node, then each fetched
    /// back from each node. A miss ends the order before the CA is told
    /// anything.
    async fn place_and_check(&mut self, pending: &[PendingChallenge]) -> Result<(), IssueError> {
        let config = self.spec.config();
        let limits = self.limits();
        self.placed = pending.iter().map(|p| p.response.token().clone()).collect();
        let tokens: Vec<&str> = self.placed.iter().map(Token::as_str).collect();
        self.journal.step(step::PLACING, "", &tokens.join(" "))?;
        let ttl = config.placement.token_ttl;
        challenge::place_all(self.nodes, pending, ttl, limits, self.progress)
            .await
            .map_err(|errors| IssueError::Nodes {
                stage: Stage::Placement,
                errors,
            })?;
        let ports = challenge::ValidationPorts {
            http: config.acme.validation_port,
            https: config.acme.validation_tls_port,
        };
        let client = &self.issuer.self_check;
        challenge::self_check_all(self.nodes, pending, ports, client, limits, self.progress)
            .await
            .map_err(|errors| IssueError::Nodes {
                stage: Stage::SelfCheck,
                errors,
            })?;
        Ok(self.journal.step(step::PLACED, "", "")?)
    }

    /// Answer and wait: every node serves every token, so now, and only
    /// now, the CA may look (`answer`); then wait until the order is ready.
    async fn answer_and_wait(&self, order: &mut Order, answer: bool) -> Result<(), IssueError> {
        let deadline = self.ca_deadline();
        let waiting = if answer {
            self.journal.step(step::ANSWERED, "", "")?;
            answer_challenges(order, deadline).await?;
            self.progress
                .step(Stage::Validation, "challenges answered; waiting for the CA");
            "waiting for validation"
        } else {
            "waiting for the order to be ready"
        };
        let status = self
            .acme
            .poll_ready(order, deadline)
            .await
            .map_err(IssueError::acme(waiting))?;
        if status != OrderStatus::Ready {
            let (identifier, error) = validation_failure(order, deadline).await;
            if let Some(name) = identifier {
                self.journal.step(step::VALIDATION_FAILED, "", &name)?;
            }
            return Err(error);
        }
        self.progress
            .step(Stage::Validation, "the CA validated every name");
        Ok(())
    }

    /// Finalize: send the CSR, wait for the CA to issue, download the chain.
    async fn finalize(
        &self,
        order: &mut Order,
        csr_der: Option<&[u8]>,
    ) -> Result<String, IssueError> {
        let deadline = self.ca_deadline();
        if let Some(csr_der) = csr_der {
            nonce_retry!(deadline, order.finalize_csr(csr_der).await)
                .map_err(IssueError::acme("finalizing the order"))?;
            self.journal.step(step::FINALIZED, "", "")?;
        }
        let chain = self
            .acme
            .poll_certificate(order, deadline)
            .await
            .map_err(IssueError::acme("downloading the certificate"))?;
        self.journal.step(step::ISSUED, "", "")?;
        self.progress
            .step(Stage::Finalize, "certificate downloaded");
        Ok(chain)
    }

    /// Store: check what the CA sent against the key and the names, write
    /// it as the next version (or into the rescue directory when the store
    /// cannot take it), and make it live.
    fn store(&self, chain: &str, key_pem: &str) -> Result<Stored, IssueError> {
        let (config, store, name) = (self.spec.config(), &self.issuer.store, &self.spec.name);
        let bundle = Bundle::parse(chain, Some(key_pem), &self.spec.sans)?;
        let (version, _) = store.save_or_rescue(name, &bundle, key_pem, &config.rescue_dir())?;
        let stored = store
            .live(name)?
            .filter(|s| s.version == version)
            .ok_or_else(|| StoreError {
                path: config.state_dir.join("live").join(name),
                source: std::io::Error::other("live/ does not point at the version just written"),
            })?;
        self.journal.version(version)?;
        self.journal
            .step(step::STORED, "", &format!("version {version}"))?;
        self.progress.step(
            Stage::Store,
            format!(
                "stored version {version} in {} (serial {})",
                stored.live_dir.display(),
                stored.bundle.serial
            ),
        );
        Ok(stored)
    }

    /// Stores the certificate an earlier order got but could not store,
    /// instead of ordering a new one (the CA counted that one already).
    fn store_rescued(&self) -> Result<Option<Stored>, IssueError> {
        let rescue = self.spec.config().rescue_dir();
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

    /// Saves the certificate's key before the CSR goes to the CA, so that a
    /// coordinator stopped between finalize and store can still store the
    /// certificate the CA issues (`recovery`). `None` when the operation is
    /// not journaled (no recovery would read it).
    fn save_key(&self, key_pem: &str) -> Result<Option<std::path::PathBuf>, IssueError> {
        let Some(id) = self.journal.id() else {
            self.journal.step(step::FINALIZING, "", "")?;
            return Ok(None);
        };
        let path = pending_key_path(&self.spec.config().state_dir, id);
        let save = |path: &std::path::Path| {
            if let Some(dir) = path.parent() {
                certfleet_proto::fsio::create_private_dir(dir)?;
            }
            certfleet_proto::fsio::write_atomic(path, key_pem.as_bytes(), 0o600)
        };
        save(&path).map_err(|source| IssueError::SaveKey {
            path: path.clone(),
            source,
        })?;
        self.journal
            .step(step::FINALIZING, "", &path.display().to_string())?;
        Ok(Some(path))
    }

    /// A fresh key of the certificate's configured type, as PEM.
    fn new_key(&self) -> Result<String, IssueError> {
        use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, RsaKeySize};
        let key = match self.spec.key {
            KeyType::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
            KeyType::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
            KeyType::Rsa4096 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_4096),
        }
        .map_err(|e| IssueError::Key(e.to_string()))?;
        Ok(key.serialize_pem())
    }

    /// The CSR (DER) for every name of the certificate, signed by `key_pem`.
    fn csr(&self, key_pem: &str) -> Result<Vec<u8>, IssueError> {
        let key_err = |e: rcgen::Error| IssueError::Key(e.to_string());
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(key_err)?;
        let mut params = rcgen::CertificateParams::new(self.spec.sans.clone()).map_err(key_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(key_err)?;
        Ok(csr.der().to_vec())
    }

    /// Takes this order's tokens off every node, whether it succeeded or
    /// not, and says how long that took.
    async fn cleanup(&mut self) -> Duration {
        if self.placed.is_empty() {
            return Duration::ZERO;
        }
        let start = Instant::now();
        challenge::remove_all(self.nodes, &self.placed, self.limits(), self.progress).await;
        self.placed.clear();
        if let Err(e) = self.journal.step(step::TOKENS_REMOVED, "", "") {
            warn!(error = %e, "tokens removed, but the journal does not say so");
        }
        start.elapsed()
    }
}

/// Where an order journaled as operation `id` keeps its certificate's key
/// between finalize and store.
pub fn pending_key_path(state_dir: &std::path::Path, id: i64) -> std::path::PathBuf {
    state_dir.join("orders").join(format!("{id}.key"))
}

/// The order's authorizations (already fetched) sorted out: each pending
/// one becomes a [`PendingChallenge`] once its token passes certfleet's
/// checks; valid ones are counted.
async fn pending_challenges(
    order: &mut Order,
) -> Result<(Vec<PendingChallenge>, usize), IssueError> {
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
    Ok((pending, reused))
}

/// Tells the CA that each pending authorization's HTTP-01 challenge is
/// ready to be validated (RFC 8555 §7.5.1).
async fn answer_challenges(order: &mut Order, deadline: Instant) -> Result<(), IssueError> {
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
        nonce_retry!(deadline, challenge.set_ready().await).map_err(IssueError::acme(format!(
            "answering the challenge for {identifier}"
        )))?;
    }
    Ok(())
}

/// The order went invalid: find the challenge the CA failed and pass its
/// problem document through, with the name it failed.
async fn validation_failure(order: &mut Order, deadline: Instant) -> (Option<String>, IssueError) {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let identifier = authz.identifier().to_string();
        let Ok(state) = nonce_retry!(deadline, authz.refresh().await) else {
            continue;
        };
        if let Some(problem) = state.challenges.iter().find_map(|c| c.error.clone()) {
            let error = IssueError::Acme {
                context: format!("validating {identifier}"),
                source: instant_acme::Error::Api(problem),
            };
            return (Some(identifier), error);
        }
    }
    let error = IssueError::Acme {
        context: "validating".into(),
        source: instant_acme::Error::Str("order became invalid without a challenge error"),
    };
    (None, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_step_is_timed_into_its_own_slot_and_the_ca_steps_add_up() {
        let ms = Duration::from_millis;
        let step = |n| tokio::time::sleep(ms(n));
        let mut t = Timings::default();
        t.time(Step::Authorize, step(3)).await;
        t.time(Step::PlaceAndCheck, step(20)).await;
        t.time(Step::AnswerAndWait, step(50)).await;
        t.time(Step::Finalize, step(60)).await;
        assert_eq!(t.time(Step::Store, async { "stored" }).await, "stored");
        assert_eq!(
            (
                t.authorize,
                t.placement,
                t.answer_and_wait,
                t.finalize,
                t.store
            ),
            (ms(3), ms(20), ms(50), ms(60), Duration::ZERO)
        );
        assert_eq!(t.ca, ms(113), "authorize + answer and wait + finalize");
    }
}
