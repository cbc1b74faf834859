//! Who a request is: JWT bearer tokens for users, and the signed connection tokens negotiate
//! hands out, which any node can verify.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backplane_core::{ConnectionId, HubName, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a request was refused: the text of its 401 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct AuthError(pub(crate) String);

#[derive(Debug, Serialize, Deserialize)]
struct UserClaims {
    sub: String,
    exp: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConnectionClaims {
    /// The connection id.
    cid: String,
    /// The hub.
    hub: String,
    /// The user, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    /// Whether the client asked for stateful reconnect: its later sockets may resume the
    /// connection, wherever it is held.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    rs: bool,
    exp: u64,
}

/// What a genuine connection token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionToken {
    pub(crate) id: ConnectionId,
    pub(crate) user: Option<UserId>,
    /// Negotiated with stateful reconnect.
    pub(crate) stateful: bool,
    /// Past its lifetime: good only to resume a connection that is still held.
    pub(crate) expired: bool,
}

/// Checks user tokens and issues and checks connection tokens.
#[derive(Clone)]
pub(crate) struct Auth {
    users: Option<DecodingKey>,
    allow_anonymous: bool,
    sign: EncodingKey,
    verify: DecodingKey,
    connection_token_ttl: Duration,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("jwt", &self.users.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hs256() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.validate_aud = false;
    validation
}

impl Auth {
    /// `jwt_secret` checks user tokens; `token_secret` signs connection tokens (every node of
    /// a deployment needs the same one).
    pub(crate) fn new(
        jwt_secret: Option<&[u8]>,
        token_secret: &[u8],
        allow_anonymous: bool,
        connection_token_ttl: Duration,
    ) -> Self {
        Self {
            users: jwt_secret.map(DecodingKey::from_secret),
            allow_anonymous,
            sign: EncodingKey::from_secret(token_secret),
            verify: DecodingKey::from_secret(token_secret),
            connection_token_ttl,
        }
    }

    /// The user a request is authenticated as.
    ///
    /// `token` is the bearer token (from the `Authorization` header or the `access_token`
    /// query parameter); `anonymous_user` the `user` query parameter, honoured only in
    /// anonymous mode.
    pub(crate) fn authenticate(
        &self,
        token: Option<&str>,
        anonymous_user: Option<&str>,
    ) -> Result<Option<UserId>, AuthError> {
        match (token, &self.users) {
            (Some(token), Some(key)) => {
                let data = jsonwebtoken::decode::<UserClaims>(token, key, &hs256())
                    .map_err(|e| AuthError(format!("invalid access token: {e}")))?;
                UserId::new(data.claims.sub)
                    .map(Some)
                    .map_err(|e| AuthError(format!("invalid access token: {e}")))
            }
            (Some(_), None) if !self.allow_anonymous => Err(AuthError(
                "access tokens cannot be checked: the server has no JWT secret".into(),
            )),
            _ if self.allow_anonymous => match anonymous_user {
                Some(user) if !user.is_empty() => UserId::new(user)
                    .map(Some)
                    .map_err(|e| AuthError(format!("invalid user: {e}"))),
                _ => Ok(None),
            },
            _ => Err(AuthError("missing access token".into())),
        }
    }

    /// A token naming this connection, for the WebSocket request that follows negotiate.
    pub(crate) fn connection_token(
        &self,
        hub: &HubName,
        connection: &ConnectionId,
        user: Option<&UserId>,
        stateful: bool,
    ) -> String {
        let claims = ConnectionClaims {
            cid: connection.to_string(),
            hub: hub.to_string(),
            sub: user.map(ToString::to_string),
            rs: stateful,
            exp: now() + self.connection_token_ttl.as_secs(),
        };
        // HS256 over a small JSON object cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.sign)
            .unwrap_or_default()
    }

