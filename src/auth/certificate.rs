//! The client identity a verified client certificate carries (`--client-auth mtls`): the name
//! `--identity-roles` maps to a role, so it is read the same way on every connection and only
//! from the fields the operator chose.
//!
//! The certificate has already been verified against `--client-ca` by rustls; this only reads
//! it. A field that is present but unusable (not UTF-8, control characters, too long) makes the
//! certificate name no identity rather than falling through to a weaker field.
//!
//! Each field has a namespace of its own, so a CA that lets requesters choose a free-form common
//! name cannot mint someone else's SPIFFE ID or DNS identity: a URI SAN is the identity as it is
//! (`spiffe://example.org/ns/prod/sa/orders`; it must have a `scheme://`), a DNS SAN becomes
//! `dns:orders.prod.svc` and a common name `cn:orders`.

use clap::ValueEnum;
use serde::Serialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where a client certificate's identity is read from, tried in the configured order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityField {
    /// The URI subject alternative name (a SPIFFE ID such as spiffe://example.org/ns/app/sa/app);
    /// a certificate with several is ambiguous and names no identity.
    UriSan,
    /// The first DNS subject alternative name, as `dns:<name>`.
    DnsSan,
    /// The subject's common name, as `cn:<name>` (a certificate with several is ambiguous).
    Cn,
}

/// The default order: SPIFFE IDs first, then DNS names, then the legacy common name.
pub const DEFAULT_ORDER: &[IdentityField] = &[
    IdentityField::UriSan,
    IdentityField::DnsSan,
    IdentityField::Cn,
];

/// Longer identities are refused: they become log fields, metric-free map keys and role
/// session names, and no real SPIFFE ID or host name comes close.
pub const MAX_IDENTITY: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateIdentityError {
    #[error("the client certificate cannot be parsed")]
    Unparsable,
    #[error("the client certificate has several {0} values: its identity is ambiguous")]
    Ambiguous(&'static str),
    #[error("the client certificate's {0} is not a usable identity")]
    Unusable(&'static str),
    #[error("the client certificate has none of the identity fields the proxy reads ({0})")]
    Missing(String),
}

impl IdentityField {
    fn name(self) -> &'static str {
        match self {
            IdentityField::UriSan => "URI SAN",
            IdentityField::DnsSan => "DNS SAN",
            IdentityField::Cn => "CN",
        }
    }
}

/// The identity of the end-entity certificate `der`: the first field in `order` it has.
pub fn identity(der: &[u8], order: &[IdentityField]) -> Result<String, CertificateIdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| CertificateIdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CertificateIdentityError::Unparsable)?;
    let names: &[GeneralName] = san.as_ref().map_or(&[], |s| &s.value.general_names);
    for &field in order {
        let values: Vec<&str> = match field {
            IdentityField::UriSan => names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
            IdentityField::DnsSan => names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .take(1)
                .collect(),
            IdentityField::Cn => {
                let mut cns = Vec::new();
                for cn in cert.subject().iter_common_name() {
                    cns.push(
                        cn.as_str()
                            .map_err(|_| CertificateIdentityError::Unusable(field.name()))?,
                    );
                }
                cns
            }
        };
        match values.as_slice() {
            [] => continue,
            [one] => return spelled(one, field),
            _ => return Err(CertificateIdentityError::Ambiguous(field.name())),
        }
    }
    let tried: Vec<&str> = order.iter().map(|f| f.name()).collect();
    Err(CertificateIdentityError::Missing(tried.join(", ")))
}

