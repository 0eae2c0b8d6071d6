//! The CLI never prints a secret: not in `--help` (environment values are
//! hidden), not in the error of a database or NATS URL it cannot use.

use std::process::Command;

fn eventbus(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn help_and_errors_show_no_credentials() {
    let env = [
        (
            "EVENTBUS_DATABASE_URL",
            "postgres://app:s3cretpw@127.0.0.1:notaport/db",
        ),
        ("EVENTBUS_NATS_URL", "nats://svc:n4tspw@127.0.0.1:1"),
    ];
    for args in [
        &["outbox", "relay", "--help"][..],
        &["outbox", "status", "--help"],
        &["outbox", "status"],
        &["outbox", "relay", "--backend", "nats"],
    ] {
        let shown = eventbus(args, &env);
        assert!(!shown.is_empty(), "{args:?} printed nothing");
        for secret in ["s3cretpw", "n4tspw"] {
            assert!(!shown.contains(secret), "{args:?} printed {secret}: {shown}");
        }
    }
}
