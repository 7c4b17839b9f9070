//! TLS towards Keyspaces: TLS 1.2+, SNI, hostname verification, and trust pinned to the roots
//! Keyspaces documents (never the system store) unless the operator names other roots.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// Amazon Root CA 1, which most Keyspaces endpoints chain to.
pub const AMAZON_ROOT_CA_1: &[u8] = include_bytes!("../../certs/AmazonRootCA1.pem");

/// The roots Keyspaces' connection guide tells clients to trust: Amazon Root CAs 1–4 (Amazon
/// Trust Services, RSA and ECC) and, while Regions migrate from it, Starfield Class 2. From
/// Debian's ca-certificates; their fingerprints are pinned in a test.
pub const KEYSPACES_ROOTS: &[(&str, &[u8])] = &[
    ("Amazon Root CA 1", AMAZON_ROOT_CA_1),
    (
        "Amazon Root CA 2",
        include_bytes!("../../certs/AmazonRootCA2.pem"),
    ),
    (
        "Amazon Root CA 3",
        include_bytes!("../../certs/AmazonRootCA3.pem"),
    ),
    (
        "Amazon Root CA 4",
        include_bytes!("../../certs/AmazonRootCA4.pem"),
    ),
    (
        "Starfield Class 2 Certification Authority",
        include_bytes!("../../certs/StarfieldClass2CA.pem"),
    ),
];

/// Which built-in roots to trust (`--ca-file` replaces them all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinRoots {
    /// Every root Keyspaces documents (Amazon Root CAs 1–4, Starfield Class 2).
    #[default]
    Keyspaces,
    /// Amazon Root CA 1 alone, for operators who want the narrowest trust.
    #[value(name = "amazon-root-ca-1")]
    #[serde(rename = "amazon-root-ca-1")]
    AmazonRootCa1,
}

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

fn certificates(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::CaFile {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificates(origin.to_owned()));
    }
    Ok(certs)
}

/// The roots to trust: those in `ca_file`, or the built-in ones `builtin` chooses.
pub fn roots(
    ca_file: Option<&Path>,
    builtin: BuiltinRoots,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsConfigError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            certificates(&pem, &path.display().to_string())
        }
        None => {
            let chosen = match builtin {
                BuiltinRoots::Keyspaces => KEYSPACES_ROOTS,
                BuiltinRoots::AmazonRootCa1 => &KEYSPACES_ROOTS[..1],
            };
            let mut all = Vec::new();
            for (name, pem) in chosen {
                all.extend(certificates(pem, name)?);
            }
            Ok(all)
        }
    }
}

/// A client config trusting the Keyspaces roots, or only the roots in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    client_config_with(ca_file, BuiltinRoots::Keyspaces)
}

/// [`client_config`] with a choice of built-in roots.
pub fn client_config_with(
    ca_file: Option<&Path>,
    builtin: BuiltinRoots,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for cert in roots(ca_file, builtin)? {
        store.add(cert)?;
    }
    // An explicit provider: `ClientConfig::builder()` panics when two providers are linked in.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name of the root in `roots` that `chain` (leaf first, as the server sent it) verifies
/// against: the trust anchor of the path the verifier builds, signatures checked — not a guess
/// from names, which a server could steer by appending a certificate. `None` if no path.
pub fn anchor_name(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (leaf, intermediates) = chain.split_first()?;
    let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let path = leaf
        .verify_for_usage(
            algorithms,
            &anchors,
            intermediates,
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .ok()?;
    let anchor = path.anchor();
    let index = anchors.iter().position(|a| {
        a.subject.as_ref() == anchor.subject.as_ref()
            && a.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
    })?;
    let (_, root) = X509Certificate::from_der(roots.get(index)?.as_ref()).ok()?;
    let subject = root.subject();
    let cn = subject.iter_common_name().next();
    let ou = subject.iter_organizational_unit().next();
    Some(
        cn.or(ou)
            .and_then(|a| a.as_str().ok())
            .map_or_else(|| subject.to_string(), str::to_owned),
    )
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsConfigError::ServerName(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// Exactly the roots Keyspaces documents, checked against the SHA-256 fingerprints AWS
    /// publishes (not against the files they came from).
    #[test]
    fn built_in_roots_are_the_documented_set() {
        let fingerprints: Vec<String> = roots(None, BuiltinRoots::Keyspaces)
            .unwrap()
            .iter()
            .map(|c| hex::encode(Sha256::digest(c.as_ref())))
            .collect();
        assert_eq!(
            fingerprints,
            [
                "8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e",
                "1ba5b2aa8c65401a82960118f80bec4f62304d83cec4713a19c39c011ea46db4",
                "18ce6cfe7bf14e60b2e347b8dfe868cb31d02ebb3ada271569f50343b46db3a4",
                "e35d28419ed02025cfa69038cd623962458da5c695fbdea3c22b0bfb25897092",
                "1465fa205397b876faa6f0a9958e5590e40fcc7faa4fb7c2c8677521fb5fb658",
            ]
        );
        let strict = roots(None, BuiltinRoots::AmazonRootCa1).unwrap();
        assert_eq!(strict.len(), 1);
        assert_eq!(
            hex::encode(Sha256::digest(strict[0].as_ref())),
            fingerprints[0]
        );
        client_config(None).unwrap();
        client_config_with(None, BuiltinRoots::AmazonRootCa1).unwrap();
    }

    /// Found by review: naming the root from the chain's last certificate let a server steer
    /// the name by appending one. The name is the verified path's anchor: a chain under one
    /// root, with a decoy naming another appended, is named by the root it verifies against.
    #[test]
    fn a_chain_is_named_by_the_root_it_verifies_against() {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let root = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert.der().clone(), Issuer::new(p, key))
        };
        let (one, one_issuer) = root("Amazon Root CA 1");
        let (three, three_issuer) = root("Amazon Root CA 3");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["cassandra.us-east-1.amazonaws.com".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &one_issuer)
            .unwrap();
        // A decoy: issued by "Amazon Root CA 3", appended as the chain's last certificate.
        let decoy = CertificateParams::new(vec!["decoy".to_owned()])
            .unwrap()
            .signed_by(&KeyPair::generate().unwrap(), &three_issuer)
            .unwrap();
        let roots = [three.clone(), one.clone()];
        let chain = [leaf.der().clone(), decoy.der().clone()];
        assert_eq!(
            anchor_name(&chain, &roots).as_deref(),
            Some("Amazon Root CA 1")
        );
        assert_eq!(anchor_name(&chain, &roots[..1]), None, "no path, no name");
    }

    #[test]
    fn the_strict_choice_is_spelled_as_documented() {
        use clap::ValueEnum;
        assert_eq!(
            BuiltinRoots::from_str("amazon-root-ca-1", false),
            Ok(BuiltinRoots::AmazonRootCa1)
        );
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
