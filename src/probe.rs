//! `keyspaces-proxy probe`: a health check that needs nothing but the binary, for distroless
//! images (Docker HEALTHCHECK, ECS container health checks) where there is no shell or curl.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

/// Where to reach a server bound to `listen`: an unspecified address means this host.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The HTTP status code of a response's first line.
pub fn status_of(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.take(64 * 1024).read_to_end(&mut out)?;
    Ok(out)
}

pub fn run(metrics_listen: SocketAddr, path: &str) -> ExitCode {
    let addr = target(metrics_listen);
    match get(addr, path).map(|r| status_of(&r)) {
        Ok(Some(200)) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("keyspaces-proxy probe: http://{addr}{path} answered {status:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("keyspaces-proxy probe: http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        assert_eq!(
            target("0.0.0.0:9464".parse().unwrap()),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            target("[::]:9464".parse().unwrap()),
            "[::1]:9464".parse().unwrap()
        );
        assert_eq!(
            target("127.0.0.2:1".parse().unwrap()),
            "127.0.0.2:1".parse().unwrap()
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n\r\nok"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"garbage"), None);
        assert_eq!(status_of(b""), None);
    }
}
