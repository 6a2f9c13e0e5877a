//! A message's headers as the framer builds them: names and values, in order, packed in one
//! buffer. The publisher makes the client's `HeaderMap` from it for each send (again for a
//! re-publish), so the headers are written once, in one allocation, and never read back out
//! of a map.

use async_nats::header::{HeaderMap, HeaderName};

/// Header names tidegate writes on every message: the client's `HeaderMap` gets them as
/// static names, which it does not copy to the heap (a name given as `&str` is).
const KNOWN_NAMES: [&str; 9] = [
    "Content-Type",
    "Tidegate-Pipeline",
    "Tidegate-Tenant",
    "Tidegate-Operation",
    "Tidegate-Namespace",
    "Tidegate-Key",
    "Tidegate-Cluster-Time",
    "Tidegate-Error-Kind",
    "Tidegate-Error",
];

/// Headers: each name and each value as a little-endian `u32` length and its bytes, in the
/// order they were added (the order `HeaderMap::append` keeps for the values of one name).
/// Compares equal when the same headers were added in the same order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<u8>);

impl Headers {
    /// No headers, with room for `bytes` of them (a message's usual set is ~250 bytes).
    pub fn with_capacity(bytes: usize) -> Headers {
        Headers(Vec::with_capacity(bytes))
    }

    /// Adds a value under `name`, after any it already has.
    pub fn append(&mut self, name: &str, value: &str) {
        for part in [name, value] {
            // A header longer than 4 GiB cannot be framed (the server refuses a message that
            // large long before); the length saturates rather than wrapping.
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            self.0.extend_from_slice(&len.to_le_bytes());
            self.0.extend_from_slice(part.as_bytes());
        }
    }

    /// Sets `name` to `value` alone, as `HeaderMap::insert` does: its earlier values go.
    pub fn insert(&mut self, name: &str, value: &str) {
        if self.get(name).is_some() {
            let mut kept = Headers::with_capacity(self.0.len());
            for (n, v) in self.iter().filter(|(n, _)| *n != name) {
                kept.append(n, v);
            }
            *self = kept;
        }
        self.append(name, value);
    }

    /// Every header of `other`, after these.
    pub fn extend(&mut self, other: &Headers) {
        self.0.extend_from_slice(&other.0);
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every (name, value), in the order added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut rest = self.0.as_slice();
        let mut next = move || -> Option<&str> {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_le_bytes(*len) as usize;
            let (text, tail) = tail.split_at_checked(len)?;
            rest = tail;
            // Only `&str`s are ever appended, so this never fails.
            std::str::from_utf8(text).ok()
        };
        std::iter::from_fn(move || Some((next()?, next()?)))
    }

    /// The headers as the NATS client takes them.
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.iter() {
            match KNOWN_NAMES.iter().find(|known| **known == name) {
                Some(known) => map.append(HeaderName::from_static(known), value),
                None => map.append(name, value),
            }
        }
        map
    }

    /// Bytes of the header block as async-nats writes it in an `HPUB` (and nats-server counts
    /// toward `max_payload`): `NATS/1.0\r\n`, one `Name: value\r\n` line per value, and
    /// `\r\n`.
    pub fn block_bytes(&self) -> usize {
        let lines: usize = self
            .iter()
            .map(|(name, value)| line_bytes(name, value.len()))
            .sum();
        "NATS/1.0\r\n".len() + lines + "\r\n".len()
    }
}

/// Bytes of one `Name: value\r\n` header line.
pub fn line_bytes(name: &str, value_len: usize) -> usize {
    name.len() + ": ".len() + value_len + "\r\n".len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-publish carries exactly the headers of the first send, known names or not.
    #[test]
    fn the_client_gets_every_header() {
        let mut headers = Headers::default();
        headers.append("Content-Type", "application/json");
        headers.append("Tidegate-Key", r#"{"$oid":"5f0c"}"#);
        headers.append("X-Many", "1");
        headers.append("X-Many", "");
        headers.append("X-Many", "3 é");
        let map = headers.to_map();
        assert_eq!(
            map.get("Content-Type").map(|v| v.as_str()),
            Some("application/json")
        );
        assert_eq!(
            map.get("Tidegate-Key").map(|v| v.as_str()),
            Some(r#"{"$oid":"5f0c"}"#)
        );
        let many: Vec<&str> = map.get_all("X-Many").map(|v| v.as_str()).collect();
        assert_eq!(many, ["1", "", "3 é"]);
        assert_eq!(map, headers.clone().to_map());
        assert_eq!(Headers::default().to_map(), HeaderMap::new());
    }

    /// `insert` replaces every earlier value of the name and keeps the rest in order.
    #[test]
    fn insert_replaces() {
        let mut headers = Headers::default();
        headers.append("A", "1");
        headers.append("B", "2");
        headers.append("A", "3");
        headers.insert("A", "4");
        let all: Vec<(&str, &str)> = headers.iter().collect();
        assert_eq!(all, [("B", "2"), ("A", "4")]);
        assert_eq!(headers.get("A"), Some("4"));
        assert_eq!(headers.get("C"), None);
    }

    /// The counted size is what async-nats writes.
    #[test]
    fn block_bytes_match_the_wire() {
        let mut headers = Headers::default();
        headers.append("A", "xy");
        headers.append("B", "1");
        headers.append("B", "22");
        let wire = "NATS/1.0\r\nA: xy\r\nB: 1\r\nB: 22\r\n\r\n";
        assert_eq!(headers.block_bytes(), wire.len());
    }
}
