//! Identifiers an IdP chooses (session ids, `txn`s), made unique across
//! IdPs: every key the hub stores them under is the pair (issuer, id).
//!
//! The pair is encoded as `<byte length of issuer>:<issuer><id>`: the
//! length prefix makes the encoding injective, so no IdP can choose an id
//! (whatever characters it holds) whose key equals another IdP's key. The
//! encoding is a plain string so every redb table, Kafka record key and
//! partition choice that took an id keeps working on the scoped key.

/// The key of `id` as named by `issuer`.
pub fn scoped(issuer: &str, id: &str) -> String {
    format!("{}:{issuer}{id}", issuer.len())
}

/// The (issuer, id) pair a [`scoped`] key encodes; `None` for a string that
/// is not one.
pub fn unscope(key: &str) -> Option<(&str, &str)> {
    let (length, rest) = key.split_once(':')?;
    if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let length: usize = length.parse().ok()?;
    if !rest.is_char_boundary(length) {
        return None;
    }
    Some(rest.split_at(length))
}

/// The id part of a scoped key (the key itself if it is not one).
pub fn local_id(key: &str) -> &str {
    unscope(key).map_or(key, |(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_never_collide_across_issuers() {
        let key = scoped("https://idp.example", "S1");
        assert_eq!(unscope(&key), Some(("https://idp.example", "S1")));
        assert_eq!(local_id(&key), "S1");
        // An IdP cannot pick an id that lands on another IdP's key.
        assert_ne!(scoped("https://a", "b:x"), scoped("https://a:b", "x"));
        assert_ne!(scoped("https://a", "~1"), scoped("https://a~1", ""));
        assert_eq!(unscope(&scoped("é", "ü")), Some(("é", "ü")));
        assert_eq!(unscope("plain"), None);
        assert_eq!(unscope("99:short"), None);
        assert_eq!(unscope("1:\u{e9}x"), None, "a length inside a character is refused");
    }

    proptest::proptest! {
        #[test]
        fn the_encoding_is_injective(a in ".*", b in ".*", c in ".*", d in ".*") {
            proptest::prop_assume!((a.as_str(), b.as_str()) != (c.as_str(), d.as_str()));
            proptest::prop_assert_ne!(scoped(&a, &b), scoped(&c, &d));
            let key = scoped(&a, &b);
            proptest::prop_assert_eq!(unscope(&key), Some((a.as_str(), b.as_str())));
        }
    }
}
