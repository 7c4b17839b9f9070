//! TLS and mutual TLS on the client port, with certificates from a throwaway CA: who gets in,
//! who does not, and what a plaintext client is told.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::cql::messages::{self, ErrorInfo};
use common::cql::{error_code, opcode, Codec, Frame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use keyspaces_proxy::auth::certificate::{IdentityField, DEFAULT_ORDER};
use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
use keyspaces_proxy::client_tls::{server_config, ClientTlsFiles};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate signed by `ca`: (PEM chain, PEM key).
fn leaf(ca: &Ca, cn: Option<&str>, sans: Vec<SanType>) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.subject_alt_names = sans;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The proxy's TLS: a server certificate for localhost from `ca`, clients verified against
/// `client_ca` when given.
fn proxy_tls(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    let (chain, key) = leaf(
        ca,
        None,
        vec![SanType::DnsName("localhost".try_into().unwrap())],
    );
    let cert = write(dir, "proxy.pem", &chain);
    let key = write(dir, "proxy.key", &key);
    let client_ca = client_ca.map(|c| write(dir, "client-ca.pem", &c.cert.pem()));
    server_config(ClientTlsFiles {
        cert: &cert,
        key: &key,
        client_ca: client_ca.as_deref(),
    })
    .unwrap()
}

type TlsClient = Framed<TlsStream<TcpStream>, Codec>;

fn client_config(server_ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    server_ca: &Ca,
    identity: Option<&(String, String)>,
) -> std::io::Result<TlsClient> {
    connect_with(addr, client_config(server_ca, identity)).await
}

async fn connect_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Ok(Framed::new(tls, Codec::default()))
}

/// Sends `f` and waits for the reply; `None` if the connection failed or closed.
async fn call(c: &mut TlsClient, f: Frame) -> Option<Frame> {
    c.send(f).await.ok()?;
    match tokio::time::timeout(std::time::Duration::from_secs(10), c.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(_) => None,
        Err(_) => panic!("no reply within 10 s"),
    }
}

fn startup(stream: i16) -> Frame {
    messages::startup(4, stream, &[("CQL_VERSION", "3.0.0")])
}

fn spiffe(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

/// A proxy requiring client certificates from a client CA, reading the identity from
/// `fields`: its address, the CA its own certificate chains to, and the client CA. The
/// emulator and directory live as long as the returned guard.
async fn mtls_proxy(
    fields: Vec<IdentityField>,
) -> (
    SocketAddr,
    Ca,
    Ca,
    (tempfile::TempDir, keyspaces_emulator::Emulator),
) {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let (server_ca, client_ca) = (ca("proxy CA"), ca("client CA"));
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_tls = Some(proxy_tls(dir.path(), &server_ca, Some(&client_ca)));
    opts.client_auth = ClientAuth::Certificate(fields);
    let addr = proxy(&emu, opts).await;
    (addr, server_ca, client_ca, (dir, emu))
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let (addr, server_ca, client_ca, _guard) = mtls_proxy(DEFAULT_ORDER.to_vec()).await;
    let stranger_ca = ca("stranger");

    let orders = leaf(
        &client_ca,
        Some("orders"),
        vec![spiffe("spiffe://test/ns/prod/sa/orders")],
    );
    let mut c = tls_connect(addr, &server_ca, Some(&orders)).await.unwrap();
    let r = call(&mut c, startup(0))
        .await
        .expect("an answer to STARTUP");
    assert_eq!(r.opcode(), opcode::READY, "{:?}", ErrorInfo::parse(&r.body));
    let rows = call(
        &mut c,
        messages::query(4, 1, "SELECT key FROM system.local", 6),
    )
    .await
    .unwrap();
    assert_eq!(
        rows.opcode(),
        opcode::RESULT,
        "{:?}",
        ErrorInfo::parse(&rows.body)
    );

    // No certificate, or one from another CA: no CQL at all. (TLS 1.3 may finish the client's
    // side of the handshake before the server refuses; the first exchange fails then.)
    for identity in [
        None,
        Some(leaf(
            &stranger_ca,
            Some("orders"),
            vec![spiffe("spiffe://test/ns/prod/sa/orders")],
        )),
    ] {
        if let Ok(mut c) = tls_connect(addr, &server_ca, identity.as_ref()).await {
            assert!(call(&mut c, startup(0)).await.is_none(), "refused");
        }
    }
}

#[tokio::test]
async fn a_certificate_without_the_chosen_identity_field_is_refused() {
    let (addr, server_ca, client_ca, _guard) = mtls_proxy(vec![IdentityField::UriSan]).await;

    let cn_only = leaf(&client_ca, Some("admin"), vec![]);
    let mut c = tls_connect(addr, &server_ca, Some(&cn_only)).await.unwrap();
    let r = call(&mut c, startup(3)).await.expect("an answer");
    let e = error_of(&r);
    assert_eq!((e.code, r.stream()), (error_code::BAD_CREDENTIALS, 3));
    assert!(e.message.contains("URI SAN"), "{}", e.message);
    assert!(
        call(&mut c, startup(4)).await.is_none(),
        "closed after the refusal"
    );
}

#[tokio::test]
async fn passwords_over_tls_and_plaintext_clients_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let server_ca = ca("proxy CA");
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_tls = Some(proxy_tls(dir.path(), &server_ca, None));
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:app-pw\n").unwrap());
    let addr = proxy(&emu, opts).await;

    let mut c = tls_connect(addr, &server_ca, None).await.unwrap();
    let a = call(&mut c, startup(0)).await.unwrap();
    assert_eq!(a.opcode(), opcode::AUTHENTICATE);
    let ok = call(
        &mut c,
        messages::auth_response(4, 1, &messages::plain_token("app", "app-pw")),
    )
    .await
    .unwrap();
    assert_eq!(ok.opcode(), opcode::AUTH_SUCCESS);

    // A driver without TLS gets a CQL error on its own stream, not a silent close.
    let mut plain = Client::connect(addr).await;
    let r = plain.call(startup(7)).await;
    let e = error_of(&r);
    assert_eq!((e.code, r.stream()), (error_code::PROTOCOL_ERROR, 7));
    assert!(e.message.contains("requires TLS"), "{}", e.message);
    assert!(plain.recv().await.is_none(), "closed after the error");
}

/// A resumed TLS session skips certificate verification: an expired client certificate would
/// keep its identity. Every connection does a full handshake.
#[tokio::test]
async fn client_sessions_are_never_resumed() {
    let (addr, server_ca, client_ca, _guard) = mtls_proxy(DEFAULT_ORDER.to_vec()).await;
    let orders = leaf(
        &client_ca,
        None,
        vec![spiffe("spiffe://test/ns/prod/sa/orders")],
    );
    // One client config, so its session cache would offer resumption the second time.
    let config = client_config(&server_ca, Some(&orders));
    for _ in 0..2 {
        let mut c = connect_with(addr, config.clone()).await.unwrap();
        let r = call(&mut c, startup(0)).await.expect("READY");
        assert_eq!(r.opcode(), opcode::READY);
        assert_eq!(
            c.get_ref().get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
}
