//! TLS towards Keyspaces: TLS 1.2+, SNI, hostname verification, and trust pinned to Amazon Root
//! CA 1 unless the operator names other roots.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// Amazon Root CA 1, which every Keyspaces endpoint chains to.
pub const AMAZON_ROOT_CA_1: &[u8] = include_bytes!("../../certs/AmazonRootCA1.pem");

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("CA file {0} holds no certificate")]
    NoCertificates(String),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

fn roots_from_pem(pem: &[u8], origin: &str) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsConfigError::CaFile {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoCertificates(origin.to_owned()));
    }
    Ok(roots)
}

/// A client config trusting the built-in root, or only the roots in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let roots = match ca_file {
        None => roots_from_pem(AMAZON_ROOT_CA_1, "built-in Amazon Root CA 1")?,
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsConfigError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            roots_from_pem(&pem, &path.display().to_string())?
        }
    };
    // An explicit provider: `ClientConfig::builder()` panics when two providers are linked in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsConfigError::ServerName(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn built_in_root_is_amazon_root_ca_1() {
        let cert = CertificateDer::pem_slice_iter(AMAZON_ROOT_CA_1)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(cert.as_ref())),
            "8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e"
        );
        client_config(None).unwrap();
    }

    #[test]
    fn missing_or_empty_ca_file_is_an_error() {
        assert!(client_config(Some(Path::new("/nonexistent/ca.pem"))).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "").unwrap();
        assert!(matches!(
            client_config(Some(&p)),
            Err(TlsConfigError::NoCertificates(_))
        ));
    }
}
