//! The emulator's TLS identity: a test CA and a server certificate for the Keyspaces endpoint
//! name and the loopback addresses, created once in a state directory and reused afterwards.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::EmulatorError;

pub struct TlsMaterial {
    /// The CA that signed the server certificate: what clients must trust.
    pub ca_pem: PathBuf,
    pub server_config: Arc<ServerConfig>,
}

fn err(e: impl std::fmt::Display) -> EmulatorError {
    EmulatorError::Tls(e.to_string())
}

/// The names the server certificate covers: the regional endpoint (KEYSPACES.md, "Endpoints"),
/// localhost and every address the emulator answers on.
pub fn subject_alt_names(region: &str, addresses: &[IpAddr]) -> Vec<String> {
    let mut names = vec![
        format!("cassandra.{region}.amazonaws.com"),
        "localhost".to_owned(),
    ];
    names.extend(addresses.iter().map(|a| a.to_string()));
    names
}

fn write(path: &Path, contents: &str) -> Result<(), EmulatorError> {
    std::fs::write(path, contents).map_err(|e| err(format!("{}: {e}", path.display())))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The CA's parameters. They are rebuilt rather than parsed back from ca.pem: with the same
/// name and the stored key, certificates issued later chain to the stored CA certificate.
fn ca_params() -> Result<CertificateParams, EmulatorError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
        .distinguished_name
        .push(DnType::CommonName, "keyspaces-emulator test CA");
    Ok(params)
}

/// A stand-in for one of the roots Keyspaces documents (KEYSPACES.md, "TLS"): the same subject,
/// and the same key type where the test PKI can make one (rcgen on ring makes no RSA keys: the
/// RSA roots' stand-ins are ECDSA). The server's chain then runs leaf → intermediate → this
/// root, as a real endpoint's does (ASSUMPTION: KEYSPACES.md names only the roots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    AmazonRootCa1,
    AmazonRootCa2,
    AmazonRootCa3,
    AmazonRootCa4,
    StarfieldClass2,
}

impl RootKind {
    pub const ALL: [RootKind; 5] = [
        RootKind::AmazonRootCa1,
        RootKind::AmazonRootCa2,
        RootKind::AmazonRootCa3,
        RootKind::AmazonRootCa4,
        RootKind::StarfieldClass2,
    ];

    pub fn parse(s: &str) -> Option<RootKind> {
        RootKind::ALL.into_iter().find(|k| k.slug() == s)
    }

    pub fn slug(self) -> &'static str {
        match self {
            RootKind::AmazonRootCa1 => "amazon-root-ca-1",
            RootKind::AmazonRootCa2 => "amazon-root-ca-2",
            RootKind::AmazonRootCa3 => "amazon-root-ca-3",
            RootKind::AmazonRootCa4 => "amazon-root-ca-4",
            RootKind::StarfieldClass2 => "starfield-class-2",
        }
    }

    fn params(
        self,
    ) -> Result<(CertificateParams, &'static rcgen::SignatureAlgorithm), EmulatorError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = rcgen::DistinguishedName::new();
        let dn = &mut params.distinguished_name;
        dn.push(DnType::CountryName, "US");
        let (cn, algorithm) = match self {
            RootKind::StarfieldClass2 => {
                dn.push(DnType::OrganizationName, "Starfield Technologies, Inc.");
                dn.push(
                    DnType::OrganizationalUnitName,
                    "Starfield Class 2 Certification Authority",
                );
                return Ok((params, &rcgen::PKCS_ECDSA_P256_SHA256));
            }
            RootKind::AmazonRootCa1 => ("Amazon Root CA 1", &rcgen::PKCS_ECDSA_P256_SHA256),
            RootKind::AmazonRootCa2 => ("Amazon Root CA 2", &rcgen::PKCS_ECDSA_P384_SHA384),
            RootKind::AmazonRootCa3 => ("Amazon Root CA 3", &rcgen::PKCS_ECDSA_P256_SHA256),
            RootKind::AmazonRootCa4 => ("Amazon Root CA 4", &rcgen::PKCS_ECDSA_P384_SHA384),
        };
        dn.push(DnType::OrganizationName, "Amazon");
        dn.push(DnType::CommonName, cn);
        Ok((params, algorithm))
    }
}

