//! Kafka security against a real Kafka-protocol broker, as far as one is
//! available here: tansu with `--authentication` refuses SCRAM credentials,
//! and the connect fails at once with `Auth`, showing no secret; an
//! unreachable broker is a `Connection` error; a TLS setting the protocol
//! would ignore is a `Config` error.
//!
//! Untested against a server: a successful SASL login (tansu 0.6 keeps the
//! users it creates nowhere an authenticating broker finds them: not in its
//! S3 storage, and its build has no PostgreSQL storage), and TLS (tansu
//! 0.6's `--cert` listener never completes a handshake; a Python `ssl`
//! client times out). librdkafka's mock cluster has neither SASL nor TLS.

use std::time::{Duration, Instant};

use eventbus_core::ErrorKind;
use eventbus_kafka::{KafkaBackend, KafkaConfig, SaslMechanism, SecurityProtocol};
use eventbus_testkit::server::{TansuOptions, TansuServer, TansuStorage};

async fn refused(config: KafkaConfig, kind: ErrorKind, secrets: &[&str]) -> eventbus_core::Error {
    let started = Instant::now();
    let debug = format!("{config:?}");
    let err = KafkaBackend::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), kind, "{err:?}");
    let mut shown = format!("{err} {err:?} {debug}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        shown.push_str(&s.to_string());
        source = s.source();
    }
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} shown in: {shown}");
    }
    err
}

fn config(bootstrap: String) -> KafkaConfig {
    let mut c = KafkaConfig::with_brokers([bootstrap]);
    c.connect_timeout_ms = 5_000;
    c
}

fn scram(c: &mut KafkaConfig, password: &str) {
    c.security.protocol = SecurityProtocol::SaslPlaintext;
    c.security.sasl_mechanism = SaslMechanism::ScramSha512;
    c.security.sasl_username = Some("svc".into());
    c.security.sasl_password = Some(password.into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_scram_credentials_fail_at_connect_without_showing_them() {
    let broker = TansuServer::start_with_options(TansuStorage::Memory, TansuOptions { authentication: true })
        .await
        .unwrap();
    // The broker answers the SCRAM exchange with an error (unknown user):
    // librdkafka reports it through the error callback, which the connect
    // probe serves, so the connect fails as `Auth`, at once.
    let mut wrong = config(broker.bootstrap());
    scram(&mut wrong, "wrongpass9");
    let started = std::time::Instant::now();
    let err = refused(wrong, ErrorKind::Auth, &["wrongpass9"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("SASL"), "{err}");
    // No SASL at all: the broker drops the connection; no broker answers.
    refused(config(broker.bootstrap()), ErrorKind::Connection, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_or_an_ignored_tls_setting_fails_at_connect() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    refused(config(format!("127.0.0.1:{port}")), ErrorKind::Connection, &[]).await;
    let mut ignored = config(format!("127.0.0.1:{port}"));
    ignored.security.ssl_ca_location = Some("/etc/ssl/ca.pem".into());
    let err = refused(ignored, ErrorKind::Config, &[]).await;
    assert!(err.to_string().contains("ssl_ca_location"), "{err}");
}
