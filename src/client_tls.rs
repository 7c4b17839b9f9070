//! TLS on the client port (`--client-tls-cert`/`--client-tls-key`), and mutual TLS when
//! `--client-ca` names the roots client certificates must chain to: passwords and kmsauth tokens
//! then never cross the pod network in plaintext.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("client TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("--client-ca: {0}")]
    Verifier(String),
}

/// What the client port's TLS is made of.
#[derive(Debug, Clone, Copy)]
pub struct ClientTlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Roots client certificates must chain to; with it, a client without one is refused.
    pub client_ca: Option<&'a Path>,
}

fn read_error(what: &'static str, path: &Path, reason: impl ToString) -> ClientTlsError {
    ClientTlsError::Read {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(what, path, e))?;
    if certs.is_empty() {
        return Err(ClientTlsError::Empty {
            what,
            path: path.display().to_string(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The server side of client TLS: TLS 1.2 and 1.3 only, the proxy's certificate chain, and
/// with `client_ca` a verifier that requires a client certificate chaining to it.
pub fn server_config(files: ClientTlsFiles<'_>) -> Result<Arc<ServerConfig>, ClientTlsError> {
    let chain = certificates("--client-tls-cert", files.cert)?;
    let key = PrivateKeyDer::from_pem_file(files.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => ClientTlsError::Empty {
            what: "--client-tls-key",
            path: files.key.display().to_string(),
            expected: "PEM private key",
        },
        e => read_error("--client-tls-key", files.key, e),
    })?;
    // An explicit provider, as upstream: `ServerConfig::builder()` panics with two linked in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("--client-ca", path)? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ClientTlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // No session resumption: a resumed session skips certificate verification, so a client
    // certificate that has since expired (or a CA since removed) would keep its identity, and
    // its IAM role, for as long as tickets last. Drivers keep connections for hours; a full
    // handshake per connection costs nothing worth saving.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The first byte of a TLS ClientHello record.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");
        let files = ClientTlsFiles {
            cert: &empty,
            key: &missing,
            client_ca: None,
        };
        let e = server_config(files).unwrap_err().to_string();
        assert!(
            e.contains("--client-tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["proxy.local".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let files = ClientTlsFiles {
            cert: &cert_path,
            key: &missing,
            client_ca: None,
        };
        let e = server_config(files).unwrap_err().to_string();
        assert!(
            e.contains("--client-tls-key") && e.contains("missing.pem"),
            "{e}"
        );

        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let files = ClientTlsFiles {
            cert: &cert_path,
            key: &key_path,
            client_ca: Some(&empty),
        };
        let e = server_config(files).unwrap_err().to_string();
        assert!(e.contains("--client-ca"), "{e}");
        let files = ClientTlsFiles {
            client_ca: Some(&cert_path),
            ..files
        };
        assert!(server_config(files).is_ok());
    }
}
