//! [`Secret`]: a configuration string that never shows in `Debug`,
//! `Display`, serialized output or logs; [`redact_url`] for URLs that may
//! carry credentials.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a secret or a URL's credentials are replaced with.
pub const REDACTED: &str = "***";

/// A password, token or key seed. `Debug`, `Display` and `Serialize` write
/// `***` (so a configuration written back out carries no secret); read the
/// value with [`expose`](Secret::expose) where the client needs it.
/// Deserializes from a plain string.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// `url` with its credentials replaced by `***`: the password of
/// `scheme://user:password@host` (the user stays), a lone user-info part
/// (`nats://token@host`, a NATS token), the same without a scheme
/// (`user:password@host:4222`, which clients complete with a default
/// scheme), and the values of query parameters named like a secret
/// (`password`, `passwd`, `pwd`, `token`, `secret`, `sslpassword`, `key`,
/// case-insensitive, as PostgreSQL URLs allow). A comma-separated list is
/// redacted URL by URL, and so is a URL inside longer text (an error
/// message). The user info runs to the last `@` before whitespace or a
/// quote, so a password holding an unencoded `/`, `?` or `#` is still
/// hidden (erring towards hiding too much). Text without credentials comes
/// back unchanged.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    if !url.contains('@') && !url.contains('?') {
        return Cow::Borrowed(url);
    }
    let pieces: Vec<String> = url.split(',').map(redact_one).collect();
    let joined = pieces.join(",");
    if joined == url {
        Cow::Borrowed(url)
    } else {
        Cow::Owned(joined)
    }
}

fn redact_one(url: &str) -> String {
    let mut out = String::new();
    let mut rest = url;
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let after = &url[authority_start..];
    if !after.starts_with('/') {
        let region_end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(after.len());
        if let Some(at) = after[..region_end].rfind('@') {
            let info = &after[..at];
            out.push_str(&url[..authority_start]);
            match info.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None => out.push_str(REDACTED),
            }
            rest = &after[at..];
        }
    }
    if let Some(q) = rest.find('?') {
        let (head, query) = rest.split_at(q + 1);
        let (query, fragment) = match query.find(['#', ' ', '"']) {
            Some(f) => query.split_at(f),
            None => (query, ""),
        };
        let secret_names = [
            "password",
            "passwd",
            "pwd",
            "token",
            "secret",
            "sslpassword",
            "key",
        ];
        let parts: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if secret_names.iter().any(|s| name.eq_ignore_ascii_case(s)) => {
                    format!("{name}={REDACTED}")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(head);
        out.push_str(&parts.join("&"));
        out.push_str(fragment);
        return out;
    }
    out.push_str(rest);
    out
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_display_and_serialize_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
        let back: Secret = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(back.expose(), "hunter2");
    }

    #[test]
    fn urls_lose_their_credentials_only() {
        let cases = [
            (
                "nats://user:pa55@127.0.0.1:4222",
                "nats://user:***@127.0.0.1:4222",
            ),
            ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),
            ("tls://u:p%40ss@host", "tls://u:***@host"),
            (
                "postgres://app:pa:ss@db.local:5432/orders?sslmode=require",
                "postgres://app:***@db.local:5432/orders?sslmode=require",
            ),
            (
                "postgres://db.local/orders?user=app&password=pa55&sslmode=require",
                "postgres://db.local/orders?user=app&password=***&sslmode=require",
            ),
            (
                "postgres://u:p@h/d?Password=x#frag",
                "postgres://u:***@h/d?Password=***#frag",
            ),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("sqlite:///tmp/a@b.db", "sqlite:///tmp/a@b.db"),
            ("127.0.0.1:9092", "127.0.0.1:9092"),
            ("not a url", "not a url"),
            ("svc:pa55@host:4222", "svc:***@host:4222"),
            ("nats://u:p1@h1,nats://u:p2@h2", "nats://u:***@h1,nats://u:***@h2"),
            ("postgres://u:pa/ss?w#rd@h/db", "postgres://u:***@h/db"),
            (
                "invalid type: found string \"nats://svc:pw@h:4222\", expected a sequence",
                "invalid type: found string \"nats://svc:***@h:4222\", expected a sequence",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
