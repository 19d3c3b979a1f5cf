//! What the coordinator tells the administrators, by mail.
//!
//! Flows hand a [`Mail`] to the fleet's [`Notifier`]; it goes into the
//! durable outbox and is delivered from there (see `mail`). Without a
//! `[mail]` section nothing is queued and the mail is only logged.
//! A mail never carries a secret: no key, credential, join token or
//! approval token other than the approval link meant for its recipients.

/// One message about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The certificate it is about (its configured extra recipients get it
    /// too).
    pub certificate: String,
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// The HTML alternative.
    pub html: String,
}

/// Queues mail for the administrators.
#[derive(Debug, Default)]
pub struct Notifier {}

impl Notifier {
    /// Queues `mail`; never fails the operation that sends it (a mail that
    /// cannot be queued is logged).
    pub fn send(&self, mail: Mail) {
        tracing::info!(
            certificate = mail.certificate,
            subject = mail.subject,
            "mail (no [mail] section: not sent)"
        );
    }
}
