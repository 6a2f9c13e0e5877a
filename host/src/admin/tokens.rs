//! Who is calling: the operator (the token from `TIDEGATE_ADMIN_TOKEN` or
//! `admin.token_file`) or one tenant (a token issued when the tenant was added).
//!
//! A tenant token reads `tgt:<pipeline>.<tenant>:<64 hex digits>`: it names its tenant, so
//! a valid token used on another tenant is refused as such (403), not as unknown (401).
//! Only its SHA-256 is stored; tokens are compared as digests, in constant time.

use std::io::Read;

use super::store::sha256_hex;

/// The caller of one request, once its token is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator: everything.
    Operator,
    /// One tenant (its unit id): its own plugins, status and dead letters only.
    Tenant(String),
}

impl Caller {
    /// Whether this caller may act on tenant `id`'s plugins, status and dead letters.
    pub fn may_use(&self, id: &str) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(own) => own == id,
        }
    }
}

/// A new tenant token for unit `id`.
pub fn issue(id: &str) -> Result<String, String> {
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(|err| format!("cannot read random bytes for a token: {err}"))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("tgt:{id}:{hex}"))
}

/// The tenant a token claims to belong to (unchecked).
pub fn claimed_tenant(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("tgt:")?;
    let (id, secret) = rest.rsplit_once(':')?;
    (secret.len() == 64).then_some(id)
}

/// The stored form of a token.
pub fn digest(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// Whether `token` hashes to `stored`, compared without an early exit.
pub fn matches(token: &str, stored: &str) -> bool {
    let (a, b) = (digest(token), stored);
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |diff, (x, y)| diff | (x ^ y))
            == 0
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_tenant_and_match_only_their_digest() {
        let token = issue("shop.acme").unwrap();
        assert_eq!(claimed_tenant(&token), Some("shop.acme"));
        assert!(matches(&token, &digest(&token)));
        assert!(!matches(&token, &digest("tgt:shop.acme:other")));
        assert_eq!(claimed_tenant("tgt:shop.acme:short"), None);
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert!(Caller::Tenant("shop.a".into()).may_use("shop.a"));
        assert!(!Caller::Tenant("shop.a".into()).may_use("shop.b"));
    }
}
