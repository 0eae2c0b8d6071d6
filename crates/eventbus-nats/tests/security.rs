//! TLS and authentication against real nats-servers that require them:
//! certificates made by `TestPki` (rcgen), user/password, token and NKey
//! users. Right settings connect and carry an event end to end; wrong ones
//! fail fast with a typed error that shows no secret; configured TLS never
//! falls back to plaintext.

use std::time::{Duration, Instant};

use eventbus_core::{BusConfig, Envelope, ErrorKind, EventBus, SubscribeOptions};
use eventbus_nats::{NatsBackend, NatsConfig, NatsTls};
use eventbus_testkit::envelope;
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::tls::TestPki;

/// Connects with `config` and carries one event from publish to handler.
async fn round_trip(config: NatsConfig) {
    let backend = NatsBackend::connect(config).await.unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = bus
        .subscribe_envelope("secured", SubscribeOptions::group("g"), move |e: Envelope| {
            let _ = tx.send(e);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .unwrap();
    let e = envelope("acct-1", 1);
    bus.publish_envelope_sync("secured", &e).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the event arrives")
        .unwrap();
    assert_eq!(got, e);
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}

/// Connecting with `config` fails within 10 s with `kind`; the error, its
/// sources and the config's `Debug` show none of `secrets`.
async fn refused(config: NatsConfig, kind: ErrorKind, secrets: &[&str]) -> eventbus_core::Error {
    let started = Instant::now();
    let debug = format!("{config:?}");
    let err = tokio::time::timeout(Duration::from_secs(10), NatsBackend::connect(config))
        .await
        .expect("a refused connect fails fast, with no reconnect loop")
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
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

fn config(url: String) -> NatsConfig {
    let mut c = NatsConfig::with_servers([url]);
    c.reconnect.connect_timeout_ms = 2_000;
    c
}

fn tls_server_block(pki: &TestPki, verify_clients: bool) -> String {
    format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {verify_clients}, timeout: 2 }}",
        pki.server_cert(),
        pki.server_key(),
        pki.ca()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_is_reached_only_over_verified_tls() {
    let pki = TestPki::generate().unwrap();
    let server = NatsServer::start_with_config(&tls_server_block(&pki, false))
        .await
        .unwrap();
    let mut good = config(server.url());
    good.tls = Some(NatsTls {
        ca_file: Some(pki.ca()),
        ..NatsTls::default()
    });
    round_trip(good).await;
    // No CA: the server's certificate is not trusted.
    refused(config(server.url()), ErrorKind::Connection, &[]).await;
    // Another CA: not trusted either.
    let other = TestPki::generate().unwrap();
    let mut wrong_ca = config(server.url());
    wrong_ca.tls = Some(NatsTls {
        ca_file: Some(other.ca()),
        ..NatsTls::default()
    });
    refused(wrong_ca, ErrorKind::Connection, &[]).await;
}

/// The bug this replaced: TLS configured, server without TLS, and the
/// client connected in plaintext (credentials included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_tls_never_falls_back_to_plaintext() {
    let pki = TestPki::generate().unwrap();
    let plain = NatsServer::start_with_config("authorization { user: svc, password: plainpass1 }")
        .await
        .unwrap();
    let mut c = config(format!("nats://svc:plainpass1@127.0.0.1:{}", plain.port()));
    c.tls = Some(NatsTls {
        ca_file: Some(pki.ca()),
        ..NatsTls::default()
    });
    refused(c, ErrorKind::Connection, &["plainpass1"]).await;
    // Half a client certificate is a configuration error naming the setting.
    let mut half = config(plain.url());
    half.tls = Some(NatsTls {
        cert_file: Some(pki.client_cert()),
        ..NatsTls::default()
    });
    let err = refused(half, ErrorKind::Config, &[]).await;
    assert!(err.to_string().contains("key_file"), "{err}");
    // TLS with a plain websocket URL would send credentials in cleartext.
    let mut ws = config(format!("ws://svc:plainpass1@127.0.0.1:{}", plain.port()));
    ws.tls = Some(NatsTls {
        ca_file: Some(pki.ca()),
        ..NatsTls::default()
    });
    let err = refused(ws, ErrorKind::Config, &["plainpass1"]).await;
    assert!(err.to_string().contains("wss://"), "{err}");
    // A tls:// URL alone requires TLS too: refused by a plaintext server.
    refused(
        config(format!("tls://svc:plainpass1@127.0.0.1:{}", plain.port())),
        ErrorKind::Connection,
        &["plainpass1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = TestPki::generate().unwrap();
    let server = NatsServer::start_with_config(&tls_server_block(&pki, true))
        .await
        .unwrap();
    let mut with_cert = config(server.url());
    with_cert.tls = Some(NatsTls {
        ca_file: Some(pki.ca()),
        cert_file: Some(pki.client_cert()),
        key_file: Some(pki.client_key()),
    });
    round_trip(with_cert).await;
    let mut without = config(server.url());
    without.tls = Some(NatsTls {
        ca_file: Some(pki.ca()),
        ..NatsTls::default()
    });
    refused(without, ErrorKind::Connection, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token_auth_accept_the_right_secret_only() {
    let users = NatsServer::start_with_config("authorization { user: svc, password: rightpass7 }")
        .await
        .unwrap();
    let mut good = config(users.url());
    good.auth.user = Some("svc".into());
    good.auth.password = Some("rightpass7".into());
    round_trip(good).await;
    // In the URL too, where Debug and errors must hide it.
    round_trip(config(format!(
        "nats://svc:rightpass7@127.0.0.1:{}",
        users.port()
    )))
    .await;
    let mut wrong = config(users.url());
    wrong.auth.user = Some("svc".into());
    wrong.auth.password = Some("wrongpass9".into());
    refused(wrong, ErrorKind::Auth, &["wrongpass9"]).await;
    refused(
        config(format!("nats://svc:wrongpass9@127.0.0.1:{}", users.port())),
        ErrorKind::Auth,
        &["wrongpass9"],
    )
    .await;
    refused(config(users.url()), ErrorKind::Auth, &[]).await;

    let tokens = NatsServer::start_with_config("authorization { token: righttoken3 }")
        .await
        .unwrap();
    let mut good = config(tokens.url());
    good.auth.token = Some("righttoken3".into());
    round_trip(good).await;
    let mut wrong = config(tokens.url());
    wrong.auth.token = Some("wrongtoken4".into());
    refused(wrong, ErrorKind::Auth, &["wrongtoken4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_auth_accepts_the_users_seed_only() {
    let user = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await
    .unwrap();
    let seed = user.seed().unwrap();
    let mut good = config(server.url());
    good.auth.nkey_seed = Some(seed.as_str().into());
    round_trip(good).await;
    let stranger_seed = stranger.seed().unwrap();
    let mut wrong = config(server.url());
    wrong.auth.nkey_seed = Some(stranger_seed.as_str().into());
    refused(wrong, ErrorKind::Auth, &[&stranger_seed]).await;
    // Not a seed at all: refused before anything is sent.
    let mut garbage = config(server.url());
    garbage.auth.nkey_seed = Some("SUnotaseed".into());
    let err = tokio::time::timeout(Duration::from_secs(10), NatsBackend::connect(garbage))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Auth | ErrorKind::Config),
        "{err:?}"
    );
    assert!(!err.to_string().contains("SUnotaseed"), "{err}");
}