    /// What a connection token says, when it is genuine and for `hub`. An expired token is
    /// returned as such: a stateful connection outlives its token, and resumes with it.
    pub(crate) fn check_connection_token(
        &self,
        token: &str,
        hub: &HubName,
    ) -> Result<ConnectionToken, AuthError> {
        let mut validation = hs256();
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<ConnectionClaims>(token, &self.verify, &validation)
            .map_err(|e| AuthError(format!("invalid connection token: {e}")))?;
        if data.claims.hub != hub.as_str() {
            return Err(AuthError("the connection token is for another hub".into()));
        }
        let id = ConnectionId::new(data.claims.cid)
            .map_err(|e| AuthError(format!("invalid connection token: {e}")))?;
        let user = data
            .claims
            .sub
            .map(UserId::new)
            .transpose()
            .map_err(|e| AuthError(format!("invalid connection token: {e}")))?;
        Ok(ConnectionToken {
            id,
            user,
            stateful: data.claims.rs,
            expired: data.claims.exp.saturating_add(validation.leeway) < now(),
        })
    }
}

/// A user token signed with `secret`, valid for `ttl`: for tests and tools.
pub fn user_token(secret: &[u8], user: &str, ttl: Duration) -> String {
    let claims = UserClaims {
        sub: user.to_owned(),
        exp: now() + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(jwt: Option<&[u8]>, anonymous: bool) -> Auth {
        Auth::new(jwt, b"token-secret", anonymous, Duration::from_secs(60))
    }

    #[test]
    fn accepts_a_valid_token_and_refuses_others() {
        let a = auth(Some(b"secret"), false);
        let good = user_token(b"secret", "alice", Duration::from_secs(60));
        assert_eq!(
            a.authenticate(Some(&good), None).unwrap().unwrap().as_str(),
            "alice"
        );
        let wrong_key = user_token(b"other", "alice", Duration::from_secs(60));
        assert!(a.authenticate(Some(&wrong_key), None).is_err());
        assert!(a.authenticate(Some("garbage"), None).is_err());
        assert!(a.authenticate(None, Some("alice")).is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &UserClaims {
                sub: "alice".into(),
                exp: now() - 3600,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        let err = a.authenticate(Some(&expired), None).unwrap_err();
        assert!(err.0.contains("Expired"), "{err}");
    }

    #[test]
    fn anonymous_mode_takes_the_user_parameter() {
        let a = auth(None, true);
        assert_eq!(
            a.authenticate(None, Some("bob")).unwrap().unwrap().as_str(),
            "bob"
        );
        assert_eq!(a.authenticate(None, None).unwrap(), None);
        assert!(a.authenticate(None, Some(&"x".repeat(300))).is_err());
    }

    #[test]
    fn connection_tokens_round_trip_and_bind_the_hub() {
        let a = auth(None, true);
        let hub = HubName::new("chat").unwrap();
        let id = ConnectionId::new("c1").unwrap();
        let user = UserId::new("bob").unwrap();
        let token = a.connection_token(&hub, &id, Some(&user), true);
        let got = a.check_connection_token(&token, &hub).unwrap();
        assert_eq!(
            got,
            ConnectionToken {
                id: id.clone(),
                user: Some(user),
                stateful: true,
                expired: false
            }
        );
        let plain = a.connection_token(&hub, &id, None, false);
        let got = a.check_connection_token(&plain, &hub).unwrap();
        assert!(!got.stateful && got.user.is_none());
        // An expired token is genuine, and says it has expired.
        let short = Auth::new(None, b"secret", true, Duration::ZERO);
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &ConnectionClaims {
                cid: "c1".into(),
                hub: "chat".into(),
                sub: None,
                rs: true,
                exp: now() - 60,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(short.check_connection_token(&old, &hub).unwrap().expired);
        let other = HubName::new("other").unwrap();
        assert!(a.check_connection_token(&token, &other).is_err());
        let forged = Auth::new(None, b"another", true, Duration::from_secs(60));
        assert!(forged.check_connection_token(&token, &hub).is_err());
    }
}