/// The identity `value` names as `field`, in that field's namespace.
fn spelled(value: &str, field: IdentityField) -> Result<String, CertificateIdentityError> {
    let unusable = || CertificateIdentityError::Unusable(field.name());
    let printable = !value.is_empty()
        && value.len() <= MAX_IDENTITY
        && !value.chars().any(|c| c.is_control() || c.is_whitespace());
    if !printable {
        return Err(unusable());
    }
    match field {
        // `dns://…` or `cn://…` would read like the other namespaces' prefixes.
        IdentityField::UriSan => {
            // RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), so no `:` in it
            // (`cn:x://…` is not a scheme followed by `://`).
            let shaped = value.split_once("://").is_some_and(|(scheme, rest)| {
                let mut chars = scheme.chars();
                chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                    && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    && !rest.is_empty()
                    && !scheme.eq_ignore_ascii_case("dns")
                    && !scheme.eq_ignore_ascii_case("cn")
            });
            shaped.then(|| value.to_owned()).ok_or_else(unusable)
        }
        IdentityField::DnsSan => {
            let hostname = value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            hostname
                .then(|| format!("dns:{value}"))
                .ok_or_else(unusable)
        }
        IdentityField::Cn => Ok(format!("cn:{value}")),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn cert(cn: &[&str], sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let [cn] = cn {
            params.distinguished_name.push(DnType::CommonName, *cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn dns(d: &str) -> SanType {
        SanType::DnsName(d.try_into().unwrap())
    }

    #[test]
    fn the_first_configured_field_present_wins() {
        let der = cert(
            &["orders-cn"],
            vec![
                dns("orders.prod.svc"),
                uri("spiffe://example.org/ns/prod/sa/orders"),
            ],
        );
        assert_eq!(
            identity(&der, DEFAULT_ORDER).unwrap(),
            "spiffe://example.org/ns/prod/sa/orders"
        );
        assert_eq!(
            identity(&der, &[IdentityField::DnsSan, IdentityField::UriSan]).unwrap(),
            "dns:orders.prod.svc"
        );
        assert_eq!(
            identity(&der, &[IdentityField::Cn]).unwrap(),
            "cn:orders-cn"
        );
        let cn_only = cert(&["legacy"], vec![]);
        assert_eq!(identity(&cn_only, DEFAULT_ORDER).unwrap(), "cn:legacy");
    }

    /// A requester who may choose its common name cannot take a SPIFFE ID's or a DNS name's
    /// identity: each field names identities of its own.
    #[test]
    fn fields_have_namespaces_of_their_own() {
        let spiffe = "spiffe://example.org/ns/prod/sa/orders";
        let cn = cert(&[spiffe], vec![]);
        assert_eq!(
            identity(&cn, DEFAULT_ORDER).unwrap(),
            format!("cn:{spiffe}")
        );
        let cn = cert(&["orders.prod.svc"], vec![]);
        assert_eq!(identity(&cn, DEFAULT_ORDER).unwrap(), "cn:orders.prod.svc");
        for spelling in [
            "dns://orders.prod.svc",
            "DNS://orders",
            "cn:legacy://orders",
            "1x://a",
        ] {
            let uri = cert(&[], vec![uri(spelling)]);
            assert!(identity(&uri, DEFAULT_ORDER).is_err(), "{spelling}");
        }
    }

    #[test]
    fn a_field_the_operator_did_not_choose_is_never_read() {
        let der = cert(&["admin"], vec![]);
        assert!(matches!(
            identity(&der, &[IdentityField::UriSan, IdentityField::DnsSan]),
            Err(CertificateIdentityError::Missing(_))
        ));
    }

    #[test]
    fn ambiguous_or_unusable_values_name_no_identity() {
        let two = cert(&[], vec![uri("spiffe://a/x"), uri("spiffe://a/y")]);
        assert_eq!(
            identity(&two, DEFAULT_ORDER),
            Err(CertificateIdentityError::Ambiguous("URI SAN"))
        );
        // A forged log line or role key must not come from a certificate's common name, and an
        // unusable URI does not fall through to the DNS name.
        let newline = cert(&["app\nINFO forged"], vec![]);
        assert_eq!(
            identity(&newline, DEFAULT_ORDER),
            Err(CertificateIdentityError::Unusable("CN"))
        );
        let long = "x".repeat(MAX_IDENTITY + 1);
        let too_long = cert(&[], vec![uri(&format!("spiffe://{long}")), dns("fallback")]);
        assert_eq!(
            identity(&too_long, DEFAULT_ORDER),
            Err(CertificateIdentityError::Unusable("URI SAN"))
        );
        let wildcard = cert(&[], vec![dns("*.prod.svc")]);
        assert_eq!(
            identity(&wildcard, DEFAULT_ORDER),
            Err(CertificateIdentityError::Unusable("DNS SAN"))
        );
        let no_scheme = cert(&[], vec![uri("orders"), dns("fallback")]);
        assert_eq!(
            identity(&no_scheme, DEFAULT_ORDER),
            Err(CertificateIdentityError::Unusable("URI SAN"))
        );
        assert_eq!(
            identity(b"not a certificate", DEFAULT_ORDER),
            Err(CertificateIdentityError::Unparsable)
        );
    }
}
