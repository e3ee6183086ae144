//! What the relay decides from a request's headers before routing it: the
//! client's address behind trusted proxies, and browser origins (CORS).
//! Pure functions over headers; `server.rs` applies them.

use std::net::IpAddr;

use ipnet::IpNet;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::protocol::{CLAIM_HEADER, OPERATOR_HEADER};

/// Which header a trusted proxy writes the client's address into. The
/// operator names one: a proxy passes the other through as the client sent
/// it, so believing both would let a client choose its own address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx, HAProxy and Caddy by default).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

/// The client's address. A request straight from a client is counted against
/// its TCP peer. A request through a peer in `trusted` is counted against the
/// nearest address in `header`, walking from the right, that is not itself
/// a trusted proxy; a header that names nobody else leaves the peer. An
/// untrusted peer's headers are ignored: anyone can write them. IPv4 addresses
/// written as IPv6 (`::ffff:a.b.c.d`) count as IPv4.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect()
    };
    let chain: Vec<Option<IpAddr>> = match header {
        ForwardedHeader::XForwardedFor => values("x-forwarded-for")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|entry| parse_node(entry.trim()))
            .collect(),
        ForwardedHeader::Forwarded => values("forwarded")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .find(|(key, _)| key.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| parse_node(value.trim()))
            })
            .collect(),
    };
    for hop in chain.iter().rev() {
        match hop.map(|ip| ip.to_canonical()) {
            Some(ip) if is_trusted(&ip) => {}
            Some(ip) => return ip,
            // An entry we cannot read ("unknown", a hidden name): stop, and
            // count against the proxy rather than believe anything further left.
            None => return peer,
        }
    }
    peer
}

/// An address as `Forwarded` or `X-Forwarded-For` write it: `192.0.2.1`,
/// `192.0.2.1:4711`, `"[2001:db8::1]:4711"`, `2001:db8::1`.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim_matches('"');
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    text.rsplit_once(':')?.0.parse().ok()
}

/// An allowed browser origin as the relay compares it: `scheme://host[:port]`,
/// lower case, without a trailing slash or a default port. Refuses `*`, paths
/// and other schemes with a message for the operator.
pub fn normalize_origin(origin: &str) -> Result<String, String> {
    let trimmed = origin.trim().trim_end_matches('/');
    if trimmed == "*" {
        return Err(
            "--allowed-origin \"*\" would let every web page act for its visitors' devices; list each origin, like https://app.example.org".into(),
        );
    }
    let lower = trimmed.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(|| {
        format!("--allowed-origin {origin:?} is not an origin like https://app.example.org")
    })?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "--allowed-origin {origin:?}: only http:// and https:// origins exist for browsers"
        ));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "--allowed-origin {origin:?}: an origin is scheme://host[:port], without a path"
        ));
    }
    let default_port = if scheme == "http" { ":80" } else { ":443" };
    let host = rest.strip_suffix(default_port).unwrap_or(rest);
    Ok(format!("{scheme}://{host}"))
}

/// What to do with a request's `Origin`, given the allowed (normalised) ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin` header: a native client. Nothing to add.
    Native,
    /// An allowed origin: answer, with CORS headers naming it.
    Allowed(HeaderValue),
    /// A page of another origin: refuse (and log it).
    Refused(String),
}

/// Checks a request's `Origin` header.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> OriginCheck {
    let Some(origin) = headers.get("origin") else {
        return OriginCheck::Native;
    };
    let text = origin.to_str().unwrap_or("");
    match normalize_origin(text) {
        Ok(normal) if allowed.contains(&normal) => OriginCheck::Allowed(origin.clone()),
        _ => OriginCheck::Refused(text.chars().take(200).collect()),
    }
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key("access-control-request-method")
}

/// The answer to an allowed preflight: the methods and headers the relay's
/// routes use, cacheable for 10 minutes.
pub fn preflight(origin: HeaderValue) -> warp::reply::Response {
    let mut response = warp::reply::Response::new(Vec::new().into());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let h = response.headers_mut();
    h.insert("access-control-allow-origin", origin);
    h.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("GET, POST, DELETE"),
    );
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_str(&format!(
            "authorization, content-type, {CLAIM_HEADER}, {OPERATOR_HEADER}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("authorization, content-type")),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("600"));
    h.insert("vary", HeaderValue::from_static("origin"));
    response
}

/// Adds the CORS headers for an allowed origin to an answer.
pub fn allow(response: &mut warp::reply::Response, origin: HeaderValue) {
    let h = response.headers_mut();
    h.insert("access-control-allow-origin", origin);
    h.insert("vary", HeaderValue::from_static("origin"));
}

/// Marks an answer as depending on `Origin` (so that no cache in front of
/// the relay serves one origin's answer to another).
pub fn vary(response: &mut warp::reply::Response) {
    response
        .headers_mut()
        .insert("vary", HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn forwarded_addresses_count_only_through_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let xff = ForwardedHeader::XForwardedFor;
        let list = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.9")]);
        assert_eq!(
            client_ip(proxy, &list, &trusted, xff),
            client,
            "rightmost untrusted hop"
        );
        assert_eq!(
            client_ip(client, &list, &trusted, xff),
            client,
            "an untrusted peer's header is ignored"
        );
        let fwd = headers(&[(
            "forwarded",
            "for=198.51.100.1, for=\"[2001:db8::1]:4711\";proto=https",
        )]);
        assert_eq!(
            client_ip(proxy, &fwd, &trusted, ForwardedHeader::Forwarded),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // A client's own Forwarded header, passed through by a proxy that
        // writes X-Forwarded-For, is not believed.
        let both = headers(&[
            ("forwarded", "for=192.0.2.66"),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(client_ip(proxy, &both, &trusted, xff), client);
        let unknown = headers(&[("x-forwarded-for", "203.0.113.7, unknown")]);
        assert_eq!(client_ip(proxy, &unknown, &trusted, xff), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted, xff), proxy);
        let ported = headers(&[("x-forwarded-for", "203.0.113.7:5555")]);
        assert_eq!(client_ip(proxy, &ported, &trusted, xff), client);
        // A proxy reaching a dual-stack listener as ::ffff:10.0.0.5 is trusted.
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(client_ip(mapped, &list, &trusted, xff), client);
    }

    #[test]
    fn origins_are_normalised_and_star_is_refused() {
        assert_eq!(
            normalize_origin("https://App.example.org/").unwrap(),
            "https://app.example.org"
        );
        assert_eq!(normalize_origin("http://host:80").unwrap(), "http://host");
        assert_eq!(
            normalize_origin("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(
            normalize_origin("*")
                .unwrap_err()
                .contains("every web page")
        );
        assert!(normalize_origin("https://a.example/path").is_err());
        assert!(normalize_origin("ftp://a.example").is_err());
        assert!(normalize_origin("a.example").is_err());
        let allowed = vec!["https://app.example.org".to_owned()];
        assert!(matches!(
            check_origin(&headers(&[("origin", "https://app.example.org")]), &allowed),
            OriginCheck::Allowed(_)
        ));
        assert!(matches!(
            check_origin(&headers(&[("origin", "https://evil.example")]), &allowed),
            OriginCheck::Refused(_)
        ));
        assert_eq!(
            check_origin(&HeaderMap::new(), &allowed),
            OriginCheck::Native
        );
    }
}
