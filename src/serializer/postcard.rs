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
        let buf = std::mem::take(out);
        *out = postcard::to_extend(value, buf).map_err(SerializeError::new)?;
        Ok(())
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
