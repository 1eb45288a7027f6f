use super::{SerializeError, Serializer};
use serde::{de::DeserializeOwned, Serialize};

/// [Postcard](https://docs.rs/postcard): a compact binary format, and the fastest built-in
/// for numbers and bulk data (an `f64` is its 8 raw bytes, integers are varints).
///
/// Not self-describing: both sides must agree on the exact types, and types that need
/// `deserialize_any` (`serde_json::Value`, untagged enums) do not work with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Postcard;

impl Serializer for Postcard {
    fn name(&self) -> &str {
        "postcard"
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        let start = out.len();
        let result = postcard::to_extend(value, Append(out)).map(drop);
        result.map_err(|e| {
            out.truncate(start);
            SerializeError::new(e)
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        let (value, rest) = postcard::take_from_bytes(bytes).map_err(SerializeError::new)?;
        if !rest.is_empty() {
            return Err(SerializeError::new(format!(
                "{} trailing bytes after the postcard value",
                rest.len()
            )));
        }
        Ok(value)
    }
}

/// Appends to a borrowed buffer, so a failed encode cannot lose what `out` held before.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_encode_keeps_what_the_buffer_held() {
        #[derive(serde::Serialize)]
        struct Flat {
            #[serde(flatten)]
            inner: std::collections::BTreeMap<String, u8>,
        }
        let mut out = b"earlier".to_vec();
        let value = Flat {
            inner: [("a".to_owned(), 1)].into(),
        };
        assert!(Postcard.encode(&value, &mut out).is_err());
        assert_eq!(out, b"earlier");
        Postcard.encode(&7u8, &mut out).unwrap();
        assert_eq!(out, b"earlier\x07");
    }
}
