//! [`TestPki`]: a throwaway certificate authority, a server certificate for
//! `127.0.0.1` and `localhost`, and a client certificate, written as PEM
//! files (generated with `rcgen`) for servers and clients under test.

use std::path::{Path, PathBuf};

use eventbus_core::{Error, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority and two leaf certificates it signed, as PEM
/// files in a temporary directory removed on `Drop`.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Generates the CA (`ca.pem`), the server's certificate and key
    /// (`server.pem`, `server-key.pem`; subject alternative names
    /// `127.0.0.1` and `localhost`) and the client's (`client.pem`,
    /// `client-key.pem`, common name `eventbus-client`).
    ///
    /// # Errors
    /// `Config` when generating or writing fails.
    pub fn generate() -> Result<Self> {
        let dir = super::server::temp_dir()?;
        let fail = |e: rcgen::Error| Error::config("cannot generate test certificates").with_source(e);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "eventbus test CA");
        let ca_key = KeyPair::generate().map_err(fail)?;
        let ca = ca_params.self_signed(&ca_key).map_err(fail)?;
        let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
            let mut params = CertificateParams::new(names).map_err(fail)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().map_err(fail)?;
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(fail)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "localhost")?;
        let (client, client_key) = leaf(vec!["eventbus-client".into()], "eventbus-client")?;
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
        ] {
            std::fs::write(dir.path().join(name), pem)
                .map_err(|e| Error::config(format!("cannot write {name}")).with_source(e))?;
        }
        Ok(Self { dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// The server certificate (PEM), for `127.0.0.1` and `localhost`.
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }

    /// The server's private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.file("server-key.pem")
    }

    /// The client certificate (PEM).
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }

    /// The client's private key (PEM).
    pub fn client_key(&self) -> PathBuf {
        self.file("client-key.pem")
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
