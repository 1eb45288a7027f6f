use super::{SerializeError, Serializer};
use serde::{de::DeserializeOwned, Serialize};

/// CBOR (RFC 8949) through `ciborium`: binary, compact for numbers and byte strings, and
/// exact for every `f64` (NaN, ±infinity, `-0.0`) and for maps with non-string keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cbor;

impl Serializer for Cbor {
    fn name(&self) -> &str {
        "cbor"
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), SerializeError> {
        ciborium::into_writer(value, out).map_err(SerializeError::new)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        let mut reader = bytes;
        let value = ciborium::from_reader(&mut reader).map_err(SerializeError::new)?;
        if !reader.is_empty() {
            return Err(SerializeError::new(format!(
                "{} trailing bytes after the CBOR value",
                reader.len()
            )));
        }
        Ok(value)
    }
}
