//! The one error type of the bus, [`Error`], and its [`ErrorKind`].

use std::borrow::Cow;
use std::fmt;

/// A boxed error from a backend or a handler, kept as the `source` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with the bus's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: enough to decide whether to retry.
///
/// New kinds may be added, so matches need a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Input broke a rule (an envelope field, a topic name). The source is a
    /// [`ValidationError`] naming the field. Nothing was sent.
    Validation,
    /// The bus, publisher or subscription was closed before or during the call.
    Closed,
    /// A deadline passed: publish backpressure, an ACK, a flush.
    Timeout,
    /// The broker or its client reported an error (the source is the client's error).
    Backend,
    /// The connection to the broker is down or could not be made.
    Connection,
    /// The broker refused the credentials (user/password, token, NKey,
    /// client certificate, SASL) or the client could not prove them.
    /// Retrying with the same settings does not help.
    Auth,
    /// Bytes could not be encoded or decoded (JSON, headers).
    Serialization,
    /// The configuration is invalid or could not be loaded.
    Config,
    /// A stream or topic the configuration expects does not exist.
    NotFound,
    /// A stream or topic exists but conflicts with the configuration.
    Conflict,
    /// A subscription handler returned an error or panicked.
    Handler,
    /// The backend cannot do this (for example [`Backend::browse`](crate::Backend::browse)
    /// on a backend that does not implement it).
    Unsupported,
}

/// The error of every fallible call in this SDK.
///
/// Carries an [`ErrorKind`], a human message, and the underlying error (a
/// broker client's error, a [`ValidationError`], a `serde_json::Error`) as its
/// [`source`](std::error::Error::source).
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` with a message and no source.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An [`ErrorKind::Closed`] error; `what` names the closed thing ("bus", "subscription").
    pub fn closed(what: &'static str) -> Self {
        Self::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// An [`ErrorKind::Timeout`] error; `what` names the operation that timed out.
    pub fn timeout(what: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Timeout, what)
    }

    /// An [`ErrorKind::Backend`] error wrapping a client's error.
    pub fn backend(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Backend, message).with_source(source)
    }

    /// An [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The [`ValidationError`] behind an [`ErrorKind::Validation`] error.
    pub fn validation(&self) -> Option<&ValidationError> {
        self.source.as_ref()?.downcast_ref()
    }

    /// Whether the same call may succeed if retried later: true for
    /// [`Timeout`](ErrorKind::Timeout), [`Backend`](ErrorKind::Backend),
    /// [`Connection`](ErrorKind::Connection) and [`Handler`](ErrorKind::Handler).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::Backend | ErrorKind::Connection | ErrorKind::Handler
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Self::new(ErrorKind::Validation, format!("invalid field `{}`", e.field)).with_source(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::new(ErrorKind::Serialization, "JSON").with_source(e)
    }
}

/// An input rule was broken; `field` names the offending field (as in the
/// envelope's JSON, e.g. `aggregate_id`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The field's JSON name.
    pub field: &'static str,
    /// Which rule was broken.
    pub reason: String,
}

impl ValidationError {
    /// A broken rule on `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_error_names_field_and_is_not_retriable() {
        let e: Error = ValidationError::new("aggregate_id", "empty").into();
        assert_eq!(e.kind(), ErrorKind::Validation);
        assert_eq!(e.validation().unwrap().field, "aggregate_id");
        assert!(!e.is_retriable());
        assert!(e.to_string().contains("aggregate_id"));
    }

    #[test]
    fn timeouts_and_backend_errors_are_retriable() {
        assert!(Error::timeout("ack").is_retriable());
        assert!(Error::backend("x", "boom").is_retriable());
        assert!(!Error::closed("bus").is_retriable());
    }
}
