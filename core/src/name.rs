//! Validated identifiers: hubs, groups, users, connections and nodes.
//!
//! Names are opaque data. Characters that mean something to SQL, shells or pattern matchers
//! (`'`, `;`, `*`, `%`, `?`, `[`) are stored and compared byte for byte and never interpreted.
//! What is rejected, with [`Error::InvalidName`], is what no protocol can carry safely:
//! empty names, names over the length limit and control characters.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, NameKind, Result};

/// How the characters of a name are checked.
enum Charset {
    /// ASCII letters, digits, `-`, `_` and `.`: safe in URLs, table names and channel names.
    Slug,
    /// Printable ASCII without spaces.
    Token,
    /// Any Unicode text without control characters.
    Text,
}

fn validate(kind: NameKind, value: &str, max: usize, charset: Charset) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid_name(kind, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid_name(
            kind,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    let bad = match charset {
        Charset::Slug => value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))),
        Charset::Token => value.chars().find(|c| !c.is_ascii_graphic()),
        Charset::Text => value.chars().find(|c| c.is_control()),
    };
    match bad {
        Some(c) => Err(Error::invalid_name(
            kind,
            format!("contains the character {c:?}, which is not allowed"),
        )),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $max:expr, $charset:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The longest accepted name, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `value` and wraps it.
            ///
            /// # Errors
            ///
            /// [`Error::InvalidName`] when the value is empty, too long or holds a character that
            /// is not allowed.
            pub fn new(value: impl AsRef<str>) -> Result<Self> {
                let value = value.as_ref();
                validate($kind, value, $max, $charset)?;
                Ok(Self(Arc::from(value)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// The name of a hub: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, so it can appear in
    /// URLs, table names and notification channels unchanged.
    HubName, NameKind::Hub, 64, Charset::Slug
);
name_type!(
    /// The name of a group: 1 to 256 bytes of Unicode text without control characters.
    GroupName, NameKind::Group, 256, Charset::Text
);
name_type!(
    /// A user id: 1 to 256 bytes of Unicode text without control characters.
    UserId, NameKind::User, 256, Charset::Text
);
name_type!(
    /// A connection id: 1 to 128 printable ASCII characters without spaces.
    ConnectionId, NameKind::Connection, 128, Charset::Token
);
name_type!(
    /// A node id: 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
    NodeId, NameKind::Node, 64, Charset::Slug
);

impl NodeId {
    /// A new random node id, unique across processes and restarts.
    pub fn random() -> Self {
        Self(Arc::from(
            uuid::Uuid::new_v4().simple().to_string().as_str(),
        ))
    }
}

impl ConnectionId {
    /// A new random connection id: 32 hexadecimal characters.
    pub fn random() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self(Arc::from(id.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_names_are_rejected() {
        let err = GroupName::new("").unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidName {
                kind: NameKind::Group,
                ..
            }
        ));
        assert_eq!(err.to_string(), "invalid group name: must not be empty");
    }

    #[test]
    fn long_names_are_rejected() {
        assert!(UserId::new("u".repeat(256)).is_ok());
        let err = UserId::new("u".repeat(257)).unwrap_err();
        assert!(err.to_string().contains("limit is 256"), "{err}");
        assert!(HubName::new("h".repeat(65)).is_err());
    }

    #[test]
    fn injection_and_patterns_are_opaque() {
        for s in [
            "'; DROP TABLE x; --",
            "*",
            "%",
            "?",
            "[a]",
            "_",
            "a\"b",
            "ünï €",
        ] {
            assert_eq!(GroupName::new(s).unwrap().as_str(), s);
            assert_eq!(UserId::new(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn control_characters_are_rejected() {
        assert!(GroupName::new("a\0b").is_err());
        assert!(UserId::new("a\nb").is_err());
        assert!(ConnectionId::new("a b").is_err());
    }

    #[test]
    fn hub_names_are_slugs() {
        assert!(HubName::new("chat-room_1.v2").is_ok());
        let err = HubName::new("chat room").unwrap_err();
        assert!(err.to_string().contains("' '"), "{err}");
        assert!(HubName::new("a;b").is_err());
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = NodeId::random();
        let b = NodeId::random();
        assert_ne!(a, b);
        assert!(NodeId::new(a.as_str()).is_ok());
        assert!(ConnectionId::new(ConnectionId::random().as_str()).is_ok());
    }
}
