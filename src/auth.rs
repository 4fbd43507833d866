//! API keys: making them, reading them from a bearer token, and checking them.
//!
//! A key is `cpd_<id>_<secret>`: `id` is 12 random hex digits, public, the row's primary key and
//! what `keys list` and the audit log show; `secret` is 256 random bits (64 hex digits). Only
//! sha256(secret) is stored. A request's key is found by its id and its secret compared with the
//! stored hash in constant time, so neither a timing difference nor the database reveals it.

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::store::{ApiKey, Scope, DEFAULT_TENANT};

/// Every key starts with this, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "cpd_";

/// Longest tenant name.
const MAX_TENANT_LEN: usize = 64;

/// Who a request acts as, put into the request by the access middleware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The tenant whose resources it sees and makes.
    pub tenant: String,
    /// The key's id; `None` when the server runs without auth.
    pub key_id: Option<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// The caller of a server without auth: the default tenant, every scope.
    pub fn anonymous() -> Self {
        Self {
            tenant: DEFAULT_TENANT.to_owned(),
            key_id: None,
            scopes: Scope::ALL.to_vec(),
        }
    }

    /// The caller a stored key makes.
    pub fn from_key(key: &ApiKey) -> Self {
        Self {
            tenant: key.tenant.clone(),
            key_id: Some(key.id.clone()),
            scopes: key.scopes.clone(),
        }
    }

    /// Whether it may do what `scope` covers; `admin` covers `read` and `write` too.
    pub fn can(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// A new key: the full text to hand to its holder once, and the row to store.
#[derive(Debug)]
pub struct NewKey {
    /// `cpd_<id>_<secret>`; shown once, never stored.
    pub token: String,
    /// What the store keeps.
    pub key: ApiKey,
}

/// Makes a key for `tenant` with `scopes`, from `rng` (the OS's in production).
///
/// # Errors
/// [`Error::Invalid`] for a malformed tenant name or no scopes.
pub fn generate_key(
    rng: &mut impl RngCore,
    tenant: &str,
    scopes: Vec<Scope>,
    now: DateTime<Utc>,
) -> Result<NewKey> {
    valid_tenant(tenant)?;
    if scopes.is_empty() {
        return Err(Error::Invalid("a key needs at least one scope".into()));
    }
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    Ok(NewKey {
        token: format!("{KEY_PREFIX}{id}_{secret}"),
        key: ApiKey {
            id,
            tenant: tenant.to_owned(),
            scopes,
            secret_hash: secret_hash(&secret),
            created_at: now,
            revoked_at: None,
        },
    })
}

/// The id and secret of a presented key, or `None` when it is not shaped like one.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

/// Whether `secret` is the one `key` was made with; constant time in the secret.
pub fn secret_matches(key: &ApiKey, secret: &str) -> bool {
    let presented = Sha256::digest(secret.as_bytes());
    let Ok(stored) = hex::decode(&key.secret_hash) else {
        return false;
    };
    presented.as_slice().ct_eq(&stored).into()
}

fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Checks a tenant name: 1 to 64 of `a-z 0-9 _ -`, starting with a letter or digit. (No `/`: the
/// store scopes idempotency keys as `<tenant>/<key>`.)
///
/// # Errors
/// [`Error::Invalid`] saying what is wrong.
pub fn valid_tenant(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TENANT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "tenant `{name}` must be 1 to {MAX_TENANT_LEN} of a-z, 0-9, _ and -, starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn a_generated_key_parses_and_matches_only_its_secret() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let made = generate_key(&mut rng, "team-a", vec![Scope::Read], Utc::now()).unwrap();
        let (id, secret) = parse_token(&made.token).unwrap();
        assert_eq!(id, made.key.id);
        assert!(secret_matches(&made.key, secret));
        let mut wrong = secret.to_owned().into_bytes();
        wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
        assert!(!secret_matches(
            &made.key,
            std::str::from_utf8(&wrong).unwrap()
        ));
        assert!(!made.key.secret_hash.contains(secret));
        let other = generate_key(&mut rng, "team-a", vec![Scope::Read], Utc::now()).unwrap();
        assert_ne!(other.token, made.token);
    }

    #[test]
    fn malformed_tokens_and_tenants_are_refused() {
        for token in [
            "",
            "cpd_",
            "cpd_abc_def",
            "xyz_0123456789ab_",
            &format!("cpd_0123456789ab_{}", "g".repeat(64)),
        ] {
            assert_eq!(parse_token(token), None, "{token}");
        }
        for tenant in ["", "A", "a/b", "-a", &"a".repeat(65)] {
            assert!(valid_tenant(tenant).is_err(), "{tenant}");
        }
        valid_tenant("team_a-1").unwrap();
    }

    #[test]
    fn admin_covers_read_and_write() {
        let admin = Caller {
            tenant: "t".into(),
            key_id: None,
            scopes: vec![Scope::Admin],
        };
        assert!(admin.can(Scope::Read) && admin.can(Scope::Write));
        let reader = Caller {
            scopes: vec![Scope::Read],
            ..admin
        };
        assert!(reader.can(Scope::Read) && !reader.can(Scope::Write) && !reader.can(Scope::Admin));
    }
}