/// A fresh chain under a stand-in for `kind` (kept in memory; the root is written to `dir` as
/// `root-<kind>.pem`, what clients must trust).
pub fn under_root(
    dir: &Path,
    names: &[String],
    kind: RootKind,
    versions: TlsVersions,
) -> Result<TlsMaterial, EmulatorError> {
    std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let (root_params, algorithm) = kind.params()?;
    let root_key = KeyPair::generate_for(algorithm).map_err(err)?;
    let root = root_params.self_signed(&root_key).map_err(err)?;
    let root_pem_path = dir.join(format!("root-{}.pem", kind.slug()));
    write(&root_pem_path, &root.pem())?;
    let root_issuer = Issuer::new(root_params, root_key);

    let mut middle = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    middle.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    middle.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    middle.distinguished_name.push(
        DnType::CommonName,
        format!("keyspaces-emulator intermediate under {}", kind.slug()),
    );
    let middle_key = KeyPair::generate().map_err(err)?;
    let middle_cert = middle.signed_by(&middle_key, &root_issuer).map_err(err)?;
    let middle_issuer = Issuer::new(middle, middle_key);

    let leaf_key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, names[0].clone());
    let leaf_cert = leaf.signed_by(&leaf_key, &middle_issuer).map_err(err)?;
    let chain = vec![leaf_cert.der().clone(), middle_cert.der().clone()];
    let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).map_err(err)?;
    Ok(TlsMaterial {
        ca_pem: root_pem_path,
        server_config: server_config(chain, key, versions)?,
    })
}

/// The TLS versions the emulator offers: Keyspaces accepts 1.2 and 1.3 (KEYSPACES.md, "TLS");
/// offering one alone shows how a client fares with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersions {
    Both,
    Tls12,
    Tls13,
}

impl std::str::FromStr for TlsVersions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "both" => Ok(TlsVersions::Both),
            "1.2" => Ok(TlsVersions::Tls12),
            "1.3" => Ok(TlsVersions::Tls13),
            other => Err(format!("{other:?}: expected 1.2, 1.3 or both")),
        }
    }
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    versions: TlsVersions,
) -> Result<Arc<ServerConfig>, EmulatorError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let offered: &[&'static rustls::SupportedProtocolVersion] = match versions {
        TlsVersions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersions::Tls12 => &[&rustls::version::TLS12],
        TlsVersions::Tls13 => &[&rustls::version::TLS13],
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(offered)
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(err)?;
    Ok(Arc::new(config))
}

/// Loads the CA and certificate from `dir`, creating whichever is missing. The server
/// certificate is re-issued (by the same CA) when the names it must cover change.
///
/// With `expired`, the server certificate is a fresh one (not stored) that expired in 2020.
pub fn load_or_create(
    dir: &Path,
    names: &[String],
    expired: bool,
    versions: TlsVersions,
) -> Result<TlsMaterial, EmulatorError> {
    std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (cert_path, key_path, names_path) = (
        dir.join("server.pem"),
        dir.join("server-key.pem"),
        dir.join("server-names.txt"),
    );
    let wanted_names = names.join("\n");

    let ca_key = match (read(&ca_pem_path), read(&ca_key_path)) {
        (Some(_), Some(k)) => KeyPair::from_pem(&k).map_err(err)?,
        _ => {
            let key = KeyPair::generate().map_err(err)?;
            let cert = ca_params()?.self_signed(&key).map_err(err)?;
            write(&ca_pem_path, &cert.pem())?;
            write(&ca_key_path, &key.serialize_pem())?;
            let _ = std::fs::remove_file(&cert_path);
            key
        }
    };

    let reusable = read(&names_path).as_deref() == Some(wanted_names.as_str());
    let (cert_pem, key_pem) = match (read(&cert_path), read(&key_path)) {
        _ if expired => {
            let issuer = Issuer::new(ca_params()?, ca_key);
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(names.to_vec()).map_err(err)?;
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 2, 1);
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            (cert.pem(), key.serialize_pem())
        }
        (Some(c), Some(k)) if reusable => (c, k),
        _ => {
            let issuer = Issuer::new(ca_params()?, ca_key);
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(names.to_vec()).map_err(err)?;
            params
                .distinguished_name
                .push(DnType::CommonName, names[0].clone());
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            write(&cert_path, &cert.pem())?;
            write(&key_path, &key.serialize_pem())?;
            write(&names_path, &wanted_names)?;
            (cert.pem(), key.serialize_pem())
        }
    };

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(err)?;
    Ok(TlsMaterial {
        ca_pem: ca_pem_path,
        server_config: server_config(chain, key, versions)?,
    })
}
