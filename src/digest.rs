//! A sha256 digest as its 32 bytes: what the engine and the daemon's records keep per file
//! (a placeholder's expected content, the content cache's key). Its text form, in logs,
//! errors and the daemon's JSON records, is the lowercase hex of the index and the OCI
//! specs. This module owns the conversion between the two and nothing else: where a digest
//! comes from and what it is checked against belong to the index, the engine and the
//! daemon.
//!
//! Held in binary because a node serves hundreds of thousands of placeholders: the hex
//! `String` it replaces cost 88 bytes of heap (64 bytes and the allocator's header) per file
//! for each copy, against 32 bytes inline.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

/// A digest's text is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a sha256 digest (64 hex digits): {0:?}")]
pub struct NotSha256(pub String);

impl Sha256 {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Sha256 {
        Sha256(sha2::Sha256::digest(data).into())
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Sha256, NotSha256> {
        let mut out = [0u8; 32];
        match hex::decode_to_slice(s, &mut out) {
            Ok(()) => Ok(Sha256(out)),
            Err(_) => Err(NotSha256(s.chars().take(80).collect())),
        }
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256 {
    type Err = NotSha256;
    fn from_str(s: &str) -> Result<Sha256, NotSha256> {
        Sha256::from_hex(s)
    }
}

impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sha256, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sha256::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_a_digest() {
        let d = Sha256::of(b"abc");
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(d.to_hex(), hex);
        assert_eq!(d.to_string(), hex);
        assert_eq!(Sha256::from_hex(&hex.to_uppercase()), Ok(d));
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{hex}\""));
        assert_eq!(
            serde_json::from_str::<Sha256>(&format!("\"{hex}\"")).unwrap(),
            d
        );
        for bad in [
            "",
            "ab",
            &hex[..62],
            &format!("{hex}00"),
            &hex.replace('b', "g"),
        ] {
            assert!(Sha256::from_hex(bad).is_err(), "{bad:?} accepted");
            assert!(serde_json::from_str::<Sha256>(&format!("\"{bad}\"")).is_err());
        }
    }
}
